"""`lora-jax merge`'s peak memory against what it may hold: the largest shard file of the base
plus the adapter plus 20% (#52's bound), one table.

The base is the random Llama of bench/sharded_load.py (about 1.3 GB, float32), as one file
and resharded into files of about 300 MB; the adapter is rank 16 on every projection, saved by
lora_jax in peft's format. Each merge runs alone in its own interpreter (VmHWM: its peak
resident memory). "above tiny" is the peak less that of the same merge of a tiny checkpoint
(jax, XLA and the zoo loaded): what the model costs. The last row is the library's whole-tree
way (from_pretrained, lj.merge, save_pretrained), which `lora-jax merge` used before.

  python bench/merge_memory.py                 # writes the checkpoints to $TMPDIR once
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from sharded_load import BASE, TINY, checkpoint

RESHARD = """
import json, sys
from pathlib import Path
from safetensors import safe_open
from safetensors.numpy import save_file
src, out, limit = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
out.mkdir()
groups, size = [[]], 0
with safe_open(src / "model.safetensors", "numpy") as f:
    for name in f.keys():
        n = f.get_slice(name)
        nbytes = 4 * __import__("math").prod(n.get_shape())
        if groups[-1] and size + nbytes > limit:
            groups.append([]); size = 0
        groups[-1].append(name); size += nbytes
    weight_map = {}
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: f.get_tensor(n) for n in names}, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
(out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
(out / "config.json").write_text((src / "config.json").read_text())
"""

ADAPTER = """
import sys, jax, jax.numpy as jnp
import lora_jax as lj
from lora_jax import models
base, out = sys.argv[1], sys.argv[2]
model, params, hf = models.abstract_pretrained(models.config_of(base))
config = lj.LoraConfig(rank=16, targets="all-linear")
layouts = lj.kernel_layouts(model, jnp.zeros((1, 2), jnp.int32))
adapter = lj.init(jax.random.key(0), params, config, layouts)
adapter = jax.tree.map(lambda x: jnp.full(x.shape, 0.01, x.dtype), lj.split(adapter, config)[0])
lj.save_adapter(out, adapter, config, hf_config=hf)
"""

MERGE = """
import re, sys
base, adapter, out, way = sys.argv[1:5]
if way == "streamed":
    from lora_jax.cli import main
    assert main(["merge", "--base", base, "--adapter", adapter, "--out", out]) == 0
else:
    import lora_jax as lj
    from lora_jax import models
    model, params, hf = models.from_pretrained(base)
    tree, config = lj.load_adapter(adapter, params)
    models.save_pretrained(lj.merge(lj.combine(tree, params), config), hf, out)
print(int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())[1]) * 1024)
"""


def run(script: str, *args: object) -> str:
    """`script` in a new CPU interpreter; its last line of output."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env,
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode:
        raise SystemExit(f"a child failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def size_of(directory: Path, pattern: str) -> tuple[int, int]:
    """(largest, total) bytes of the files matching `pattern`."""
    sizes = [f.stat().st_size for f in directory.glob(pattern)]
    return max(sizes), sum(sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "lj_load_bench")
    parser.add_argument("--shard-mb", type=int, default=300)
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    base, tiny = checkpoint(args.dir, "base", BASE), checkpoint(args.dir, "tiny", TINY)
    sharded = args.dir / f"base-{args.shard_mb}mb"
    if not sharded.exists():
        run(RESHARD, base, sharded, args.shard_mb * 2**20)
    adapters = {}
    for name, path in (("base", base), ("tiny", tiny)):
        adapters[name] = args.dir / f"adapter-{name}"
        if not adapters[name].exists():
            run(ADAPTER, path, adapters[name])
    adapter = size_of(adapters["base"], "*.safetensors")[1]
    gib = 2**30
    print(f"base {size_of(base, '*.safetensors')[1] / gib:.2f} GiB (float32); adapter "
          f"{adapter / 2**20:.1f} MiB; CPU")  # fmt: skip
    print(f"{'base files':>18}  {'way':>8}  {'largest file':>12}  {'bound':>6}  "
          f"{'peak RSS':>8}  {'above tiny':>10}  {'fits':>4}")  # fmt: skip
    for label, path, way in (("one file", base, "streamed"), (f"{args.shard_mb} MB shards",
                             sharded, "streamed"), ("one file", base, "whole")):  # fmt: skip
        floor = int(run(MERGE, tiny, adapters["tiny"], args.dir / "out-tiny", way))
        peak = int(run(MERGE, path, adapters["base"], args.dir / "out", way))
        largest = size_of(path, "*.safetensors")[0]
        bound = 1.2 * (largest + adapter)
        print(f"{label:>18}  {way:>8}  {largest / gib:>10.2f} G  {bound / gib:>4.2f} G  "
              f"{peak / gib:>6.2f} G  {(peak - floor) / gib:>8.2f} G  "
              f"{'yes' if peak <= bound else 'no':>4}")  # fmt: skip
    print(re.sub(r"\s+", " ", "peak RSS: the merging process's VmHWM; bound: 1.2 x (largest "
                 "file + adapter)"))  # fmt: skip


if __name__ == "__main__":
    main()
