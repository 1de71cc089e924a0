"""LoRA train-step throughput: lora_jax against peft on one checkpoint and batch, one table.

Each side runs in its own process, in alternating rounds (best round kept), on a random
Llama-architecture checkpoint that transformers writes:
  lora_jax step   `lora_jax.step.make_step` on the chunked causal-LM loss, as `lora-jax train`,
                  under the remat policy `settings.sft_config` gives
  lora_jax API    the public-API loop: lj.lora_apply, split/combine, optax.adamw, jax.jit
  lora_jax full   full fine-tuning of the same model
  peft eager      peft + torch, and `--compile` adds peft under torch.compile
  `--adalora`     adds AdaLoRA (init rank r, target r/2, mid-schedule: a mask every step) on
                  both sides: lora_jax's step with lj.adalora_allocator and the penalty, and
                  peft eager with its orthogonal term and update_and_allocate
  `--moe`         adds the shape as a Mixtral (8 experts of a quarter of the MLP's width,
                  top-2) on both sides: lora_jax's step with LoRA on attention and every
                  expert (grouped matmuls), peft eager with target_parameters on the experts
Also printed: forward and value_and_grad times of the LoRA loss, XLA's FLOPs of the LoRA and
full steps, and (`--memory-1b`) XLA's memory analysis of the LoRA step compiled for the
Llama-3.2-1B shape at 8 x 2048 in bfloat16, from abstract inputs (nothing allocated).
Every side runs in the environment `lora-jax train` gives itself: on Linux, glibc's malloc
in transparent huge pages (`lora_jax.launch.huge_pages_env`); `--no-huge-pages` runs all in 4
KiB pages.

    python bench/train_throughput.py                 # CPU shapes (hidden 512, 4 layers)
    python bench/train_throughput.py --cores 1       # every side on one CPU
    python bench/train_throughput.py --size 1b --batch 8 --seq 2048 --compile   # a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

SIZES = {  # hidden, layers, heads, kv heads, intermediate, vocab
    "cpu": (512, 4, 8, 2, 1344, 8192),
    "1b": (2048, 16, 32, 8, 8192, 128256),
    "8b": (4096, 32, 32, 8, 14336, 128256),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA, LR = 16, 32.0, 1e-4
# AdaLoRA's schedule on both sides: budget r -> r/2 per module over 1000 steps, a mask every
# step, so the timed steps are mid-schedule (the allocator's every part runs).
ADALORA = dict(target_rank=RANK // 2, total_steps=1000, tinit=0, tfinal=100, delta_t=1)
# The MoE row: attention and every expert adapted (peft: target_parameters), the router not.
MOE_EXPERTS, MOE_TOP_K = 8, 2
ATTENTION = TARGETS[:4]
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def hf_config(size: str) -> dict:
    hidden, layers, heads, kv, inter, vocab = SIZES[size]
    return dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=vocab,
                hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=4096,
                tie_word_embeddings=False)  # fmt: skip


def moe_config(size: str) -> dict:
    """The same shape as a Mixtral: MOE_EXPERTS experts of a quarter of the MLP's width each,
    MOE_TOP_K a token (half the dense MLP's FLOPs a token, twice its weights)."""
    config = dict(hf_config(size), model_type="mixtral", architectures=["MixtralForCausalLM"],
                  num_local_experts=MOE_EXPERTS, num_experts_per_tok=MOE_TOP_K)  # fmt: skip
    return dict(config, intermediate_size=config["intermediate_size"] // 4)


def shape_parser(doc: str) -> argparse.ArgumentParser:
    """The argument parser of a bench script, with the model shape and batch options."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    return p


def run_script(main: Callable[[], None]) -> None:
    """Runs a bench script's `main`. SIGTERM unwinds as Ctrl-C does (`subprocess.run` stops
    the running side, temporary checkpoints are removed); either ends with "interrupted" and
    exit status 130, not a traceback."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        main()
    except KeyboardInterrupt:
        print(f"{os.path.basename(sys.argv[0])}: interrupted", file=sys.stderr)
        sys.exit(130)


def cpus() -> int:
    """How many CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def train_remat() -> str:
    """The remat policy `lora-jax train` runs a decoder under (`settings.sft_config`'s)."""
    from lora_jax.settings import sft_config

    return sft_config("", "", "")["model"]["remat"]


def timed(fn, steps: int) -> float:
    """Median seconds of `fn()` (which blocks until done) over `steps` calls after one warmup."""
    fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def peak_bytes(device_peak: int | None) -> int:
    """The accelerator's peak allocation if it reports one, else this process's peak RSS."""
    return device_peak or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----------------------------------------------------------------------------- lora_jax


def chunked_loss(apply, params, batch):
    """The causal-LM loss as `lora-jax train` computes it: the head a chunk of tokens at a time."""
    import functools

    import jax.numpy as jnp

    from lora_jax.step import token_terms

    ids = batch["input_ids"]
    hidden = apply(params, ids, method="hidden")[:, :-1]
    head = functools.partial(apply, params, method="head")
    targets = ids[:, 1:]
    total, count, _ = token_terms(head, hidden, targets, jnp.ones(targets.shape, jnp.float32))
    return total, count


def lora_jax_worker(kind: str, ckpt: str, batch: int, seq: int, steps: int, dtype: str) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    import lora_jax as lj
    from lora_jax import models
    from lora_jax.step import make_step

    dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    stepped = kind in ("step", "adalora", "moe")  # through lora_jax.step.make_step
    remat = train_remat() if stepped else "none"  # "none": the default
    ckpt = os.path.join(ckpt, "moe") if kind == "moe" else ckpt
    model, params, _ = models.from_pretrained(ckpt, dt, remat=remat)
    ids = jax.random.randint(jax.random.key(0), (batch, seq), 0, model.config.vocab_size)
    targets = (*ATTENTION, "experts") if kind == "moe" else tuple(TARGETS)
    config = lj.LoraConfig(rank=RANK, alpha=ALPHA, targets=targets)
    tx, penalty = optax.adamw(LR), None
    if kind == "adalora":
        config = dataclasses.replace(config, adalora=lj.AdaLora(**ADALORA))
        tx, penalty = lj.adalora_allocator(tx, config), lj.adalora_penalty(config)

    def mean_loss(apply, p):  # the public-API loss: the whole batch's float32 logits
        logits = apply(p, ids).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    if kind == "full":
        trained, value = params, lambda p: mean_loss(model.apply, p)
    else:
        params = lj.init(jax.random.key(1), params, config, lj.kernel_layouts(model, ids[:1]))
        trained, base = lj.split(params, config)
        apply = lj.lora_apply(model.apply, config)
        value = lambda a: mean_loss(apply, lj.combine(a, base))  # noqa: E731
    state = tx.init(trained)
    if stepped:
        step = make_step(lambda p, b, _: chunked_loss(apply, p, b), tx, penalty=penalty)
        compiled = step.lower(trained, state, base, {"input_ids": ids}, jnp.int32(0)).compile()
        # The step donates the adapter and state: feed each call the previous one's.
        carry = {"adapter": trained, "state": state}

        def call():
            a, s, m = compiled(carry["adapter"], carry["state"], base, {"input_ids": ids},
                               jnp.int32(0))  # fmt: skip
            carry.update(adapter=a, state=s)
            jax.block_until_ready(m)

        out = {"step": timed(call, steps)}
    else:  # the public-API loop: value_and_grad, then AdamW, in one jax.jit

        @jax.jit
        def step(x, state):
            loss, grads = jax.value_and_grad(value)(x)
            updates, state = tx.update(grads, state, x)
            return optax.apply_updates(x, updates), state, loss

        compiled = step.lower(trained, state).compile()
        out = {"step": timed(lambda: jax.block_until_ready(compiled(trained, state)), steps)}
    if kind == "api":
        forward = jax.jit(value).lower(trained).compile()
        backward = jax.jit(jax.value_and_grad(value)).lower(trained).compile()
        out["forward"] = timed(lambda: jax.block_until_ready(forward(trained)), steps)
        out["value_and_grad"] = timed(lambda: jax.block_until_ready(backward(trained)), steps)
    out["flops"] = (compiled.cost_analysis() or {}).get("flops")
    stats = jax.local_devices()[0].memory_stats() or {}
    out["peak"] = peak_bytes(stats.get("peak_bytes_in_use"))
    return out


def memory_1b_worker(remat: str) -> dict:
    """XLA's memory analysis of the LoRA step for Llama-3.2-1B at 8 x 2048, bfloat16 base and
    float32 adapter, compiled from abstract inputs on this machine's backend."""
    import jax
    import jax.numpy as jnp
    import optax

    import lora_jax as lj
    from lora_jax import models
    from lora_jax.step import make_step

    model = models.build(hf_config("1b"), dtype=jnp.bfloat16, remat=remat)
    ids = jax.ShapeDtypeStruct((8, 2048), jnp.int32)
    config = lj.LoraConfig(rank=RANK, alpha=ALPHA, targets=tuple(TARGETS))

    def abstract_params():
        p = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
        p = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p)
        return lj.init(
            jax.random.key(1), p, config, lj.kernel_layouts(model, jnp.zeros((1, 8), jnp.int32))
        )

    adapter, base = lj.split(jax.eval_shape(abstract_params), config)
    apply = lj.lora_apply(model.apply, config)

    tx = optax.adamw(LR)
    step = make_step(lambda p, b, _: chunked_loss(apply, p, b), tx)
    state = jax.eval_shape(tx.init, adapter)
    compiled = step.lower(adapter, state, base, {"input_ids": ids}, jnp.int32(0)).compile()
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    return {"temp": m.temp_size_in_bytes, "arguments": m.argument_size_in_bytes,
            "total": total - m.alias_size_in_bytes}  # fmt: skip


# ----------------------------------------------------------------------------- peft


def peft_worker(kind: str, ckpt: str, batch: int, seq: int, steps: int, dtype: str) -> dict:
    import peft
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    ckpt = os.path.join(ckpt, "moe") if kind == "moe" else ckpt
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=dt).to(device)
    lora = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0)
    if kind == "moe":
        lora = peft.LoraConfig(
            r=RANK,
            lora_alpha=ALPHA,
            target_modules=ATTENTION,
            target_parameters=EXPERT_PARAMETERS,
            lora_dropout=0.0,
        )
    if kind == "adalora":
        lora = peft.AdaLoraConfig(init_r=RANK, target_r=ADALORA["target_rank"],
                                  total_step=ADALORA["total_steps"], tfinal=ADALORA["tfinal"],
                                  lora_alpha=ALPHA, target_modules=TARGETS,
                                  task_type="CAUSAL_LM")  # fmt: skip
    model = peft.get_peft_model(model, lora)
    for p in model.parameters():  # the adapter in float32, as lora_jax keeps it
        if p.requires_grad:
            p.data = p.data.float()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    forward = torch.compile(model) if kind == "compile" else model
    done = [0]  # steps taken: AdaLoRA's allocator is told the step

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def step():
        opt.zero_grad(set_to_none=True)
        if kind == "adalora":  # with labels, peft adds its orthogonal term to the loss
            loss = forward(input_ids=ids, labels=ids).loss
        else:
            logits = forward(input_ids=ids).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab),
                                                     ids[:, 1:].reshape(-1))  # fmt: skip
        loss.backward()
        opt.step()
        if kind == "adalora":
            model.base_model.update_and_allocate(done[0])
        done[0] += 1
        sync()

    out = {"step": timed(step, steps)}
    if kind == "eager":
        with torch.no_grad():
            out["forward"] = timed(lambda: (forward(input_ids=ids), sync()), steps)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    out["peak"] = peak_bytes(peak)
    return out


# ----------------------------------------------------------------------------- driver

SIDES = {
    "lora_jax step": ("lora_jax", "step"),
    "lora_jax API": ("lora_jax", "api"),
    "lora_jax full": ("lora_jax", "full"),
    "peft eager": ("peft", "eager"),
    "peft compile": ("peft", "compile"),
    "lora_jax AdaLoRA": ("lora_jax", "adalora"),
    "peft AdaLoRA eager": ("peft", "adalora"),
    "lora_jax MoE": ("lora_jax", "moe"),
    "peft MoE eager": ("peft", "moe"),
}
OPTIONAL = {"peft compile": "compile", "lora_jax AdaLoRA": "adalora",
            "peft AdaLoRA eager": "adalora", "lora_jax MoE": "moe",
            "peft MoE eager": "moe"}  # fmt: skip


def worker(args: argparse.Namespace) -> None:
    if args.cores:  # before jax or torch sizes its thread pools
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])
    lib, kind = SIDES.get(args.worker, (args.worker, ""))
    common = (args.ckpt, args.batch, args.seq, args.steps, args.dtype)
    if lib == "lora_jax":
        out = lora_jax_worker(kind, *common)
    elif lib == "peft":
        out = peft_worker(kind, *common)
    else:
        out = memory_1b_worker(args.remat)
    print("RESULT " + json.dumps(out))


def run_side(name: str, args: argparse.Namespace, env: dict[str, str]) -> dict:
    command = [sys.executable, __file__, "--worker", name, "--ckpt", args.ckpt,
               "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
               "--dtype", args.dtype, "--remat", args.remat,
               "--cores", str(args.cores)]  # fmt: skip
    return run_worker(command, env)


def run_worker(command: list[str], env: dict[str, str]) -> dict:
    """A worker process's "RESULT {json}" line, or {"error": its last line} if it failed."""
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": tail[0][:120]}
    return json.loads(lines[0][len("RESULT ") :])


def keep_best(results: dict[str, dict], side: str, got: dict, time_key: str) -> None:
    """Keeps in `results[side]` the faster of its round so far and `got` by `time_key`, a
    measured round over a failed one."""
    kept = results.get(side)
    if kept is None or "error" in kept or got.get(time_key, 1e9) < kept[time_key]:
        results[side] = got


def main() -> None:
    p = shape_parser(__doc__)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round (median)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (best kept)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--compile", action="store_true", help="also peft under torch.compile")
    p.add_argument("--adalora", action="store_true", help="also AdaLoRA on both sides")
    p.add_argument("--moe", action="store_true", help="also the shape as a Mixtral, both sides")
    p.add_argument("--memory-1b", action="store_true", help="XLA memory analysis, 1B shape")
    p.add_argument("--no-huge-pages", action="store_true", help="malloc in 4 KiB pages")
    p.add_argument("--cores", type=int, default=0,
                   help="run every side on N of this process's CPUs (default: all)")  # fmt: skip
    p.add_argument("--remat", default="full", help=argparse.SUPPRESS)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.cores and not hasattr(os, "sched_setaffinity"):
        p.error("--cores needs os.sched_setaffinity (Linux)")
    if not 0 <= args.cores <= cpus():
        p.error(f"--cores {args.cores}: this process may run on {cpus()} CPUs")
    if args.worker:
        return worker(args)

    import jax
    import peft
    import torch
    import transformers

    from lora_jax.launch import THP_MODE, huge_pages_env
    from lora_jax.models import REMAT_POLICIES

    env = dict(os.environ)
    if args.no_huge_pages:
        env.pop("GLIBC_TUNABLES", None)
    else:
        env = huge_pages_env(env) or env
    names = [n for n in SIDES if n not in OPTIONAL or getattr(args, OPTIONAL[n])]
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(**hf_config(args.size))
        transformers.LlamaForCausalLM(config).save_pretrained(tmp)
        if args.moe:
            moe = transformers.MixtralConfig(**moe_config(args.size))
            transformers.MixtralForCausalLM(moe).save_pretrained(os.path.join(tmp, "moe"))
        args.ckpt = tmp
        results: dict[str, dict] = {}
        for _ in range(args.rounds):
            for name in names:
                keep_best(results, name, run_side(name, args, env), "step")
        memory = {}
        for remat in REMAT_POLICIES if args.memory_1b else ():
            args.remat = remat
            memory[remat] = run_side("memory_1b", args, env)

    tokens = args.batch * args.seq
    hidden, layers, *_ = SIZES[args.size]
    print(
        f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}, torch "
        f"{torch.__version__}, peft {peft.__version__}, transformers {transformers.__version__}"
    )
    print(f"Llama shape '{args.size}' (hidden {hidden}, {layers} layers), batch {args.batch} x "
          f"{args.seq}, {args.dtype}, LoRA r={RANK} alpha={ALPHA:g} on {len(TARGETS)} "
          f"projections, AdamW; best of {args.rounds} alternating rounds, median of "
          f"{args.steps} steps; remat {train_remat()!r} in lora_jax step, else none")  # fmt: skip
    print(f"every side: GLIBC_TUNABLES={env.get('GLIBC_TUNABLES', '')!r}, transparent huge "
          f"pages {THP_MODE.read_text().strip() if THP_MODE.exists() else 'absent'}, "
          f"{args.cores or cpus()} CPUs")  # fmt: skip
    peft_step = results.get("peft eager", {}).get("step")
    full_step = results.get("lora_jax full", {}).get("step")
    print("| run | step s | tokens/s | peak MiB | vs peft eager | vs lj full |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in names:
        r = results[name]
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | | | | |")
            continue
        vs_peft = f"{peft_step / r['step']:.2f}x" if peft_step else "-"
        vs_full = f"{r['step'] / full_step:.2f}" if full_step and name != "lora_jax full" else "-"
        print(f"| {name} | {r['step']:.3f} | {tokens / r['step']:,.0f} | "
              f"{r['peak'] / 2**20:,.0f} | {vs_peft} | {vs_full} |")  # fmt: skip
    ours_ada, peft_ada = results.get("lora_jax AdaLoRA", {}), results.get("peft AdaLoRA eager", {})
    if "step" in ours_ada and "step" in peft_ada:
        print(f"AdaLoRA (r {RANK} -> {ADALORA['target_rank']}, a mask every step): lora_jax "
              f"{ours_ada['step']:.3f} s, peft eager {peft_ada['step']:.3f} s "
              f"({peft_ada['step'] / ours_ada['step']:.2f}x)")  # fmt: skip
    ours_moe, peft_moe = results.get("lora_jax MoE", {}), results.get("peft MoE eager", {})
    if "step" in ours_moe and "step" in peft_moe:
        moe = moe_config(args.size)
        print(f"MoE (the shape as a Mixtral: {MOE_EXPERTS} experts of width "
              f"{moe['intermediate_size']}, top-{MOE_TOP_K}; LoRA on attention and every "
              f"expert): lora_jax {ours_moe['step']:.3f} s, peft eager {peft_moe['step']:.3f} s "
              f"({peft_moe['step'] / ours_moe['step']:.2f}x)")  # fmt: skip
    api, peft_eager = results.get("lora_jax API", {}), results.get("peft eager", {})
    if "value_and_grad" in api:
        print(f"lora_jax LoRA: forward {api['forward']:.3f} s, value_and_grad "
              f"{api['value_and_grad']:.3f} s ({api['value_and_grad'] / api['forward']:.1f}x "
              "forward)")  # fmt: skip
    if "forward" in peft_eager:
        print(f"peft: forward {peft_eager['forward']:.3f} s, step {peft_eager['step']:.3f} s "
              f"({peft_eager['step'] / peft_eager['forward']:.1f}x forward)")  # fmt: skip
    lora_flops, full_flops = api.get("flops"), results.get("lora_jax full", {}).get("flops")
    if lora_flops and full_flops:
        print(
            f"XLA cost analysis (it counts the layer scan's body once): LoRA step "
            f"{lora_flops / 1e9:.1f} GFLOP, full step {full_flops / 1e9:.1f} GFLOP "
            f"({lora_flops / full_flops:.2f}x)"
        )
    for remat, m in memory.items():
        print(f"XLA memory analysis, LoRA step, Llama-3.2-1B shape, 8 x 2048, bfloat16 base, "
              f"remat {remat!r}: " + (m["error"] if "error" in m else
                                      f"{m['total'] / 2**30:.1f} GiB ({m['temp'] / 2**30:.1f} "
                                      f"GiB temporaries, {m['arguments'] / 2**30:.1f} GiB "
                                      "arguments)"))  # fmt: skip


if __name__ == "__main__":
    run_script(main)
