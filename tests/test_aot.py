"""`lora-jax compile`: the train step compiled ahead of time by the real TPU compiler (libtpu,
no TPU), its per-chip report, and the sharding that makes it fit."""

import json
import re
import signal
import subprocess
import sys
import time

import pytest
from sft_runs import LLAMA_SFT, ROOT, as_args

from lora_jax import aot
from lora_jax import data as data_lib
from lora_jax.settings import DataSettings, load_config
from lora_jax.tasks import TASKS, Encoder

GIB = 2**30
CONFIG_70B = str(ROOT / "configs" / "llama3_70b_sft.py")
# A small decoder whose step compiles in seconds.
SMALL = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=512,
             hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=4096)  # fmt: skip


def compile_cli(config_dir, topology, **sets):
    """`lora-jax compile --json` on the shipped Llama SFT config, as a user runs it."""
    settings = {"model.path": str(config_dir), "model.remat": "projections",
                "train.grad_accum": 1, **sets}  # fmt: skip
    args = as_args(f"{k}={v}" for k, v in settings.items())
    command = [sys.executable, "-m", "lora_jax.cli", "compile", "--config", LLAMA_SFT,
               "--topology", topology, "--json", *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True)


@pytest.fixture(scope="module")
def small_config(tmp_path_factory):
    """A checkpoint directory holding config.json alone: compiling reads nothing else."""
    directory = tmp_path_factory.mktemp("config_only")
    (directory / "config.json").write_text(json.dumps(SMALL))
    return directory


def test_compile_reports_a_step_that_fits_a_v5e_slice(small_config):
    done = compile_cli(small_config, "v5e:2x2", **{"data.max_length": 256,
                                                    "train.batch_size": 8})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    report = json.loads(done.stdout)
    assert report["topology"] == "v5e:2x2" and report["chips"] == 4
    assert report["fits"] is True
    # The compiler's own HBM figure for a v5e chip (16 GiB, 15.75 usable).
    assert report["hbm_bytes"] == round(15.75 * GIB)
    assert 0 < report["bytes"] < report["hbm_bytes"]
    assert report["base_bytes"] > 0 and report["trained_bytes"] > 0
    assert report["tokens_per_chip"] == 8 * 256 // 4
    assert report["remat"] == "projections" and report["micro_batch"] == 8


@pytest.mark.parametrize("topology, chips", [("v4:2x2x2", 8), ("v5p-8", 4)])
def test_two_core_chips_compile_as_one_device_each(small_config, topology, chips):
    """v4 and v5p chips (two TensorCores each, the docs' own `v4:2x2x2`) compile as one
    device a chip (megacore), not a traceback from the mesh."""
    done = compile_cli(small_config, topology, **{"data.max_length": 128,
                                                   "train.batch_size": 8})  # fmt: skip
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["chips"] == chips and report["fits"] is True


@pytest.mark.parametrize("change, says", [
    ({"hidden_size": None}, "no 'hidden_size', which a llama model needs"),
    ({"num_attention_heads": 0}, "num_attention_heads is 0: a model size is a whole number"),
    ({"num_hidden_layers": 0}, "num_hidden_layers is 0: a model size"),
    ({"vocab_size": 10**12}, "vocab_size is 1000000000000: a model size"),
    ({"intermediate_size": "128"}, "intermediate_size is '128': a model size"),
    # Settings of another type than the family reads (as config.json's own names say).
    ({"rope_scaling": {"rope_type": "linear", "factor": "x"}},
     "rope_factor is 'x' (from config.json), not a finite number"),
    ({"tie_word_embeddings": "false"},
     "tie_word_embeddings is 'false' (from config.json), not true or false"),
])  # fmt: skip
def test_a_config_json_that_is_no_model_is_refused(tmp_path, change, says):
    """Missing or absurd sizes in config.json, or settings of the wrong type: one line naming
    the file and the key, exit 2, not a traceback nor a "fits" for a model of nothing (or
    for one tied by the string "false")."""
    config = {k: v for k, v in {**SMALL, **change}.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(config))
    done = compile_cli(tmp_path, "v5e-4")
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("lora-jax ")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines[0].startswith(f"lora-jax compile: {tmp_path}/config.json: {says}"), lines


def test_more_devices_than_the_slice_has_are_refused(small_config):
    done = compile_cli(small_config, "v5e-4", **{"mesh.devices": 8})
    assert done.returncode == 2, done.stderr[-3000:]
    assert "lora-jax compile: mesh.devices 8: there are 4 devices (TPU v5 lite)" in done.stderr


def test_an_oversized_batch_reports_no_fit_with_exit_1(small_config):
    # 1024 rows of 512 tokens a chip, nothing rematerialised: tens of GiB of activations.
    done = compile_cli(small_config, "v5e-4", **{"data.max_length": 512,
                                                  "train.batch_size": 4096,
                                                  "model.remat": "none"})  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    report = json.loads(done.stdout)
    assert report["fits"] is False and report["topology"] == "v5e-4" and report["chips"] == 4
    assert report["bytes"] > report["hbm_bytes"]


def test_weights_that_overflow_a_chip_are_no_fit_without_a_compile(tmp_path):
    """A vocabulary of 2^31 - 1 (a size, but absurd): the embeddings alone overflow a v5e
    chip, said at once with exit 1, not minutes of compiling."""
    (tmp_path / "config.json").write_text(json.dumps({**SMALL, "vocab_size": 2**31 - 1}))
    done = compile_cli(tmp_path, "v5e-4", **{"train.batch_size": 8})
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["fits"] is False and report["compiled"] is False and report["temp_bytes"] == 0
    assert report["base_bytes"] > report["hbm_bytes"] and report["bytes"] > report["hbm_bytes"]
    line = aot.Report(**report).line()
    assert line.endswith("does NOT fit; not compiled: the weights alone overflow a chip"), line


def test_a_bad_topology_is_one_line_naming_the_accepted_forms(small_config):
    done = compile_cli(small_config, "v5e-7", **{"train.batch_size": 8})
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "'v5e-7'" in lines[0] and "v5e:4x4" in lines[0]
    assert "v4-N" in lines[0]


def test_without_libtpu_the_error_names_the_extra(small_config, tmp_path, monkeypatch):
    shadow = tmp_path / "libtpu"  # an import of libtpu fails, as where it is not installed
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('not installed here')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    done = compile_cli(small_config, "v5e:2x2", **{"train.batch_size": 8})
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines()[-1] == (
        "lora-jax compile: compiling for a TPU needs libtpu at jax's version: pip install "
        '"lora_jax[tpu]" (or "jax[tpu]"); no TPU is needed.'
    )
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("given", "jax_name"),
    [("v5e:4x4", "v5e:4x4"), ("v5e-16", "v5e:4x4"), ("v5litepod-64", "v5e:8x8"),
     ("v6e-8", "v6e:2x4"), ("v4-32", "v4:2x2x4"), ("v5p-8", "v5p:2x2x1"), ("v5e-1", "v5e:1x1")],
)  # fmt: skip
def test_topology_names_in_both_forms(given, jax_name):
    assert aot.topology_name(given) == jax_name


@pytest.mark.parametrize("given", ["v5e:0x2", "v5e:2x2x2x2", "v6e-3", "v5e-", "tpu", "v5e:2x2 "])
def test_a_topology_of_no_slice_is_refused_by_name(given):
    with pytest.raises(ValueError, match=f"topology {re.escape(repr(given))} is not a TPU "
                                         "topology this knows"):  # fmt: skip
        aot.topology_name(given)


def test_the_batch_is_split_over_chips_not_replicated(small_config):
    """The same global batch on twice the chips needs about half the temporaries a chip:
    the zoo pins its activations to the batch's split (`sharding.constrain_batch`). Left to
    XLA, every chip held every row's activations (the 8B step needed 77 GiB a chip)."""
    config = load_config(LLAMA_SFT, [f"model.path={small_config}", "model.remat=projections",
                                     "data.max_length=512", "train.batch_size=32",
                                     "train.grad_accum=1"])  # fmt: skip
    four, eight = (aot.compile_step(config, SMALL, t) for t in ("v5e:2x2", "v5e:2x4"))
    assert four.fits and eight.fits
    assert four.tokens_per_chip == 2 * eight.tokens_per_chip
    assert eight.temp_bytes < 0.65 * four.temp_bytes, (four, eight)


@pytest.mark.parametrize("task", ["classify", "sft"])
def test_batch_shapes_are_what_encode_gives(task, sft):
    model_dir = sft / "llama"
    tokenizer = data_lib.Tokenizer(model_dir, json.loads((model_dir / "config.json").read_text()))
    data = DataSettings(task=task, max_length=8, template="{prompt}")
    rows = [{"text": "w3 w4", "label": 1, "prompt": "w5 w6", "response": "w7"}] * 3
    encoded = data_lib.encoded(rows, Encoder(TASKS[task], tokenizer, data), length=data.max_length)
    assert {k: (v.shape, v.dtype) for k, v in encoded.items()} == TASKS[task].batch_shapes(data, 3)


def test_search_finds_the_largest_micro_batch_that_fits(tmp_path):
    # 64 thin layers of 4096 tokens, nothing rematerialised: about 5 GiB a row a chip, so
    # the search tries 1, 2 and 4 rows a chip (scanned layers compile once, in seconds).
    deep = dict(SMALL, num_hidden_layers=64)
    (tmp_path / "config.json").write_text(json.dumps(deep))
    config = load_config(LLAMA_SFT, [f"model.path={tmp_path}", "data.max_length=4096",
                                     "train.batch_size=4", "train.grad_accum=1"])  # fmt: skip
    best, tried = aot.search(config, deep, "v5e:2x2", policies=("none",), log=lambda _: None)
    assert [(r.micro_batch // 4, r.fits) for r in tried] == [(1, True), (2, True), (4, False)]
    assert best == tried[1] and best.remat == "none" and best.tokens_per_chip == 2 * 4096


@pytest.mark.parametrize("expert", [1, 2])
def test_a_mixture_of_experts_step_compiles_for_tpu(tmp_path, expert):
    """A Mixtral's LoRA step, every expert adapted inside the grouped matmuls
    (jax.lax.ragged_dot) and the router trained with its load-balancing loss, compiles for a
    v5e slice, with the experts split over an expert axis too (shard_map, the ring of
    experts; the 8x7B config's rows are in bench/RESULTS.md)."""
    moe = dict(SMALL, model_type="mixtral", architectures=["MixtralForCausalLM"],
               num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.02)  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(moe))
    done = compile_cli(tmp_path, "v5e:2x2", **{
        "data.max_length": 256, "train.batch_size": 8,
        "lora.targets": '["attention", "experts", "mlp/gate$"]',
        "lora.rank_pattern": '{"mlp/gate": 4}', "mesh.expert": expert})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    report = json.loads(done.stdout)
    assert report["fits"] is True and report["chips"] == 4
    assert report["mesh"]["expert"] == expert and report["tokens_per_chip"] == 8 * 256 // 4


# Llama-3-70B's shapes: XLA compiles its step for a v5e-64 in minutes on this machine.
LLAMA_70B = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256,
                 hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                 num_attention_heads=64, num_key_value_heads=8,
                 max_position_embeddings=131072, rope_theta=500000.0)  # fmt: skip


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_ends_a_long_compile_at_once(tmp_path, signum):
    """Ctrl-C or SIGTERM while XLA compiles (which holds its thread in C++, where Python's
    handlers cannot run) ends the command in one line with 130 / 143, not when the minutes
    of compiling are over: the compile runs in a thread the command waits for. The signal
    comes once tracing (seconds) is done; under load it may come sooner, and is handled
    all the same."""
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_70B))
    command = [sys.executable, "-m", "lora_jax.cli", "compile", "--config", CONFIG_70B,
               "--topology", "v5e-64", "--set", f"model.path={tmp_path}"]  # fmt: skip
    run = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    while not run.stderr.readline().startswith("compiling for"):
        assert run.poll() is None
    time.sleep(15)
    run.send_signal(signum)
    _, err = run.communicate(timeout=120)  # the compile alone takes minutes more
    assert run.returncode == 128 + signum, err[-3000:]
    assert [line for line in err.splitlines() if line.strip()] == ["lora-jax compile: interrupted"]
