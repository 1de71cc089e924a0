"""Helpers for tests that run `lora-jax train` on the tiny Llama SFT set (the `sft` fixture
in conftest.py): the overrides that point the shipped config at it, and reading its outputs."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LLAMA_SFT = str(ROOT / "configs" / "llama3_1b_sft.py")


def overrides(sft, out, **changes):
    """--set entries that point the shipped Llama SFT config at the tiny checkpoint."""
    base = {
        "model.path": sft / "llama", "model.dtype": "float32", "model.compute_dtype": None,
        "model.remat": "none", "data.train": sft / "train.jsonl", "data.eval": sft / "eval.jsonl",
        "data.template": "{prompt}", "data.max_length": 16, "train.steps": 5,
        "train.batch_size": 8, "train.grad_accum": 2, "train.learning_rate": 3e-2,
        "train.warmup_steps": 1, "lora.dropout": 0.0, "checkpoint.every": 0,
        "mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1, "mesh.devices": 1, "output_dir": out,
    }  # fmt: skip
    base.update(changes)
    return [f"{k}={v}" if isinstance(v, str | Path) else f"{k}={v!r}" for k, v in base.items()]


def as_args(sets):
    return [arg for s in sets for arg in ("--set", s)]


def losses(out):
    return np.array([json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").open()])


def quiet(*_):
    pass


def cli(*args, env=None, **popen):
    command = [sys.executable, "-m", "lora_jax.cli", *map(str, args)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)  # fmt: skip
