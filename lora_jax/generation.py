"""Batched text generation with a KV cache: greedy, or sampling with temperature, top-k, top-p.

Works with any zoo decoder (Llama/Mistral/Qwen2, GPT-2) and any way of running it: the plain
model on merged params, `lj.lora_apply` (one adapter), or `lj.routed_apply` (an adapter per
example). The prompt runs once (prefill), then one jitted step per token reuses the cache.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _choose(logits: jax.Array, key: jax.Array, temperature: float, top_k: int, top_p: float):
    """The next token per row: argmax, or a sample from the truncated, tempered distribution."""
    if temperature <= 0:
        return jnp.argmax(logits, axis=-1)
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        if top_k > logits.shape[-1]:
            raise ValueError(f"top_k {top_k} exceeds the model's {logits.shape[-1]} tokens.")
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[..., ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(ordered, axis=-1), axis=-1)
        # The smallest set whose probability reaches top_p: keep tokens above its last logit.
        last = jnp.take_along_axis(ordered, jnp.sum(cumulative < top_p, -1, keepdims=True), -1)
        logits = jnp.where(logits < last, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)


@functools.partial(jax.jit, static_argnames=("apply_fn", "temperature", "top_k", "top_p"))
def _step(params, cache, tokens, token_mask, positions, key, *, apply_fn, temperature, top_k,
          top_p):  # fmt: skip
    """Runs `tokens` through the model on its cache and picks each row's next token. At module
    level, so that a later `generate` with the same apply function and sampling settings
    reuses the compiled prefill and decode steps."""
    logits, state = apply_fn({**params, "cache": cache}, tokens, token_mask, positions,
                             mutable=["cache"])  # fmt: skip
    return state["cache"], _choose(logits[:, -1], key, temperature, top_k, top_p)


def generate(
    model: Any,
    params: Any,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    max_new_tokens: int,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    key: jax.Array | None = None,
    apply_fn: Callable[..., Any] | None = None,
) -> np.ndarray:
    """(B, T + max_new_tokens) token ids: the prompts (left-padded when `attention_mask` has
    zeros) followed by what the model writes. A row stops at `eos_token_id` and is filled
    with `pad_token_id` (default: the EOS id) after it; all stop when every row has.

    `apply_fn(variables, ids, mask, positions, mutable=...)` runs the model; default
    `model.apply`. Pass `lj.lora_apply(model.apply, config)`, or
    `functools.partial(lj.routed_apply(model.apply, config), adapter_ids=ids)`. The prefill
    and decode steps compile once per apply function, sampling settings and shapes: keep
    the apply function and call again, and nothing recompiles.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens is {max_new_tokens}; must be >= 1.")
    if not math.isfinite(temperature) or temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature {temperature}, top_k {top_k}, top_p {top_p}: want "
                         "temperature >= 0 (0: greedy), top_k >= 0 (0: off), "
                         "0 < top_p <= 1.")  # fmt: skip
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs a PRNG key.")
    apply_fn = apply_fn or model.apply
    ids = jnp.asarray(input_ids, jnp.int32)
    batch, length = ids.shape
    if length < 1:
        raise ValueError("the prompts hold no tokens: generation continues at least one.")
    mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    total = length + max_new_tokens
    table = getattr(getattr(model, "config", None), "max_positions", None)
    if table is not None and total > table:
        raise ValueError(f"{length} prompt + {max_new_tokens} new tokens exceed the model's "
                         f"{table} positions.")  # fmt: skip
    params = {k: v for k, v in params.items() if k != "cache"}  # a stale cache is not reused
    # Cache sized to the whole run, read off an abstract call; all zeros means empty.
    abstract = jax.eval_shape(
        lambda p: apply_fn(p, jnp.zeros((batch, total), jnp.int32), mutable=["cache"])[1], params
    )
    if "cache" not in abstract:
        raise ValueError(f"{type(model).__name__} keeps no KV cache: generate runs decoders "
                         "(the Llama family, GPT-2), not encoders.")  # fmt: skip
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract["cache"])
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)  # left padding, as transformers

    step = functools.partial(_step, apply_fn=apply_fn, temperature=float(temperature),
                             top_k=int(top_k), top_p=float(top_p))  # fmt: skip
    key = jax.random.key(0) if key is None else key
    cache, token = step(params, cache, ids, mask, positions, jax.random.fold_in(key, 0))
    position = positions[:, -1]
    pad = next((p for p in (pad_token_id, eos_token_id) if p is not None), 0)
    done = np.zeros(batch, bool)
    out = [np.asarray(ids)]
    for t in range(max_new_tokens):
        token = np.where(done, pad, np.asarray(token))
        out.append(token[:, None])
        if eos_token_id is not None:
            done |= token == eos_token_id
        if done.all() or t == max_new_tokens - 1:
            break
        position = position + 1
        cache, token = step(params, cache, jnp.asarray(token)[:, None],
                            jnp.ones((batch, 1), jnp.int32), position[:, None],
                            jax.random.fold_in(key, t + 1))  # fmt: skip
    return np.concatenate(out, axis=1)


def generate_text(
    model: Any, params: Any, tokenizer: Any, prompts: Sequence[str], **options: Any
) -> list[str]:
    """Each prompt's continuation as text. The prompts are tokenized and left-padded into one
    batch, so generation starts where every prompt ends. `tokenizer`: a
    `lora_jax.data.Tokenizer`; `options` go to `generate` (max_new_tokens, apply_fn, ...)."""
    encoded = [tokenizer(p) for p in prompts]
    if empty := [i for i, tokens in enumerate(encoded) if not tokens]:
        raise ValueError(f"prompt {empty[0] + 1} ({prompts[empty[0]]!r}) has no tokens: "
                         "generation continues at least one.")  # fmt: skip
    width = max(map(len, encoded))
    pad = tokenizer.eos if tokenizer.eos is not None else tokenizer.pad
    ids = np.array([[pad] * (width - len(p)) + p for p in encoded], np.int32)
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in encoded], np.int32)
    options.setdefault("eos_token_id", tokenizer.eos)
    out = generate(model, params, ids, mask, **options)[:, width:]
    texts = []
    for prompt, new in zip(encoded, out.tolist(), strict=True):
        if tokenizer.eos in new:
            new = new[: new.index(tokenizer.eos)]
        # Decoded with the prompt, as tokenizers place spaces by context, then cut after it.
        head, whole = tokenizer.decode(prompt), tokenizer.decode(prompt + new)
        texts.append(whole[len(head) :] if whole.startswith(head) else tokenizer.decode(new))
    return texts
