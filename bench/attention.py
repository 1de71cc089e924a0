"""One layer's attention alone: lora_jax's XLA attention against JAX's and torch's, one table.

At the train bench's shape (`train_throughput.SIZES`: 8 query heads sharing 2 key heads of
64, batch 4 x 256, causal, float32), times the forward and the forward + backward (gradients
of q, k, v) of:
  jax.nn        jax.nn.dot_product_attention(implementation="xla"), what the zoo called before
  lora_jax      lora_jax.models.common.attend in XLA (query heads stacked per key head)
  torch SDPA    torch.nn.functional.scaled_dot_product_attention(enable_gqa=True)
each side in its own process, in the environment `lora-jax train` gives itself (malloc in
huge pages), in alternating rounds, the best round kept; median of the calls of a round.

    python bench/attention.py [--size cpu] [--batch 4] [--seq 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from train_throughput import SIZES, keep_best, run_script, run_worker, shape_parser, timed

SIDES = ("jax.nn", "lora_jax", "torch SDPA")


def jax_worker(side: str, shape: tuple[int, ...], calls: int) -> dict:
    import jax
    import jax.numpy as jnp

    from lora_jax.models import common

    batch, seq, heads, kv, dim = shape
    q, k, v = (jax.random.normal(jax.random.key(i), (batch, seq, n, dim))
               for i, n in enumerate((heads, kv, kv)))  # fmt: skip
    if side == "jax.nn":

        def attention(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    else:

        def attention(q, k, v):
            return common.attend(q, k, v, None, causal=True, implementation="xla")

    weights = jax.random.normal(jax.random.key(9), q.shape)
    forward = jax.jit(attention)
    backward = jax.jit(jax.grad(lambda *a: jnp.sum(attention(*a) * weights), (0, 1, 2)))
    return {"forward": timed(lambda: jax.block_until_ready(forward(q, k, v)), calls),
            "backward": timed(lambda: jax.block_until_ready(backward(q, k, v)), calls)}  # fmt: skip


def torch_worker(shape: tuple[int, ...], calls: int) -> dict:
    import torch

    batch, seq, heads, kv, dim = shape
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, n, seq, dim, requires_grad=True) for n in (heads, kv, kv))
    weights = torch.randn(batch, heads, seq, dim)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def forward():
        with torch.no_grad():
            sdpa(q, k, v, is_causal=True, enable_gqa=True)

    def backward():
        q.grad = k.grad = v.grad = None
        (sdpa(q, k, v, is_causal=True, enable_gqa=True) * weights).sum().backward()

    return {"forward": timed(forward, calls), "backward": timed(backward, calls)}


def main() -> None:
    p = shape_parser(__doc__)
    p.add_argument("--calls", type=int, default=20, help="timed calls per round (median)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (best kept)")
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = p.parse_args()
    hidden, _, heads, kv, *_ = SIZES[args.size]
    shape = (args.batch, args.seq, heads, kv, hidden // heads)
    if args.worker:
        out = (torch_worker(shape, args.calls) if args.worker == "torch SDPA"
               else jax_worker(args.worker, shape, args.calls))  # fmt: skip
        print("RESULT " + json.dumps(out))
        return

    import jax
    import torch

    from lora_jax.launch import huge_pages_env

    env = huge_pages_env(dict(os.environ)) or dict(os.environ)
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for side in SIDES:
            command = [sys.executable, __file__, "--worker", side, "--size", args.size,
                       "--batch", str(args.batch), "--seq", str(args.seq),
                       "--calls", str(args.calls)]  # fmt: skip
            keep_best(best, side, run_worker(command, env), "backward")
    print(
        f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}, torch "
        f"{torch.__version__}; GLIBC_TUNABLES={env.get('GLIBC_TUNABLES', '')!r}"
    )
    print(f"causal attention, batch {args.batch} x {args.seq}, {heads} query heads on {kv} key "
          f"heads of {hidden // heads}, float32; best of {args.rounds} alternating rounds, "
          f"median of {args.calls} calls")  # fmt: skip
    print("| side | forward ms | forward + backward ms | vs jax.nn (fwd + bwd) |")
    print("| --- | ---: | ---: | ---: |")
    reference = best["jax.nn"].get("backward")
    for side, r in best.items():
        if "error" in r:
            print(f"| {side} | failed: {r['error']} | | |")
            continue
        ratio = f"{reference / r['backward']:.2f}x" if reference else "-"
        print(f"| {side} | {r['forward'] * 1e3:.2f} | {r['backward'] * 1e3:.2f} | {ratio} |")


if __name__ == "__main__":
    run_script(main)
