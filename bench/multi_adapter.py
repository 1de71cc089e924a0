"""Decode throughput with many adapters in one batch against the merged single model.

python bench/multi_adapter.py [--hidden 512 --layers 4 --batch 32 --new 32 --rank 16]

A Llama-shaped model with random weights; r-rank adapters on every projection. Rows: the
merged model (plain forward), one stacked adapter (routing on, every example id 0), and 8
and 32 distinct adapters in one batch (example e uses adapter e mod N). Each row is timed on
its second call (the first compiles); tokens/s counts generated tokens, prefill included.
"""

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from train_throughput import run_script

import lora_jax as lj
from lora_jax import compose
from lora_jax.models import hub


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args()
    hf = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": args.vocab,
        "hidden_size": args.hidden, "intermediate_size": 4 * args.hidden,
        "num_hidden_layers": args.layers, "num_attention_heads": args.hidden // 64,
        "num_key_value_heads": max(1, args.hidden // 256), "tie_word_embeddings": True,
    }  # fmt: skip
    model = hub.build(hf)
    prompts = np.random.RandomState(0).randint(0, args.vocab, (args.batch, args.prompt))
    params = jax.jit(model.init)(jax.random.key(0), jnp.asarray(prompts))
    config = lj.LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets=("all-linear",))
    layouts = lj.kernel_layouts(model, prompts)

    def adapter(i):
        params_i = lj.init(jax.random.key(i), params, config, layouts)
        b = lambda x: x + 0.01 * jax.random.normal(jax.random.key(1000 + i), x.shape)  # noqa: E731
        return lj.split(jax.tree_util.tree_map_with_path(
            lambda path, x: b(x) if "lora_b" in jax.tree_util.keystr(path) else x, params_i
        ), config)[0]  # fmt: skip

    adapters = [adapter(i) for i in range(32)]
    rows = {"merged model": (lj.merge(lj.combine(adapters[0], params), config), None)}
    for n in (1, 8, 32):
        stacked, stack_config = compose.stack(adapters[:n], [config] * n, base=params)
        ids = jnp.arange(args.batch) % n
        routed = functools.partial(lj.routed_apply(model.apply, stack_config), adapter_ids=ids)
        rows[f"{n} adapter{'s' if n > 1 else ''} in the batch"] = (
            lj.combine(stacked, params),
            routed,
        )

    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; model hidden "
          f"{args.hidden}, {args.layers} layers, vocab {args.vocab}; batch {args.batch}, "
          f"prompt {args.prompt}, {args.new} new tokens, rank {args.rank}")  # fmt: skip
    print(f"| {'setting':<28} | {'tokens/s':>9} | {'s per step':>10} | {'vs merged':>9} |")
    print(f"| {'-' * 28} | {'-' * 8}: | {'-' * 9}: | {'-' * 8}: |")
    merged_time = None
    for name, (variables, apply_fn) in rows.items():
        run = functools.partial(lj.generate, model, variables, prompts, max_new_tokens=args.new,
                                apply_fn=apply_fn)  # fmt: skip
        run()  # compile
        start = time.perf_counter()
        run()
        seconds = time.perf_counter() - start
        merged_time = merged_time or seconds
        print(f"| {name:<28} | {args.batch * args.new / seconds:9.0f} | "
              f"{seconds / args.new:10.4f} | {seconds / merged_time:8.2f}x |")  # fmt: skip


if __name__ == "__main__":
    run_script(main)
