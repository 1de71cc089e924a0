"""Loading a base over 8 devices in 1, 2 and 4 processes (`models.from_pretrained(mesh=...)`,
what `lora-jax train` does): each process's peak RSS against the share of the base its
devices hold, one table.

The checkpoint is a random Llama of about 1.3 GB (float32, safetensors), split over fsdp 8 by
the zoo's rules. Each process runs alone in its own interpreter, joined by jax.distributed on
localhost, with 8 / n simulated CPU devices. "above tiny" is the peak RSS less that of the
same load of a tiny checkpoint (jax, XLA and the zoo loaded): what the base itself costs. The
last row is the load before this change, for comparison: every tensor read whole onto one
device, then placed in its sharding (`jax.device_put`), one process.

  python bench/sharded_load.py                 # writes the checkpoints to $TMPDIR once
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

BASE = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=32000,
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=16,
            num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False,
            eos_token_id=2, pad_token_id=0)  # fmt: skip
TINY = dict(BASE, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4)  # fmt: skip

LOAD = """
import json, re, sys
import jax
n, pid, port, path, way = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
if n > 1:
    jax.distributed.initialize(f"localhost:{port}", n, pid)
from lora_jax import models, sharding
mesh = sharding.make_mesh(1, 8, 1)
if way == "sharded":
    _, params, _ = models.from_pretrained(path, mesh=mesh)
else:  # whole onto one device, then placed
    model, params, hf = models.from_pretrained(path)
    rules = models.hub.family_of(hf)[0].rules
    params = jax.device_put(params, sharding.param_shardings(params, mesh, rules))
jax.block_until_ready(params)
held = sum(s.data.nbytes for a in jax.tree.leaves(params) for s in a.addressable_shards)
# VmHWM, not getrusage's ru_maxrss: that one keeps the parent's peak across fork and exec.
peak = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())[1]) * 1024
print(json.dumps({"held": held, "rss": peak}))
"""


def checkpoint(root: Path, name: str, hf_config: dict) -> Path:
    """A random checkpoint of `hf_config` in `root`, written once (in a child process: this
    one stays small)."""
    path = root / name
    if not (path / "config.json").exists():
        write = (
            "import json, sys; from lora_jax import models; "
            "models.random_checkpoint(sys.argv[1], json.loads(sys.argv[2]))"
        )
        subprocess.run([sys.executable, "-c", write, str(path), json.dumps(hf_config)],
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), check=True)  # fmt: skip
    return path


def load(path: Path, processes: int, way: str = "sharded") -> list[dict]:
    """Each process's {held, rss} loading `path` over 8 devices in `processes` processes."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // processes}")  # fmt: skip
    procs = [subprocess.Popen([sys.executable, "-c", LOAD, str(processes), str(pid), str(port),
                               str(path), way], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for pid in range(processes)]  # fmt: skip
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=1800)
        if p.returncode:
            raise SystemExit(f"a loading process failed ({p.returncode}): {stderr[-2000:]}")
        out.append(json.loads(stdout.splitlines()[-1]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "lj_load_bench")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    base, tiny = checkpoint(args.dir, "base", BASE), checkpoint(args.dir, "tiny", TINY)
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    gib = 2**30
    print(f"checkpoint {size / gib:.2f} GiB (float32), 8 CPU devices, mesh fsdp 8")
    print(f"{'processes':>9}  {'way':>8}  {'holds GiB':>9}  {'peak RSS GiB':>12}  "
          f"{'above tiny':>10}  {'above tiny / holds':>18}")  # fmt: skip
    rows = [(n, "sharded") for n in (1, 2, 4)] + [(1, "whole")]
    for n, way in rows:
        floor = max(r["rss"] for r in load(tiny, n, way))
        for r in load(base, n, way)[:1]:  # the processes are alike: process 0's
            above = r["rss"] - floor
            print(f"{n:>9}  {way:>8}  {r['held'] / gib:>9.2f}  {r['rss'] / gib:>12.2f}  "
                  f"{above / gib:>10.2f}  {above / r['held']:>18.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
