"""Pieces every model in the zoo shares: scanned layers, masks, attention, activations."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.ad_checkpoint import checkpoint_name
from jax.custom_derivatives import SymbolicZero

from lora_jax.apply import FACTORED_TYPES, adapters_running
from lora_jax.models.options import PROJECTION, REMAT_POLICIES
from lora_jax.tree import ADAPTER_LEAVES

# Queries per block where attention runs in XLA on sequences longer than this (`_blockwise`;
# `_causal_blockwise` runs pairs of blocks of up to half this many).
ATTENTION_BLOCK = 512

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


class Layer(nn.Module):
    """Fields every layer inside a zoo model takes: its family's architecture config, the
    compute dtype and the attention implementation (read by attention layers only)."""

    config: Any
    dtype: Any = None
    attention_impl: str | None = None


class ZooModel(nn.Module):
    """Fields every top-level model takes: its architecture config and run-time options
    (compute dtype, remat policy name, attention implementation)."""

    config: Any
    dtype: Any = None
    remat: str = "none"
    attention_impl: str | None = None

    def apply(self, variables: Any, *args: Any, **kwargs: Any) -> Any:
        """`nn.Module.apply`, refusing params that hold LoRA adapters outside `lj.lora_apply` /
        `lj.routed_apply`: the plain layers would ignore them and give the base's output."""
        params = variables.get("params", {}) if isinstance(variables, Mapping) else {}
        if not adapters_running() and any(
            keys[-1] in ADAPTER_LEAVES for keys in traverse_util.flatten_dict(params)
        ):
            raise ValueError(
                f"{type(self).__name__}.apply: the params hold LoRA adapters, which the plain "
                "model would ignore; run lj.lora_apply(model.apply, config), or lj.merge first."
            )
        with nn.intercept_methods(_name_projection):
            return super().apply(variables, *args, **kwargs)


def _name_projection(next_fun, args, kwargs, context):
    """A projection's output named PROJECTION. Flax runs the interceptor pushed last outermost,
    so inside lj.lora_apply this is the output with its adapter's term added."""
    y = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and isinstance(context.module, FACTORED_TYPES):
        return checkpoint_name(y, PROJECTION)
    return y


class CausalLM(ZooModel):
    """A decoder with its LM head, the two also callable apart (`method="hidden"` /
    `method="head"`), so that a loss can apply the head to a chunk of tokens at a time."""

    def __call__(self, input_ids, attention_mask=None, positions=None):
        """Token ids (B, T) -> logits (B, T, vocab). `attention_mask` (B, T): 0 on padding, 1
        on real tokens, or a packed batch's segment ids (each token attends to its own)."""
        return self.head(self.hidden(input_ids, attention_mask, positions))


def positions_or_default(input_ids: jax.Array, positions: jax.Array | None) -> jax.Array:
    """`positions`, or 0, 1, 2, ... per row, as transformers uses when none are given."""
    if positions is not None:
        return positions
    return jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)


def activation(name: str):
    """The activation Hugging Face calls `name`."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def scanned(
    block: type[nn.Module], length: int, remat: str, broadcast: int, per_layer: int = 0
) -> type[nn.Module]:
    """`block` stacked `length` times by nn.scan (one compiled layer, params with a leading
    layer axis), optionally rematerialised with a named policy. The block's signature is
    (carry, *broadcast_args, *per_layer_args) -> (carry, None); a per-layer argument has a
    leading axis of `length`, of which each layer gets its row."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}; choose one of {sorted(REMAT_POLICIES)}")
    if remat != "none":
        # prevent_cse=False is the recommended setting inside scan.
        block = nn.remat(block, policy=REMAT_POLICIES[remat], prevent_cse=False)
    return nn.scan(
        block,
        variable_axes={"params": 0, "cache": 0, "intermediates": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,) * broadcast + (0,) * per_layer,
        length=length,
    )


def implementation_for(choice: str | None, dtype: Any) -> str:
    """`choice`, or the fastest that fits: cuDNN flash attention on GPU in 16-bit, else XLA."""
    if choice is not None:
        return choice
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if half and jax.default_backend() == "gpu" else "xla"


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    padding: jax.Array | None,
    *,
    causal: bool,
    window: int | None = None,
    local: jax.Array | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    implementation: str | None = None,
    cache: nn.Module | None = None,
) -> jax.Array:
    """Scaled dot-product attention, (B, T, N, H) x (B, S, K, H) with K | N (GQA).

    Decoding: when `cache` (the calling module) may write its "cache" collection (outside
    `init`), k and v are appended to that module's KV cache and the queries attend to
    everything cached.

    `padding` (B, S): 0 for pads, else a segment id: 1 for every real token of an ordinary
    row; 1, 2, 3, ... for the examples of a packed row, which then attend within their own
    segment only. Causality and a sliding `window` (query i sees keys i - window < j <= i,
    as Mistral) are passed structurally, so cuDNN skips the masked blocks. `local` (a traced
    bool, from a scanned per-layer flag): whether this layer uses the window (Gemma 2/3's
    alternating layers), then a dense mask. `scale` defaults to 1/sqrt(H); `softcap` (Gemma 2)
    caps the scores at ±softcap by tanh, which no fused kernel takes: plain XLA then. In XLA,
    a sequence longer than ATTENTION_BLOCK runs a block of queries at a time, under causality
    against only the key blocks it sees (`_blockwise`, `_causal_blockwise`).
    """
    scale = scale or 1.0 / math.sqrt(q.shape[-1])
    if cache is not None and cache.is_mutable_collection("cache") and not cache.is_initializing():
        k, v, mask = _kv_cache(cache, k, v, padding, window, local)
        # Queries against a dense cache mask: XLA's kernel, unless one was chosen (cuDNN's
        # flash path wants structural masks); a long prompt's prefill a block at a time.
        implementation = implementation or "xla"
        if implementation == "xla" and q.shape[1] > ATTENTION_BLOCK:
            return _blockwise(q, k, v, mask, scale, softcap, False, None, None)
        return _scores(q, k, v, mask, scale, softcap, implementation=implementation)
    implementation = implementation_for(implementation, q.dtype)
    xla = local is not None or softcap is not None or implementation == "xla"
    if xla and causal and q.shape[1] == k.shape[1] > ATTENTION_BLOCK:
        return _causal_blockwise(q, k, v, padding, scale, softcap, window, local)
    mask = None
    if padding is not None:
        if q.shape[1] == k.shape[1]:  # self-attention
            mask = _segment_mask(padding, padding)
        else:
            mask = padding[:, None, None, :] > 0
    # cuDNN takes neither a per-layer window flag nor soft-capping: those run in XLA.
    if xla:
        if q.shape[1] > ATTENTION_BLOCK:
            return _blockwise(q, k, v, mask, scale, softcap, causal, window, local)
        queries = jnp.arange(q.shape[1])
        return _dense(q, k, v, mask, queries, scale, softcap, causal, window, local)
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=mask,
        scale=scale,
        is_causal=causal,
        local_window_size=(window - 1, 0) if window else None,
        implementation=implementation,
    )


def _blocks(x: jax.Array, blocks: int, size: int, fill) -> jax.Array:
    """(B, T, ...) -> (blocks, B, size, ...), the tokens past T (up to blocks·size) `fill`."""
    x = jnp.pad(x, [(0, 0), (0, blocks * size - x.shape[1])] + [(0, 0)] * (x.ndim - 2),
                constant_values=fill)  # fmt: skip
    return x.reshape(x.shape[0], blocks, size, *x.shape[2:]).swapaxes(0, 1)


def _unblock(x: jax.Array, length: int) -> jax.Array:
    """(blocks, B, size, ...) -> (B, length, ...): `_blocks` undone."""
    return x.swapaxes(0, 1).reshape(x.shape[1], -1, *x.shape[3:])[:, :length]


def _blockwise(q, k, v, mask, scale: float, softcap: float | None, causal: bool, window, local):
    """`_dense` for ATTENTION_BLOCK queries at a time against every key (bidirectional
    attention, a KV cache's prefill, causal attention between unequal lengths), each block's
    scores recomputed in the backward: XLA keeps (B, N, block, S) float32 scores, not
    (B, N, T, S). A query's softmax reads its own row only, so blocks change nothing."""
    length, block = q.shape[1], ATTENTION_BLOCK
    blocks = -(-length // block)
    if mask is not None:  # (B, 1, T | 1, S) -> (blocks, B, 1, block, S)
        mask = jnp.broadcast_to(mask, (q.shape[0], 1, length, k.shape[1]))
        mask = _blocks(mask.swapaxes(1, 2), blocks, block, True).swapaxes(2, 3)

    @jax.checkpoint
    def attend_block(start, q, mask):
        queries = jnp.minimum(start + jnp.arange(block), length - 1)  # padded: the last one's
        return _dense(q, k, v, mask, queries, scale, softcap, causal, window, local)

    xs = (jnp.arange(blocks) * block, _blocks(q, blocks, block, 0), mask)
    return _unblock(jax.lax.map(lambda xs: attend_block(*xs), xs), length)


def _causal_blockwise(q, k, v, padding, scale: float, softcap: float | None, window, local):
    """Causal self-attention in XLA past ATTENTION_BLOCK queries, computing only the key
    blocks causality lets a query block see, in fixed shapes, each pair's scores recomputed
    in the backward.

    The sequence is cut into n = 2P blocks, P = ceil(T / ATTENTION_BLOCK). Query block i
    sees key blocks 0..i, so pairing block i with block n-1-i gives every pair n + 1 (query
    block, key block) products: P iterations of `lax.map` of one shape, (n + 1) / 2n of the
    dense work (5/8 at 1024 tokens, 9/16 at 2048), and per pair (n + 1)·b² scores, b = T/n,
    that fraction of a 512-query block's against every key. The two blocks' softmaxes are
    combined from each product's row maxima and sums (as flash attention does). A query that
    sees no key (a left pad) averages the values of its block's products, where dense
    attention averages every value: meaningless either way, and no real token reads it."""
    batch, length = q.shape[:2]
    pairs = -(-length // ATTENTION_BLOCK)
    n = 2 * pairs
    size = -(-length // n)
    ids = jnp.ones((batch, length), jnp.int32) if padding is None else padding
    q_blocks, k_blocks, v_blocks = (_blocks(x, n, size, 0) for x in (q, k, v))
    id_blocks = _blocks(ids, n, size, 0)  # padded tokens are pads: seen by no real query
    pair_q = jnp.stack([q_blocks[:pairs], q_blocks[::-1][:pairs]], axis=1)  # (P, 2, B, b, N, H)

    @jax.checkpoint
    def attend_pair(i, q):
        product = jnp.arange(n + 1)
        second = product > i  # products 0..i: block i's, then n - i of block n-1-i
        side = second.astype(jnp.int32)
        key_block = jnp.where(second, product - i - 1, product)
        query_block = jnp.where(second, n - 1 - i, i)
        within = jnp.arange(size)
        queries, keys = query_block[:, None] * size + within, key_block[:, None] * size + within
        seen = _positions_seen(queries, keys, True, window, local)
        mask = _segment_mask(id_blocks[query_block], id_blocks[key_block]) & seen[:, None, None]
        logits = jax.vmap(_logits, (0, 0, 0, None, None))(
            q[side], k_blocks[key_block], mask, scale, softcap
        )  # (n + 1, B, K, b, G, b)
        # Each query's maximum over the products of its block; the shift cancels, so no gradient.
        peak = jax.lax.stop_gradient(logits.max(-1))
        later = second.reshape(-1, 1, 1, 1, 1)
        peak = jnp.stack([jnp.where(later, -jnp.inf, peak).max(0),
                          jnp.where(later, peak, -jnp.inf).max(0)])  # fmt: skip
        weights = jnp.exp(logits - peak[side][..., None])
        owner = jax.nn.one_hot(side, 2, dtype=jnp.float32)  # (n + 1, 2): product -> block
        totals = jnp.einsum("pi,pbkqg->ibqkg", owner, weights.sum(-1))
        mixed = jax.vmap(_mix)(weights.astype(v.dtype), v_blocks[key_block])
        out = jnp.einsum("pi,pbqnh->ibqnh", owner, mixed.astype(jnp.float32))
        totals = totals.reshape(*totals.shape[:3], -1)[..., None]  # (2, B, b, N, 1)
        return (out / totals).astype(v.dtype)

    out = jax.lax.map(lambda xs: attend_pair(*xs), (jnp.arange(pairs), pair_q))  # (P, 2, ...)
    return _unblock(jnp.concatenate([out[:, 0], out[::-1, 1]]), length)


def _segment_mask(queries: jax.Array, keys: jax.Array) -> jax.Array:
    """(..., B, 1, T, S) from segment ids (0: pad) of self-attention's queries and keys: a real
    token sees its own segment's keys, a pad every real key."""
    keys, queries = keys[..., None, None, :], queries[..., None, :, None]
    return (keys > 0) & ((queries == keys) | (queries == 0))


def _dense(q, k, v, mask, queries, scale: float, softcap: float | None, causal, window, local):
    """`_scores` where the padding `mask` (or None) and the positions each query (its position
    in `queries`) sees both hold, in one dense mask."""
    seen = _positions_seen(queries, jnp.arange(k.shape[1]), causal, window, local)
    mask = seen[None, None] if mask is None else mask & seen
    return _scores(q, k, v, mask, scale, softcap, implementation="xla")


def _positions_seen(query_pos, key_pos, causal: bool, window: int | None, local) -> jax.Array:
    """(..., T, S): which key positions (..., S) each query position (..., T) sees: causal,
    within the window where it applies (always, or where the traced `local` is true)."""
    query_pos, key_pos = query_pos[..., :, None], key_pos[..., None, :]
    shape = jnp.broadcast_shapes(query_pos.shape, key_pos.shape)
    seen = key_pos <= query_pos if causal else jnp.ones(shape, bool)
    if window:
        near = key_pos > query_pos - window
        seen &= near if local is None else near | ~local
    return seen


def _scores(q, k, v, mask, scale: float, softcap: float | None, implementation: str):
    """Softmax attention under a dense (B | 1, 1, T | 1, S) mask; in XLA, `_logits` and
    `_mix` around a float32 softmax."""
    if implementation != "xla" and softcap is None:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                            implementation=implementation)  # fmt: skip
    probs = jax.nn.softmax(_logits(q, k, mask, scale, softcap), axis=-1)
    return _mix(probs.astype(v.dtype), v)


def _logits(q, k, mask, scale: float, softcap: float | None) -> jax.Array:
    """(B, K, T, G, S) float32 scores of (B, T, K·G, H) queries against (B, S, K, H) keys,
    capped by tanh with `softcap`, jax.nn.dot_product_attention's fill where `mask` is
    false (so its values are ours). The G query heads that share a key head are stacked
    with the tokens, (B, K, T·G, H) against (B, K, S, H): one matmul per key head over T·G
    rows, which runs 1.2-1.4x faster on the CPU (forward and backward; bench/attention.py)
    than the (B, N, T, S) einsums of jax.nn.dot_product_attention, k never repeated per head."""
    batch, length, heads, dim = q.shape
    keys, kv_heads = k.shape[1:3]
    groups = heads // kv_heads
    q = q.reshape(batch, length, kv_heads, groups, dim).transpose(0, 2, 1, 3, 4)
    q = q.reshape(batch, kv_heads, length * groups, dim)
    k = k.transpose(0, 2, 1, 3)  # (B, K, S, H)
    scores = _query_key(q, k) * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = scores.reshape(batch, kv_heads, length, groups, keys)
    if mask is not None:
        scores = jnp.where(mask[:, :, :, None], scores, -0.7 * jnp.finfo(jnp.float32).max)
    return scores


@jax.custom_jvp
def _query_key(q: jax.Array, k: jax.Array) -> jax.Array:
    """(..., Q, H) queries against (..., S, H) keys: (..., Q, S) float32 scores."""
    return jnp.einsum("...qh,...sh->...qs", q, k, preferred_element_type=jnp.float32)


def _query_key_jvp(primals, tangents):
    """The keys' term goes through kᵀ behind a barrier, so that its transpose (reverse mode)
    computes dk as (qᵀ·ds)ᵀ: XLA's CPU dot runs about 2x slower as dsᵀ·q, contracting the
    scores over their leading (query) axis, and would fold a plain transpose back into that
    form (bench/RESULTS.md). A derivative of the forward, so forward mode works too."""
    (q, k), (t_q, t_k) = primals, tangents
    terms = []  # JAX calls this rule only when q's or k's tangent is nonzero
    if not isinstance(t_q, SymbolicZero):
        terms.append(_query_key(t_q, k))
    if not isinstance(t_k, SymbolicZero):
        t_kt = jax.lax.optimization_barrier(jnp.swapaxes(t_k, -1, -2))
        terms.append(jnp.einsum("...qh,...hs->...qs", q, t_kt, preferred_element_type=jnp.float32))
    return _query_key(q, k), functools.reduce(jnp.add, terms)


_query_key.defjvp(_query_key_jvp, symbolic_zeros=True)


def _mix(weights: jax.Array, v: jax.Array) -> jax.Array:
    """(B, K, T, G, S) attention weights times (B, S, K, H) values -> (B, T, K·G, H)."""
    batch, kv_heads, length, groups, keys = weights.shape
    v = v.transpose(0, 2, 1, 3)  # (B, K, S, H)
    out = jnp.einsum("bkqs,bksh->bkqh", weights.reshape(batch, kv_heads, length * groups, keys), v)
    out = out.reshape(batch, kv_heads, length, groups, -1).transpose(0, 2, 1, 3, 4)
    return out.reshape(batch, length, kv_heads * groups, -1)


def _kv_cache(module: nn.Module, k: jax.Array, v: jax.Array, padding, window: int | None, local):
    """Writes this step's keys and values at the cache's index; returns all cached keys and
    values and the (B, 1, T, S) mask: real keys, causal, within the window. The cache's
    length is fixed by the call that creates it (`lj.generate` sizes it to the whole run)."""
    batch, steps = k.shape[:2]
    keys = module.variable("cache", "key", jnp.zeros, k.shape, k.dtype)
    values = module.variable("cache", "value", jnp.zeros, v.shape, v.dtype)
    real = module.variable("cache", "real", jnp.zeros, k.shape[:2], bool)
    index = module.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    i = index.value
    keys.value = jax.lax.dynamic_update_slice(keys.value, k.astype(keys.value.dtype), (0, i, 0, 0))
    values.value = jax.lax.dynamic_update_slice(
        values.value, v.astype(values.value.dtype), (0, i, 0, 0)
    )
    new = jnp.ones((batch, steps), bool) if padding is None else padding > 0
    real.value = jax.lax.dynamic_update_slice(real.value, new, (0, i))
    index.value = i + steps
    query_pos = i + jnp.arange(steps)
    key_pos = jnp.arange(keys.value.shape[1])
    seen = _positions_seen(query_pos, key_pos, True, window, local)
    # A padding query sees itself at least, so no softmax row is empty.
    itself = query_pos[:, None] == key_pos[None, :]
    mask = (seen[None] & real.value[:, None, :]) | itself[None]
    return keys.value, values.value, mask[:, None]


def split_heads(x: jax.Array, heads: int) -> jax.Array:
    """(..., heads·H) -> (..., heads, H)."""
    return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)


def merge_heads(x: jax.Array) -> jax.Array:
    """(..., heads, H) -> (..., heads·H)."""
    return x.reshape(*x.shape[:-2], -1)
