"""Where the LoRA backward's time goes: XLA's own per-op profile of the bench's LoRA loss.

Profiles (jax.profiler, the thunk runtime's per-HLO-op events) the compiled forward and
value_and_grad of the public-API LoRA loss, and value_and_grad of full fine-tuning, on the
bench's Llama shape with random weights, and prints one table: milliseconds per call by op
kind, each op classified from the compiled HLO (a fusion by what it computes). Containers
(while loops of the layer scan, calls) are left out, so their bodies are not counted twice.
Then the backward's ten slowest ops, with shapes.

    python bench/profile_backward.py                  # the CPU shape of train_throughput.py
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile

from train_throughput import (
    ALPHA,
    RANK,
    SIZES,
    TARGETS,
    hf_config,
    run_script,
    shape_parser,
)

CONTAINERS = {"while", "call", "conditional"}
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")
COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")


def hlo_ops(text: str) -> dict[str, tuple[str, str]]:
    """{instruction name: (kind, result shape)} of a compiled HLO module's text; a fusion's
    kind says what its fused computation holds (a dot, a transpose, a reduce, else loop), and
    a dot with a rank-sized axis is an adapter's thin product."""
    bodies: dict[str, list[str]] = collections.defaultdict(list)
    current = None
    raw: dict[str, tuple[str, str, str]] = {}
    for line in text.splitlines():
        if m := COMPUTATION.match(line):
            current = m.group(1)
        elif m := INSTRUCTION.match(line):
            name, shape, opcode, rest = m.groups()
            bodies[current].append(opcode)
            called = re.search(r"calls=%?([\w.\-]+)", rest)
            raw[name] = (opcode, shape.split("{")[0], called.group(1) if called else "")
    ops = {}
    for name, (opcode, shape, called) in raw.items():
        kind = opcode
        if opcode == "fusion" or called.startswith(("ynn", "fused")):
            inner = set(bodies.get(called, ()))
            kind = "fusion: " + next(
                (k for k in ("dot", "convolution", "transpose", "reduce", "scatter", "gather")
                 if k in inner), "elementwise")  # fmt: skip
        if "dot" in kind and re.search(rf"[\[,]{RANK}[\],]", shape):
            kind += f" (rank {RANK})"  # an adapter's thin product
        ops[name] = (kind, shape)
    return ops


def profile(compiled, args, calls: int) -> dict[str, float]:
    """Milliseconds per call by HLO op name, from a jax.profiler trace of `calls` runs."""
    import jax

    jax.block_until_ready(compiled(*args))
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp, create_perfetto_trace=True)
        for _ in range(calls):
            jax.block_until_ready(compiled(*args))
        jax.profiler.stop_trace()
        (path,) = glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    per_op: dict[str, float] = collections.defaultdict(float)
    for e in events:
        op = (e.get("args") or {}).get("hlo_op")
        if e.get("ph") == "X" and op:
            per_op[op] += e["dur"] / 1e3 / calls
    return per_op


def main() -> None:
    p = shape_parser(__doc__)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--top", type=int, default=10, help="slowest ops of the backward listed")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import optax

    import lora_jax as lj
    from lora_jax import models

    model = models.build(hf_config(args.size))
    ids = jax.random.randint(jax.random.key(0), (args.batch, args.seq), 0, SIZES[args.size][-1])
    params = model.init(jax.random.key(1), ids[:1])
    config = lj.LoraConfig(rank=RANK, alpha=ALPHA, targets=tuple(TARGETS))
    adapted = lj.init(jax.random.key(2), params, config, lj.kernel_layouts(model, ids[:1]))
    adapter, base = lj.split(adapted, config)
    apply = lj.lora_apply(model.apply, config)

    def mean_loss(logits):
        logits = logits.astype(jnp.float32)[:, :-1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    lora = lambda a: mean_loss(apply(lj.combine(a, base), ids))  # noqa: E731
    full = lambda p: mean_loss(model.apply(p, ids))  # noqa: E731
    runs = {
        "LoRA forward": (jax.jit(lora), adapter),
        "LoRA value_and_grad": (jax.jit(jax.value_and_grad(lora)), adapter),
        "full value_and_grad": (jax.jit(jax.value_and_grad(full)), params),
    }
    table: dict[str, dict[str, float]] = {}
    slowest = []
    for name, (fn, arg) in runs.items():
        compiled = fn.lower(arg).compile()
        ops = hlo_ops(compiled.as_text())
        times = profile(compiled, (arg,), args.calls)
        by_kind: dict[str, float] = collections.defaultdict(float)
        for op, ms in times.items():
            kind, shape = ops.get(op, ("(not in HLO text)", ""))
            if kind not in CONTAINERS:
                by_kind[kind] += ms
                if name == "LoRA value_and_grad":
                    slowest.append((ms, op, kind, shape))
        table[name] = by_kind

    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; Llama shape "
          f"'{args.size}', batch {args.batch} x {args.seq}, float32, LoRA r={RANK} on "
          f"{len(TARGETS)} projections; ms per call, mean of {args.calls}")  # fmt: skip
    kinds = sorted({k for t in table.values() for k in t}, key=lambda k: -max(
        t.get(k, 0) for t in table.values()))  # fmt: skip
    print("| op kind | " + " | ".join(table) + " |")
    print("| --- |" + " ---: |" * len(table))
    for kind in kinds:
        print(f"| {kind} | " + " | ".join(f"{t.get(kind, 0):.1f}" for t in table.values()) + " |")
    print("| **total** | " + " | ".join(f"{sum(t.values()):.1f}" for t in table.values()) + " |")
    print("LoRA value_and_grad, slowest ops:")
    for ms, op, kind, shape in sorted(slowest, reverse=True)[: args.top]:
        print(f"  {ms:7.2f} ms  {op:<28} {kind:<22} {shape}")


if __name__ == "__main__":
    run_script(main)
