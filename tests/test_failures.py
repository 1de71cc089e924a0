"""Nothing silent, nothing lost: each case runs the real CLI on real files in a temporary
directory and checks the exit code, that the one-line message names the file, key or step,
and that nothing was lost (the inputs' and earlier checkpoints' md5 unchanged, metrics.jsonl
intact and in step order)."""

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pyarrow as pa
import pytest
from pyarrow import parquet
from safetensors.numpy import load_file, save_file
from sft_runs import LLAMA_SFT, as_args, cli, overrides
from small_models import randomize_adapters

import lora_jax as lj
from lora_jax import models
from lora_jax.checkpoint import Checkpoints
from lora_jax.cli import WholeLines
from lora_jax.cli import main as cli_main
from lora_jax.rundir import RunDir, changed
from lora_jax.settings import RunConfig, load_config


def md5s(*paths):
    """md5 of every file under the paths (a missing path counts as empty), but the lock a
    run holds (it records the holder's pid)."""
    files = [
        f for p in paths for f in sorted(Path(p).rglob("*")) if f.is_file() and f.name != ".lock"
    ]
    files += [Path(p) for p in paths if Path(p).is_file()]
    return {str(f): hashlib.md5(f.read_bytes()).hexdigest() for f in files}


def one_line(err):
    """The CLI's error: exactly one line "lora-jax COMMAND: ..." (the progress bar aside)."""
    lines = [line for line in err.splitlines() if line.startswith("lora-jax ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def steps_of(out):
    return [json.loads(line)["step"] for line in (Path(out) / "metrics.jsonl").open()]


def train_args(sft, out, **changes):
    return ["train", "--config", LLAMA_SFT, *as_args(overrides(sft, out, **changes))]


@pytest.fixture(scope="module")
def adapter_dir(checkpoints, tmp_path_factory):
    """A peft adapter that lora_jax saved for the tiny Llama (random non-zero B)."""
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    model, params, hf_config = models.from_pretrained(checkpoints / "llama")
    config = lj.LoraConfig(rank=8, alpha=16.0, targets=("q_proj", "v_proj"))
    layouts = lj.kernel_layouts(model, jax.numpy.zeros((1, 4), jax.numpy.int32))
    adapted = lj.init(jax.random.key(0), params, config, layouts)
    adapted = randomize_adapters(adapted, jax.random.key(1))
    lj.save_adapter(out, lj.split(adapted, config)[0], config, hf_config=hf_config)
    return out


def broken_adapter(adapter_dir, tmp_path, change):
    """A copy of the adapter with its safetensors file changed by `change(tensors, path)`."""
    copy = tmp_path / "broken"
    shutil.copytree(adapter_dir, copy)
    path = copy / "adapter_model.safetensors"
    change(load_file(path), path)
    return copy


def _truncate(tensors, path):
    path.write_bytes(path.read_bytes()[:100])


def _as_int(tensors, path):
    name = next(n for n in tensors if "lora_B" in n)
    save_file({**tensors, name: tensors[name].astype(np.int32)}, path)


def _nan(tensors, path):
    name = next(n for n in tensors if "lora_A" in n)
    save_file({**tensors, name: np.full_like(tensors[name], np.nan)}, path)


def _extra_module(tensors, path):
    # Named like a real base module, but not listed in adapter_config.json's modules_to_save.
    weight = np.zeros((32, 32), np.float32)
    save_file({**tensors, "base_model.model.model.layers.0.mlp.up_proj.weight": weight}, path)


ADAPTER_CASES = {
    "truncated": (_truncate, r"adapter_model\.safetensors: not a readable safetensors file"),
    "no tensors": (lambda tensors, path: save_file({}, path),
                   r"/broken/adapter_model\.safetensors: holds no tensors \(an empty adapter\)"),
    "int32 tensor": (_as_int, r"adapter_model\.safetensors: \S+lora_B\.weight is int32"),
    "NaN tensor": (_nan, r"adapter_model\.safetensors: \S+lora_A\.weight holds non-finite"),
    "unexplained tensor": (_extra_module, r"up_proj\.weight is a full tensor of .*up_proj, "
                                          r"which adapter_config\.json's modules_to_save"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(ADAPTER_CASES))
def test_bad_adapter_files_are_refused_naming_the_file(
    checkpoints, adapter_dir, tmp_path, capsys, case
):
    change, message = ADAPTER_CASES[case]
    broken = broken_adapter(adapter_dir, tmp_path, change)
    before = md5s(broken, checkpoints / "llama")
    out = tmp_path / "merged"
    code = cli_main(["merge", "--base", str(checkpoints / "llama"), "--adapter", str(broken),
                     "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    err = one_line(err)
    assert str(broken) in err and re.search(message, err), err
    assert md5s(broken, checkpoints / "llama") == before and not out.exists()


# name -> (adapter_config.json's change (None: the key removed), message): each contradicts
# the tensors (rank 8 on q_proj and v_proj, plain LoRA) or is no config at all.
CONFIG_CASES = {
    "r": ({"r": 4}, r"r / rank_pattern give \S+_proj rank 4, but its lora_A has rank 8"),
    "rank_pattern": ({"rank_pattern": {"v_proj": 2}},
                     r"r / rank_pattern give \S+v_proj rank 2, but its lora_A has rank 8"),
    "use_dora": ({"use_dora": True},
                 r"a DoRA adapter \(use_dora True\), but \S+_proj has no \['lora_magnitude'\]"),
    "target_modules": ({"target_modules": ["q_proj"]},
                       r"target_modules \['q_proj'\] does not pick \S+v_proj"),
    "no r": ({"r": None}, r"no 'r', which a LORA adapter needs"),
    "no lora_alpha": ({"lora_alpha": None}, r"no 'lora_alpha', which a LORA adapter needs"),
    "bad alpha_pattern": ({"alpha_pattern": {"(q_proj": 4}},
                          r"alpha_pattern '\(q_proj' is not a regex"),
    # Values of a type peft never writes there.
    "r a string": ({"r": "8"}, r'r is "8", not a whole number >= 1'),
    "r true": ({"r": True}, r"r is true, not a whole number >= 1"),
    "lora_alpha a string": ({"lora_alpha": "16"}, r'lora_alpha is "16", not a number > 0'),
    "null lora_alpha": ({"lora_alpha": "null"}, r"no 'lora_alpha', which a LORA adapter needs"),
    "rank_pattern a list": ({"rank_pattern": ["q_proj"]},
                            r'rank_pattern is \["q_proj"\], not an object of module patterns'),
    "alpha_pattern a string": ({"alpha_pattern": "q_proj"},
                               r'alpha_pattern is "q_proj", not an object of module patterns'),
    "target_modules a number": ({"target_modules": 5},
                                r"target_modules is 5, not a name pattern or a list of names"),
    "no target_modules": ({"target_modules": []},
                          r"target_modules \[\] does not pick \S+_proj"),
    "zero alpha": ({"lora_alpha": 0}, r"lora_alpha is 0, not a number > 0"),
    "zero in alpha_pattern": ({"alpha_pattern": {"v_proj": 0}},
                              r"alpha_pattern is \{\"v_proj\": 0\}, not an object of module "
                              "patterns and alphas"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_an_adapter_config_that_contradicts_its_tensors_is_refused(
    checkpoints, adapter_dir, tmp_path, capsys, case
):
    """The tensors are the truth: merge and inspect refuse a config that says otherwise, in
    one line naming the file and the key, not a merge of what the config claims."""
    change, message = CONFIG_CASES[case]
    broken = tmp_path / "broken"
    shutil.copytree(adapter_dir, broken)
    config = json.loads((broken / "adapter_config.json").read_text())
    config = {k: v for k, v in {**config, **change}.items() if v is not None}
    config = {k: None if v == "null" else v for k, v in config.items()}  # written as null
    (broken / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "merged"
    for args in (["merge", "--base", str(checkpoints / "llama"), "--adapter", str(broken),
                  "--out", str(out)], ["inspect", str(broken)]):  # fmt: skip
        assert cli_main(args) == 2
        err = one_line(capsys.readouterr().err)
        assert f"{broken}/adapter_config.json: " in err and re.search(message, err), err
    assert not out.exists()


def test_an_all_linear_target_is_peft_s_every_linear_layer(checkpoints, adapter_dir, tmp_path):
    """target_modules "all-linear", as peft writes it (every linear layer but the output
    layer), picks the adapted modules: the adapter is read and merged as with their names."""
    copy = tmp_path / "all_linear"
    shutil.copytree(adapter_dir, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    config["target_modules"] = "all-linear"
    (copy / "adapter_config.json").write_text(json.dumps(config))
    for adapter, out in ((adapter_dir, "named"), (copy, "all")):  # merged models
        assert cli_main(["merge", "--base", str(checkpoints / "llama"), "--adapter", str(adapter),
                         "--out", str(tmp_path / out)]) == 0  # fmt: skip
    merged = [(tmp_path / out / "model.safetensors").read_bytes() for out in ("named", "all")]
    assert merged[0] == merged[1]


def test_merge_never_writes_over_its_inputs(checkpoints, adapter_dir, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(checkpoints / "llama", base)
    before = md5s(base, adapter_dir)
    for out, name in ((base, "--base"), (adapter_dir, "--adapter")):
        code = cli_main(["merge", "--base", str(base), "--adapter", str(adapter_dir), "--out",
                         str(out)])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2 and f"is the {name} directory" in err, err
    assert md5s(base, adapter_dir) == before


def _write(path, text):
    path.write_text(text) if isinstance(text, str) else path.write_bytes(text)
    return path


SFT = {"data.task": "sft", "data.template": "{prompt}"}
# name -> (rows of the training file (bytes or text), extra --set, message)
DATA_CASES = {
    "float label": ('{"prompt": "w3", "label": 1.7}\n', {}, r"jsonl:1: label 1\.7 is neither"),
    "bool label": ('{"prompt": "w3", "label": true}\n', {}, r"jsonl:1: label True is neither"),
    "label out of range": ('{"prompt": "w3", "label": 0}\n\n{"prompt": "w4", "label": 7}\n', {},
                           r"jsonl:3: label 7 is outside the 2 classes"),
    "unknown label name": ('{"prompt": "w3", "label": "meh"}\n', {},
                           r"jsonl:1: label 'meh' is not one of data\.labels"),
    "null text": ('{"prompt": null, "label": 0}\n', {}, r"jsonl:1: prompt is None, not a string"),
    "not UTF-8": (b'{"prompt": "\xff\xfe", "label": 0}\n', {}, r"jsonl:1: not UTF-8 text"),
    "not an object": ('[1, 2]\n', {}, r"jsonl:1: a JSON list, not an object"),
    "object as text": ('{"prompt": {"a": [1]}, "label": 0}\n', {},
                       r"jsonl:1: prompt is \{'a': \[1\]\}, not a string"),
    "sft: object as prompt": ('{"prompt": {"a": 1}, "response": "w4"}\n', SFT,
                              r"jsonl:1: prompt is \{'a': 1\}, not a string"),
    "sft: true as prompt": ('{"prompt": true, "response": "w4"}\n', SFT,
                            r"jsonl:1: prompt is True, not a string"),
    "sft: list as response": ('{"prompt": "w3", "response": ["w4"]}\n', SFT,
                              r"jsonl:1: response is \['w4'\], not a string"),
    "sft: number in the template": ('{"prompt": "w3", "n": 7, "response": "w4"}\n',
                                    {**SFT, "data.template": "{prompt} {n}"},
                                    r"jsonl:1: n is 7, not a string"),
    # JSON's escape of half a character: Python holds it, no tokenizer takes it.
    "sft: a lone surrogate": ('{"prompt": "w3 \\ud800", "response": "w4"}\n', SFT,
                              r"jsonl:1: the text 'w3 \\ud800' holds a lone surrogate"),
    "a lone surrogate": ('{"prompt": "w3 \\udfff", "label": 0}\n', {},
                         r"jsonl:1: the text 'w3 \\udfff' holds a lone surrogate"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_rows_are_refused_naming_file_and_row(sft, tmp_path, capsys, case):
    rows, extra, message = DATA_CASES[case]
    data = _write(tmp_path / "train.jsonl", rows)
    before = md5s(data)
    sets = {"data.task": "classify", "data.text_field": "prompt", "data.train": data,
            "data.eval": data, **extra}  # fmt: skip
    code = cli_main(train_args(sft, tmp_path / "out", **sets))
    err = capsys.readouterr().err
    assert code == 2, err
    err = one_line(err)
    assert str(data) in err and re.search(message, err), err
    assert md5s(data) == before


def test_bad_config_is_one_line_naming_file_or_key(tmp_path, capsys):
    broken = _write(tmp_path / "broken.py", "def get_config(:\n    return {}\n")
    cases = [
        (["train", "--config", str(broken)], r"broken\.py:1: "),
        (["train", "--set", "model.dtype=float8"], r"model\.dtype is 'float8'; choose one of"),
        (["train", "--set", "train.steps=True"], r"train\.steps is True \(bool\); expected int"),
        (["train", "--set", "mesh.devices=0"], r"mesh\.devices is 0; must be -1 or >= 1"),
        (["train", "--set", "data.task=clasify"], r"data\.task is 'clasify'; choose one of"),
    ]
    for args, message in cases:
        code = cli_main([*args, "--set", f"output_dir={tmp_path / 'out'}"])
        err = capsys.readouterr().err
        assert code == 2, err
        err = one_line(err)
        assert re.search(message, err), err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_non_finite_loss_stops_at_once_and_keeps_the_last_good_checkpoint(sft, tmp_path, capsys):
    out = tmp_path / "out"
    diverge = {"train.steps": 8, "train.learning_rate": 1e30, "train.clip_norm": 1e30}
    code = cli_main(train_args(sft, out, **diverge, **{"checkpoint.every": 1}))
    err = capsys.readouterr().err
    assert code == 2, err
    err = one_line(err)
    bad = int(re.search(r"step (\d+): loss", err).group(1))
    assert bad < 8 and "newest checkpoint" in err
    assert steps_of(out) == list(range(1, bad))  # the bad step is not logged either
    assert not (out / "adapter").exists()
    # The checkpoints end at the last good step.
    checkpoints = Checkpoints(out / "checkpoints", 1, 5)
    steps = sorted(checkpoints.manager.all_steps())
    checkpoints.close()
    assert steps and max(steps) == bad - 1


def test_a_second_run_in_the_same_directory_is_refused(sft, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "a+") as held:  # another run holds the directory
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242")
        held.flush()
        code = cli_main(train_args(sft, out))
    err = capsys.readouterr().err
    assert code == 2 and f"output_dir {out} is in use by another run (pid 4242)" in err, err
    assert not (out / "metrics.jsonl").exists()
    # Released (the holder ended, even by kill -9: the OS drops an flock): the run goes ahead.
    assert cli_main(train_args(sft, out, **{"train.steps": 2})) == 0
    assert steps_of(out) == [1, 2]


def test_a_record_from_before_a_setting_existed_compares_it_as_its_default():
    """A run recorded by a version without the `dpo` section (nor data.chosen_field)
    resumes: a setting added since counts as its default; set otherwise, it is a change."""
    now = RunConfig().to_dict()
    old = json.loads(json.dumps(now))
    del old["dpo"], old["data"]["chosen_field"]
    assert changed(old, now) == []
    now["dpo"]["beta"] = 0.5
    assert changed(old, now) == [("dpo.beta", 0.1, 0.5)]


def test_resume_refuses_changed_settings_and_touches_nothing(sft, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli_main(train_args(sft, out, **{"train.steps": 3, "checkpoint.every": 1})) == 0
    before = md5s(out / "checkpoints", out / "metrics.jsonl", out / "adapter")
    code = cli_main([*train_args(sft, out, **{"train.steps": 6, "checkpoint.every": 1,
                                              "lora.rank": 4}), "--resume"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "config.json records other settings (lora.rank 16 -> 4)" in err, err
    assert md5s(out / "checkpoints", out / "metrics.jsonl", out / "adapter") == before
    # Settings a resume may change (more steps) go ahead, from the newest checkpoint.
    code = cli_main([*train_args(sft, out, **{"train.steps": 6, "checkpoint.every": 1}),
                     "--resume"])  # fmt: skip
    assert code == 0 and steps_of(out) == [1, 2, 3, 4, 5, 6]


def test_rerunning_in_a_directory_starts_fresh_and_a_stale_step_is_replaced(sft, tmp_path):
    out = tmp_path / "out"
    for _ in range(2):  # a notebook cell run twice
        assert cli_main(train_args(sft, out, **{"train.steps": 3, "checkpoint.every": 1})) == 0
        assert steps_of(out) == [1, 2, 3]
    # A fresh run that fails before its first checkpoint has nothing to replace the earlier
    # run's outputs with: they are back, whole; one that fails after it leaves none of them
    # beside its own.
    diverge = {"train.steps": 8, "train.learning_rate": 1e30, "train.clip_norm": 1e30}
    first = tmp_path / "first"
    assert cli_main(train_args(sft, first, **{"train.steps": 2})) == 0
    before = md5s(first)
    assert cli_main(train_args(sft, first, **diverge)) == 2
    assert md5s(first) == before
    assert cli_main(train_args(sft, first, **diverge, **{"checkpoint.every": 1})) == 2
    assert not any((first / n).exists() for n in ("adapter", "eval.json", "loss.png"))
    assert sorted(int(p.name) for p in (first / "checkpoints").iterdir()) == list(
        range(1, len(steps_of(first)) + 1))  # fmt: skip
    # The newest checkpoint unreadable: --resume goes back one, then replaces it on the way.
    for f in (out / "checkpoints" / "3").rglob("*"):
        if f.is_file() and "state" in f.parts:
            f.write_bytes(b"garbage")
    code = cli_main([*train_args(sft, out, **{"train.steps": 4, "checkpoint.every": 1}),
                     "--resume"])  # fmt: skip
    assert code == 0 and steps_of(out) == [1, 2, 3, 4]
    assert (out / "adapter" / "adapter_model.safetensors").exists()


# `lora-jax ARGS` through the real entry point, Ctrl-C arriving at a chosen point, with no
# timer: while the command's modules load (when jax is first imported), mid-command (as
# generation starts), or inside a finalizer, where Python swallows the KeyboardInterrupt.
INTERRUPT_PROBE = """
import os, signal, sys
point, sys.argv = sys.argv[1], ["lora-jax", *sys.argv[2:]]

def ctrl_c():
    os.kill(os.getpid(), signal.SIGINT)

class Dropped:
    def __del__(self):
        ctrl_c()

if point == "import":
    class Finder:
        def find_spec(self, name, path=None, target=None):
            if name == "jax":
                sys.meta_path.remove(self)
                ctrl_c()
    sys.meta_path.insert(0, Finder())
else:
    import lora_jax.generation as generation
    inner = generation.generate_text
    def interrupted(*args, **kwargs):
        ctrl_c() if point == "command" else Dropped()  # Dropped's finalizer runs at once
        return inner(*args, **kwargs)
    generation.generate_text = interrupted
from lora_jax import launch
launch.entry()
"""


@pytest.mark.parametrize("point", ["import", "command", "finalizer"])
def test_ctrl_c_at_any_moment_is_one_line_and_exit_130(sft, point):
    """Ctrl-C while `lora-jax generate` loads, runs, or inside a finalizer (whose
    KeyboardInterrupt Python would swallow and go on to exit 0) ends with one line and the
    shell's status for SIGINT, never a traceback."""
    command = [sys.executable, "-c", INTERRUPT_PROBE, point, "generate", "--model",
               str(sft / "llama"), "--prompt", "w3 w5", "--max-new-tokens", "4"]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 130, run.stderr
    assert one_line(run.stderr) == "lora-jax generate: interrupted"
    # Interrupted before it printed; a swallowed interrupt lets it finish, and still its
    # status says it was interrupted, so `generate && next` stops.
    assert run.stdout == "" or point == "finalizer"


def test_generate_on_an_encoder_says_it_needs_a_decoder(checkpoints):
    model, params, _ = models.from_pretrained(checkpoints / "bert")
    with pytest.raises(ValueError, match="BertModel keeps no KV cache: generate runs decoders"):
        lj.generate(model, params, np.ones((1, 3), np.int32), max_new_tokens=2)


def test_plain_apply_on_a_tree_with_adapters_refuses_instead_of_ignoring_them(checkpoints):
    model, params, _ = models.from_pretrained(checkpoints / "llama")
    config = lj.LoraConfig(rank=2, alpha=4.0, targets=("q_proj",))
    layouts = lj.kernel_layouts(model, np.ones((1, 3), np.int32))
    adapted = lj.init(jax.random.key(0), params, config, layouts)
    ids = np.ones((1, 3), np.int32)
    with pytest.raises(ValueError, match=r"LlamaForCausalLM\.apply: the params hold LoRA"):
        model.apply(adapted, ids)
    lj.lora_apply(model.apply, config)(adapted, ids)  # the factored forward runs it
    model.apply(lj.merge(adapted, config), ids)  # and so does the plain model on a merged tree


def limited_cli(limit, *args):
    """`lora-jax ARGS` in a process whose files may not grow past `limit` bytes: writes beyond
    fail with EFBIG ("File too large"), as on a full disk, even for root (Python ignores
    SIGXFSZ). The limit is set before exec, not by a preexec_fn in this threaded process."""
    limit_then_exec = (
        "import os, resource, sys; n = int(sys.argv[1]); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); "
        "os.execv(sys.executable, [sys.executable, '-m', 'lora_jax.cli', *sys.argv[2:]])"
    )
    command = [sys.executable, "-c", limit_then_exec, str(limit), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_a_failed_checkpoint_write_stops_the_run_naming_step_and_cause(sft, tmp_path):
    out = tmp_path / "out"
    changes = {"train.steps": 12, "checkpoint.every": 3}
    run = limited_cli(20_000, *train_args(sft, out, **changes))
    err = run.stderr
    assert run.returncode == 2, err
    # tensorstore's callbacks into orbax's closed event loop print tracebacks on the way
    # down (asyncio internals only); the command drops them (`cli.WholeLines`).
    assert "lora_jax/" not in err and "Event loop is closed" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("lora-jax ")]
    assert len(lines) == 1, err
    assert re.search(
        rf"checkpoint of step 3 in {out}/checkpoints failed: .*File too large", lines[0]
    )
    assert steps_of(out)[-1] <= 6  # stopped by the next checkpoint due, not at the end
    assert not (out / "adapter").exists()


def test_stderr_lines_stay_whole_and_closed_loop_tracebacks_are_dropped(capsys):
    """Each thread's text reaches stderr a whole line at a time; a traceback of asyncio's
    frames only, ending in "Event loop is closed", is dropped whole; any other is kept."""
    noise = ('Traceback (most recent call last):\n  File "/usr/lib/python3.11/asyncio/'
             'base_events.py", line 806, in call_soon_threadsafe\n    self._check_closed()\n'
             "RuntimeError: Event loop is closed\n")  # fmt: skip
    real = noise.replace("asyncio", "lora_jax")
    with WholeLines() as whole:
        whole.write("lora-jax train: writing the")
        thread = threading.Thread(target=lambda: [whole.write(c) for c in noise + real])
        thread.start()
        thread.join()
        whole.write(" checkpoint failed\n")
    err = capsys.readouterr().err
    assert err == real + "lora-jax train: writing the checkpoint failed\n", err


def test_a_failed_write_leaves_the_earlier_output_whole(checkpoints, adapter_dir, tmp_path):
    out = tmp_path / "merged"
    args = ("merge", "--base", checkpoints / "llama", "--adapter", adapter_dir, "--out", out)
    first = cli(*args)
    assert first.communicate(timeout=300) and first.returncode == 0
    before = md5s(out)
    size = (out / "model.safetensors").stat().st_size
    run = limited_cli(size // 2, *args)
    assert run.returncode == 2, run.stderr
    err = one_line(run.stderr)
    assert re.search(rf"writing {out} failed: .*File too large", err)
    assert md5s(out) == before  # the old model whole
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temporary left beside it


def test_a_refused_run_changes_nothing_in_its_output_dir(sft, tmp_path, capsys):
    """Every input is checked before the output directory is touched: a refused fresh run
    leaves an earlier run's outputs as they were, and removes a directory it had created."""
    out, empty = tmp_path / "out", tmp_path / "empty.jsonl"
    empty.write_text("")
    assert cli_main(train_args(sft, out, **{"train.steps": 2})) == 0
    capsys.readouterr()
    before = md5s(out)
    assert {"adapter", "checkpoints", "metrics.jsonl", "eval.json", "config.json"} <= {
        p.name for p in out.iterdir()}  # fmt: skip
    refusals = [
        ({"data.train": empty}, f"{empty}: no rows."),
        ({"model.path": tmp_path / "nowhere"}, f"{tmp_path / 'nowhere'}: not a checkpoint"),
        ({"data.max_length": 10**6}, "data.max_length 1000000 exceeds the model's"),
    ]
    for changes, says in refusals:
        assert cli_main(train_args(sft, out, **changes)) == 2
        assert says in one_line(capsys.readouterr().err)
        assert md5s(out) == before
    assert cli_main(train_args(sft, tmp_path / "new", **{"data.train": empty})) == 2
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("output_dir", ["", ".", "..", "~"])
def test_an_output_dir_that_is_not_the_runs_own_is_refused(sft, tmp_path, capsys, monkeypatch,
                                                           output_dir):  # fmt: skip
    """An empty output_dir (an unset shell variable), the current directory, one above it or
    the home directory would have the run clear a user's files: refused before anything."""
    home = tmp_path / "home" / "user"
    work = home / "work"
    (work / "adapter").mkdir(parents=True)
    (work / "adapter" / "adapter_model.safetensors").write_bytes(b"a user's own adapter")
    (work / "metrics.jsonl").write_text("{}\n")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    before = md5s(home)
    assert cli_main(train_args(sft, output_dir)) == 2
    assert "config output_dir is " in one_line(capsys.readouterr().err)
    assert md5s(home) == before and not (work / ".lock").exists()


def test_a_directory_no_run_wrote_is_never_cleared(sft, tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "adapter").mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    (mine / "config.json").write_text('{"model_type": "llama"}')  # a model's, not a run's
    before = md5s(mine)
    for resume in ([], ["--resume"]):
        assert cli_main([*train_args(sft, mine), *resume]) == 2
        err = one_line(capsys.readouterr().err)
        assert f"output_dir {mine} holds files no lora_jax run wrote (adapter, config.json" in err
        assert md5s(mine) == before and not (mine / ".lock").exists()


def test_a_stopped_run_exits_143_and_never_leaves_an_older_runs_outputs(sft, tmp_path):
    """SIGTERM checkpoints and stops with the shell's status for it, not 0 (so `train &&
    merge` stops); a resumed run's earlier adapter, eval results and curve are gone before it
    trains on, so they never sit beside newer checkpoints."""
    out = tmp_path / "out"
    assert cli_main(train_args(sft, out, **{"train.steps": 3, "checkpoint.every": 1})) == 0
    assert (out / "adapter").is_dir() and (out / "eval.json").is_file()
    proc = cli(*train_args(sft, out, **{"train.steps": 5000, "checkpoint.every": 1}), "--resume")
    metrics = out / "metrics.jsonl"
    while proc.poll() is None and len(metrics.read_text().splitlines()) < 6:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    step = steps_of(out)[-1]
    assert one_line(err) == (f"lora-jax train: stopped by SIGTERM at step {step}: checkpoint "
                             f"written in {out}/checkpoints; --resume continues")  # fmt: skip
    assert not any((out / n).exists() for n in ("adapter", "eval.json", "loss.png"))


def test_written_files_take_the_permissions_the_umask_gives(checkpoints, adapter_dir, tmp_path):
    """Weights, adapters and settings written atomically get a new file's usual mode (0644
    under umask 022), not a temporary file's private one: a server may run as another user."""
    umask = os.umask(0o022)
    os.umask(umask)
    out = tmp_path / "merged"
    assert cli_main(["merge", "--base", str(checkpoints / "llama"), "--adapter",
                     str(adapter_dir), "--out", str(out)]) == 0  # fmt: skip
    written = [*out.iterdir(), *adapter_dir.iterdir()]
    assert {"model.safetensors", "adapter_model.safetensors"} <= {f.name for f in written}
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in written} == {
        f.name: oct(0o666 & ~umask) for f in written}  # fmt: skip


def test_a_merge_replaces_an_older_model_whole_and_refuses_other_files(
    checkpoints, adapter_dir, tmp_path, capsys
):
    """--out holding an older sharded checkpoint: the new model takes its place whole (no
    shard or index of the old one beside it, which a loader would read instead); --out
    holding files that are no model's: refused, untouched."""
    out = tmp_path / "merged"
    out.mkdir()
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        save_file({"w": np.zeros(2, np.float32)}, out / name)
    (out / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    (out / "config.json").write_text('{"model_type": "llama"}')
    args = ["merge", "--base", str(checkpoints / "llama"), "--adapter", str(adapter_dir)]
    assert cli_main([*args, "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors"} <= names
    assert not any(n.startswith("model-0") or n.endswith("index.json") for n in names), names
    models.from_pretrained(out)  # loads the new model, whole
    capsys.readouterr()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    (mine / "config.json").write_text("{}")
    before = md5s(mine)
    assert cli_main([*args, "--out", str(mine)]) == 2
    assert f"{mine} holds files that are not a model's (notes.txt)" in one_line(
        capsys.readouterr().err
    )
    assert md5s(mine) == before and sorted(p.name for p in tmp_path.iterdir()) == ["merged", "mine"]


@pytest.mark.parametrize(
    ("setting", "says"),
    [
        (
            "lora.modules_to_save=['lm_haed']",
            "LoraConfig.modules_to_save 'lm_haed' matches nothing",
        ),
        ("lora.exclude=['q_prj']", "LoraConfig.exclude 'q_prj' matches nothing"),
        ("lora.rank_pattern={'v_prj': 4}", "LoraConfig.rank_pattern 'v_prj' matches nothing"),
        ("lora.alpha_pattern={'o_prj': 4.0}", "LoraConfig.alpha_pattern 'o_prj' matches nothing"),
    ],
)
def test_every_name_a_user_gives_must_match_something(sft, tmp_path, capsys, setting, says):
    """A typo in a pattern would train no head, or no other rank, and exit 0: refused,
    naming the setting and where it was searched, before the output directory is touched."""
    out = tmp_path / "out"
    assert cli_main([*train_args(sft, out), "--set", setting]) == 2
    assert says in one_line(capsys.readouterr().err)
    assert not out.exists()


def test_eval_refuses_settings_that_contradict_the_saved_adapter(sft, tmp_path, capsys):
    """`lora-jax eval` runs the saved adapter with the config's settings: one that would
    rescale or reshape it silently (another alpha, rank or targets) is refused, naming it."""
    out = tmp_path / "out"
    assert cli_main(train_args(sft, out, **{"train.steps": 2})) == 0
    capsys.readouterr()
    for setting, says in (
        ("lora.alpha=64.0", "lora.alpha: "),
        ("lora.use_rslora=True", "lora.alpha: "),
        ("lora.rank=4", "lora.rank: "),
        ("lora.targets=['q_proj']", "lora.targets: "),
    ):
        assert cli_main(["eval", *train_args(sft, out)[1:], "--set", setting]) == 2, setting
        err = one_line(capsys.readouterr().err)
        assert err.startswith(f"lora-jax eval: {says}{out}/adapter was saved"), err
    assert cli_main(["eval", *train_args(sft, out)[1:]]) == 0
    assert f"{out}/adapter on " in capsys.readouterr().out


def test_non_finite_settings_and_results_are_refused(sft, adapter_dir, checkpoints, tmp_path,
                                                     capsys):  # fmt: skip
    with pytest.raises(ValueError, match="alpha for 'alpha' is nan; must be a finite number"):
        lj.LoraConfig(alpha=float("nan"))
    assert cli_main([*train_args(sft, tmp_path / "out"), "--set", "train.learning_rate=1e999"]) == 2
    assert "train.learning_rate is inf; must be a finite number" in capsys.readouterr().err
    generate = ["generate", "--model", str(sft / "llama"), "--prompt", "w3 w4"]
    assert cli_main([*generate, "--temperature", "nan"]) == 2
    assert "temperature nan" in one_line(capsys.readouterr().err)
    # An adapter whose alpha overflows float32 merges into inf: nothing is written.
    huge = tmp_path / "huge"
    shutil.copytree(adapter_dir, huge)
    config = json.loads((huge / "adapter_config.json").read_text())
    (huge / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 1e300}))
    out = tmp_path / "merged"
    args = [
        "merge",
        "--base",
        str(checkpoints / "llama"),
        "--adapter",
        str(huge),
        "--out",
        str(out),
    ]
    assert cli_main(args) == 2
    err = one_line(capsys.readouterr().err)
    assert f"{out}: not written, " in err and "holds non-finite values" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["huge"]


def test_every_file_read_is_named_in_its_error(sft, tmp_path, capsys):
    """Damaged or wrong inputs of every kind end with one line naming the file (and line or
    key), never a traceback: weights, config.json, a config file, a run's metrics and
    settings record, a prompt template, an empty prompt."""
    broken = tmp_path / "broken"
    shutil.copytree(sft / "llama", broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    generate = ["generate", "--model", str(broken), "--prompt", "w3 w4"]
    assert cli_main(generate) == 2
    assert f"{weights}" in one_line(capsys.readouterr().err)
    shutil.copy(sft / "llama" / "model.safetensors", weights)
    (broken / "config.json").write_text('{"model_type": "lla')
    assert cli_main(generate) == 2
    assert f"{broken}/config.json: not valid JSON" in one_line(capsys.readouterr().err)
    shutil.copy(sft / "llama" / "config.json", broken / "config.json")
    (broken / "tokenizer.json").write_text('{"model": ')
    assert cli_main(generate) == 2
    assert f"{broken}/tokenizer.json: not a readable tokenizer" in one_line(capsys.readouterr().err)
    assert cli_main(["generate", "--model", str(sft / "llama"), "--prompt", ""]) == 2
    assert "prompt 1 ('') has no tokens" in one_line(capsys.readouterr().err)
    raising = tmp_path / "raising.py"
    raising.write_text("def get_config():\n    return {'train': 1 / 0}\n")
    assert cli_main(["train", "--config", str(raising)]) == 2
    assert f"{raising}:2: ZeroDivisionError: division by zero" in one_line(capsys.readouterr().err)
    for template in ("Q: {}", "{prompt:>999999999999}", "{prompt!r}"):
        assert cli_main([*train_args(sft, tmp_path / "t"), "--set", f"data.template={template}"
                         ]) == 2  # fmt: skip
        assert f"config data.template is {template!r}; must fill named fields" in one_line(
            capsys.readouterr().err)  # fmt: skip
    # A run's own files, damaged, on --resume.
    out = tmp_path / "out"
    assert cli_main(train_args(sft, out, **{"train.steps": 2, "checkpoint.every": 1})) == 0
    capsys.readouterr()
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "lo')
    resume = [*train_args(sft, out, **{"train.steps": 4, "checkpoint.every": 1}), "--resume"]
    assert cli_main(resume) == 2
    assert f"{out}/metrics.jsonl:3: not a JSON line" in one_line(capsys.readouterr().err)
    (out / "config.json").write_text('{"model": ')
    assert cli_main(resume) == 2
    assert f"{out}/config.json: not valid JSON" in one_line(capsys.readouterr().err)
    (out / "config.json").write_text('{"model": {}, "lora": {}, "data": "x", "train": {}}')
    assert cli_main(resume) == 2
    assert f"{out}/config.json: not a run's settings record (data is not an object)" in (
        one_line(capsys.readouterr().err))  # fmt: skip


def test_a_bad_eval_row_found_after_training_keeps_the_training_for_resume(sft, tmp_path, capsys):
    """The eval file's last row truncated (read only by the eval after the last step): one
    line naming file and row with the --resume hint, the last step checkpointed; the row
    fixed, --resume evaluates and saves without training again."""
    eval_file = tmp_path / "eval.jsonl"
    whole = (sft / "eval.jsonl").read_text()
    whole = whole * (300 // whole.count("\n") + 1)  # past the rows setup checks (256)
    eval_file.write_text(whole + '{"prompt": "ab')
    out = tmp_path / "out"
    args = train_args(sft, out, **{"data.eval": eval_file, "train.steps": 3})
    assert cli_main(args) == 2
    line = one_line(capsys.readouterr().err)
    assert str(eval_file) in line and "then --resume" in line, line
    assert not (out / "adapter").exists()
    eval_file.write_text(whole)
    assert cli_main([*args, "--resume"]) == 0
    printed = capsys.readouterr()
    assert "resumed from step 3" in printed.out + printed.err
    assert (out / "adapter" / "adapter_config.json").exists() and steps_of(out) == [1, 2, 3]


def test_training_on_nothing_is_refused_naming_the_setting(sft, tmp_path, capsys):
    """Prompts that fill data.max_length leave no response token to learn from: refused at
    setup from the first rows (nothing written); where a few rows keep some, the first
    batch with none stops the run before its step is saved, not a loss of 0 at every step."""
    prompt = " ".join(f"w{i % 90}" for i in range(40))  # past max_length 16
    cut = json.dumps({"prompt": prompt, "response": "w4 w5"}) + "\n"
    data = _write(tmp_path / "train.jsonl", cut * 20)
    out = tmp_path / "out"
    assert cli_main(train_args(sft, out, **{"data.train": data})) == 2
    line = one_line(capsys.readouterr().err)
    assert (f"{data}: none of the first 20 rows keeps a token to learn from within "
            "data.max_length 16") in line, line  # fmt: skip
    assert not out.exists()
    whole = json.dumps({"prompt": "w3", "response": "w4 w5"}) + "\n"
    _write(data, whole + cut * 299)
    assert cli_main(train_args(sft, out, **{"data.train": data, "data.pack": False})) == 2
    line = one_line(capsys.readouterr().err)
    assert re.search(r"step \d+: its batch keeps no token to learn from within data\.max_length "
                     r"16 .* stopped before saving anything from it", line), line  # fmt: skip
    assert not (out / "adapter").exists()


def test_a_parquet_struct_or_list_is_not_text(sft, tmp_path, capsys):
    """Parquet's nested columns read as dicts and lists: refused with file and row, not
    trained on as their Python text."""
    for column in ([{"a": 1}, {"a": 2}], [["w1"], ["w2"]]):
        data = tmp_path / "train.parquet"
        parquet.write_table(pa.table({"prompt": column, "response": ["w4", "w5"]}), data)
        assert cli_main(train_args(sft, tmp_path / "out", **{"data.train": data})) == 2
        line = one_line(capsys.readouterr().err)
        assert f"{data}: row 1: prompt is {column[0]!r}, not a string" in line, line


@pytest.mark.parametrize("resume", [[], ["--resume"]])
def test_a_run_stopped_before_it_has_outputs_puts_the_earlier_ones_back(
    sft, tmp_path, capsys, monkeypatch, resume
):
    """A refusal found after the directory was prepared (here: as the step is built), or
    Ctrl-C there, in a finished run's directory: its adapter, eval results, curve, metrics
    and checkpoints are all back as they were, fresh run or resumed (which may add an empty
    TensorBoard event file)."""
    out = tmp_path / "out"
    assert cli_main(train_args(sft, out, **{"train.steps": 2, "checkpoint.every": 1})) == 0
    capsys.readouterr()
    before = md5s(out)
    import lora_jax.train

    for error, code, says in ((ValueError("refused late"), 2, "refused late"),
                              (KeyboardInterrupt(), 130, "interrupted")):  # fmt: skip

        def fails(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(lora_jax.train, "make_train_step", fails)
        more = train_args(sft, out, **{"train.steps": 4, "checkpoint.every": 1})
        assert cli_main([*more, *resume]) == code
        assert one_line(capsys.readouterr().err) == f"lora-jax train: {says}"
        after = md5s(out)
        assert {f: after[f] for f in before} == before
        assert all("tfevents" in f and resume for f in set(after) - set(before))


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_killed_outright_in_setup_leaves_the_earlier_run_to_the_next(sft, tmp_path, resume):
    """A run killed outright (kill -9, the OOM killer: no `finally` runs) after it prepared a
    finished run's directory, before its first checkpoint: the earlier run's outputs lie
    aside, the killed run's record in their place. The next run to take the directory puts
    them back before it reads the record, whole (adapter, eval, record, checkpoints), so a
    --resume continues the run that owns the checkpoints."""
    out = tmp_path / "out"
    first = {"train.steps": 2, "checkpoint.every": 1}
    assert cli_main(train_args(sft, out, **first)) == 0
    before = md5s(out)
    # Killed: a fresh run of other settings, or a --resume to more steps.
    other = {"train.steps": 4, **({} if resume else {"lora.rank": 4})}
    settings = load_config(LLAMA_SFT, overrides(sft, out, **{**first, **other}))
    killed = RunDir(RunConfig.from_dict(settings), resume, main=True)
    killed.begin()
    killed.lock.release()  # what the OS does for a killed process; nothing else runs
    assert (out / ".replaced").is_dir() and md5s(out) != before
    following = RunDir(RunConfig.from_dict(load_config(LLAMA_SFT, overrides(sft, out, **first))),
                       True, main=True)  # fmt: skip
    following.close()  # it held the directory, and began nothing
    assert md5s(out) == before and not (out / ".replaced").exists()
    more = {**first, "train.steps": 3}
    assert cli_main([*train_args(sft, out, **more), "--resume"]) == 0
    assert steps_of(out) == [1, 2, 3]


def test_resume_needs_a_run_and_the_rows_it_began_on(sft, tmp_path, capsys):
    """--resume where no run is: refused, nothing created. After the training file lost a
    row: refused naming it (a checkpoint's row index would mean another row), nothing
    touched. The same rows with one replaced (a bad row fixed): said, then resumed."""
    out = tmp_path / "out"
    assert cli_main([*train_args(sft, out), "--resume"]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"lora-jax train: --resume: output_dir {out} holds no run to resume (no config.json); "
        "run without --resume to start one.")  # fmt: skip
    assert not out.exists()
    data = tmp_path / "train.jsonl"
    rows = (sft / "train.jsonl").read_text().splitlines(keepends=True)
    data.write_text("".join(rows))
    args = train_args(sft, out, **{"data.train": data, "train.steps": 2, "checkpoint.every": 1})
    assert cli_main(args) == 0
    capsys.readouterr()
    before = md5s(out)
    data.write_text("".join(rows[1:]))
    more = [*train_args(sft, out, **{"data.train": data, "train.steps": 3}), "--resume"]
    assert cli_main(more) == 2
    assert one_line(capsys.readouterr().err) == (
        f"lora-jax train: --resume: {data} has {len(rows) - 1} rows, the run began on "
        f"{len(rows)}: a checkpoint's place in it would mean other rows now. Restore the "
        "file, or start fresh (without --resume, or in another output_dir).")  # fmt: skip
    assert md5s(out) == before
    data.write_text("".join([rows[1], *rows[1:]]))  # the first row replaced
    assert cli_main(more) == 0
    printed = capsys.readouterr()
    assert f"--resume: {data} changed since the run began (the same {len(rows)} rows" in (
        printed.out + printed.err)  # fmt: skip
    assert steps_of(out) == [1, 2, 3]


def _workers(pid):
    """The data worker processes of a run (the children grain started, from its threads;
    not multiprocessing's resource tracker)."""
    children = [c for t in Path(f"/proc/{pid}/task").iterdir()
                for c in (t / "children").read_text().split()]  # fmt: skip
    found = []
    for child in map(int, children):
        with contextlib.suppress(OSError):
            command = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"resource_tracker" not in command:
                found.append(child)
    return found


def test_a_data_worker_killed_stops_the_run_with_its_steps_checkpointed(sft, tmp_path):
    """A data.workers process killed (as the OOM killer does): one line naming it, the steps
    done checkpointed, the --resume hint, no semaphore or shared memory left behind (what the
    killed worker held, multiprocessing's tracker releases, with no warning); --resume
    finishes."""
    shm = set(Path("/dev/shm").iterdir())
    out = tmp_path / "out"
    sets = overrides(sft, out, **{"train.steps": 5000, "checkpoint.every": 1,
                                  "data.workers": 2})  # fmt: skip
    run = cli("train", "--config", LLAMA_SFT, *as_args(sets))
    metrics = out / "metrics.jsonl"
    while run.poll() is None and (not metrics.exists() or len(steps_of(out)) < 3):
        time.sleep(0.05)
    workers = _workers(run.pid)
    assert len(workers) == 2, workers
    os.kill(workers[0], signal.SIGKILL)
    _, err = run.communicate(timeout=300)
    assert run.returncode == 2, err[-3000:]
    line = one_line(err)
    found = re.fullmatch(
        r"lora-jax train: a data\.workers process ended \(killed by SIGKILL; "
        r"the OS ends one that runs out of memory\) \(stopped at step (\d+): "
        rf"checkpoint written in {out}/checkpoints; --resume continues\)",
        line,
    )
    assert found, line
    assert "leaked" not in err and set(Path("/dev/shm").iterdir()) <= shm, err[-3000:]
    step = int(found[1])
    assert step >= 3 and str(step) in {p.name for p in (out / "checkpoints").iterdir()}
    resumed = cli("train", "--config", LLAMA_SFT, *as_args(sets), "--set",
                  f"train.steps={step + 2}", "--resume")  # fmt: skip
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert steps_of(out)[-1] == step + 2


def test_a_bad_row_read_by_a_data_worker_stops_cleanly(sft, tmp_path):
    """A bad row past the rows setup checks, read by a data.workers process: one line naming
    file and row, the steps done checkpointed, nothing of the workers left (no leak
    warning, no shared memory)."""
    shm = set(Path("/dev/shm").iterdir())
    rows = (sft / "train.jsonl").read_text()
    data = _write(tmp_path / "train.jsonl", rows * 5 + '{"prompt": 5, "response": "w4"}\n' + rows)
    out = tmp_path / "out"
    sets = overrides(sft, out, **{"train.steps": 100, "checkpoint.every": 1, "data.workers": 2,
                                  "data.train": data})  # fmt: skip
    run = cli("train", "--config", LLAMA_SFT, *as_args(sets))
    _, err = run.communicate(timeout=300)
    assert run.returncode == 2, err[-3000:]
    line = one_line(err)
    assert re.fullmatch(rf"lora-jax train: {data}:321: prompt is 5, not a string\. \(stopped at "
                        rf"step \d+: checkpoint written in {out}/checkpoints; fix the row, then "
                        r"--resume\)", line), line  # fmt: skip
    assert "leaked" not in err and set(Path("/dev/shm").iterdir()) <= shm, err[-3000:]


def test_a_tfds_set_not_prepared_is_one_line(sft, tmp_path):
    """A TFDS folder with a version but no prepared split (as an interrupted `tfds build`
    leaves it): the refusal alone, no warning of tfds's own before it."""
    (tmp_path / "tfds" / "mnist" / "3.0.1").mkdir(parents=True)
    env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "tfds"))
    run = cli(*train_args(sft, tmp_path / "out", **{"data.train": "tfds:mnist"}), env=env)
    _, err = run.communicate(timeout=300)
    assert run.returncode == 2
    assert [line for line in err.splitlines() if line.strip()] == [one_line(err)], err
    assert one_line(err).startswith("lora-jax train: tfds:mnist: split 'train' could not be")
