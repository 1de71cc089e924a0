"""A run whose base, data and output_dir are in a bucket against the same run on local disk:
the time of the steps between checkpoints, one table (#52: within 5%; checkpoints stay
asynchronous).

The bucket is fake-gcs-server on localhost (tests/buckets.py, the tests' server), so what is
measured is lora_jax's own cost of a bucket (the path layer, the metrics mirror, orbax's
asynchronous writes through tensorstore), not a network's. The model is a random Llama
(hidden 512, 4 layers) with the tests' word tokenizer, trained 60 steps with a checkpoint
every 10. Each run is its own `lora-jax train` process; local and bucket runs alternate, two
of each. A step's time is its tokens over its tokens/s (metrics.jsonl); the first 5 steps
(compilation) and each checkpoint step and the one after it are left out.

  python bench/bucket_run.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from buckets import Server  # noqa: E402 (the tests' GCS server)
from hf_peer import write_reversal_set, write_word_tokenizer  # noqa: E402

MODEL = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=1024,
             hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False,
             eos_token_id=2, pad_token_id=0)  # fmt: skip
STEPS, EVERY = 60, 10


def inputs(root: Path) -> Path:
    """The checkpoint and an SFT set (the tests' reversed-words task) in `root`."""
    from lora_jax import models

    models.random_checkpoint(root / "llama", MODEL)
    write_word_tokenizer(root / "llama")
    write_reversal_set(root, {"train": 4096, "eval": 64}, words=24)
    return root


def run(where: str, out: str, env: dict) -> list[float]:
    """One `lora-jax train` with everything under `where`; its step times."""
    sets = {"model.path": f"{where}/llama", "model.dtype": "float32", "model.remat": "none",
            "data.train": f"{where}/train.jsonl", "data.eval": f"{where}/eval.jsonl",
            "data.template": "{prompt}", "data.max_length": 64, "train.steps": STEPS,
            "train.batch_size": 16, "train.grad_accum": 1, "train.warmup_steps": 1,
            "checkpoint.every": EVERY, "mesh.devices": 1, "output_dir": out}  # fmt: skip
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    command = [sys.executable, "-m", "lora_jax.cli", "train", "--config",
               str(ROOT / "configs" / "llama3_1b_sft.py"), *args]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"a run failed: {done.stderr[-3000:]}")
    from lora_jax import files

    lines = files.path(f"{out}/metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    tokens = 16 * 64
    return [tokens / r["tokens_per_s"] for r in rows
            if r["step"] > 5 and r["step"] % EVERY not in (0, 1)]  # fmt: skip


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="lj_bucket_bench_"))
    local = inputs(tmp / "inputs")
    server = Server(str(tmp / "gcs"))
    env = dict(os.environ, STORAGE_EMULATOR_HOST=server.url, JAX_PLATFORMS="cpu",
               LORA_JAX_CACHE=str(tmp / "cache"))  # fmt: skip
    os.environ["STORAGE_EMULATOR_HOST"] = server.url
    from lora_jax import files

    files.path(server.folder())  # this process's client pointed at the server, as the runs'
    try:
        bucket = server.put(local, f"{server.folder()}/inputs")
        times: dict[str, list[float]] = {"local": [], "bucket": []}
        for i in range(2):
            times["local"] += run(str(local), str(tmp / f"run{i}"), env)
            times["bucket"] += run(bucket, f"{bucket}/run{i}", env)
    finally:
        server.stop()
    print(f"random Llama {MODEL['hidden_size']}x{MODEL['num_hidden_layers']}, {STEPS} steps, "
          f"checkpoint every {EVERY}; steps between checkpoints, 2 runs each")  # fmt: skip
    print(f"{'where':>7}  {'steps':>5}  {'median s':>8}  {'p90 s':>6}  {'vs local':>8}")
    base = float(np.median(times["local"]))
    for name, t in times.items():
        print(f"{name:>7}  {len(t):>5}  {np.median(t):>8.4f}  {np.percentile(t, 90):>6.4f}  "
              f"{np.median(t) / base:>8.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
