"""The sparse mixture-of-experts block of Mixtral and Qwen3-MoE, named like transformers' runtime
modules: `mlp/gate` (the router, a Dense to one logit per expert) and `mlp/experts/gate_up_proj`
(E, hidden, 2·ff) and `mlp/experts/down_proj` (E, ff, hidden), one kernel per expert.

Each token goes to its top-k experts. The (token, expert) pairs are sorted by expert and run
as grouped matmuls (`lora_jax.grouped.GroupedDense`: ragged_dot on TPU and GPU, blocks of
rows on the CPU), so each expert computes only the tokens routed to it; the outputs are
weighted and summed back per token. Each block sows its router logits (collection
"intermediates"), from which `load_balancing_loss` computes transformers' auxiliary loss
when the router is trained.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from lora_jax.grouped import GroupedDense
from lora_jax.models import common

ROUTER = "gate"  # the router's module name in each MoE block (transformers': mlp.gate)
ROUTER_LOGITS = "router_logits"  # what each block sows, as transformers' output_router_logits


def route(logits: jax.Array, top_k: int, normalize: bool, float32_weights: bool):
    """(weights (T, k), experts (T, k)) as transformers routes: softmax in float32, top-k,
    renormalised to sum 1 where `normalize`; Qwen3-MoE casts the weights back to the logits'
    dtype, Mixtral keeps them in float32 (`float32_weights`)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if normalize:
        weights = weights / weights.sum(-1, keepdims=True)
    return (weights if float32_weights else weights.astype(logits.dtype)), experts


def load_balancing_loss(logits: jax.Array, top_k: int, real: jax.Array) -> jax.Array:
    """transformers' auxiliary load-balancing loss (Switch Transformer's) from every MoE
    layer's router logits (L, N, E) and which of the N tokens are real (N,): E times the sum
    over experts of (the share of real tokens' top-k picks that went to e) x (e's mean
    routing probability), both taken over every layer's real tokens."""
    count = logits.shape[-1]
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    _, experts = jax.lax.top_k(probs, top_k)
    real = real.astype(jnp.float32)
    picks = jnp.sum(jax.nn.one_hot(experts, count) * real[None, :, None, None], axis=(0, 1, 2))
    prob = jnp.sum(probs * real[None, :, None], axis=(0, 1))
    rows = jnp.maximum(logits.shape[0] * real.sum(), 1.0)
    return count * jnp.sum((picks / rows) * (prob / rows))


def sown_router_logits(intermediates: Any) -> jax.Array:
    """The (L, N, E) router logits a decoder's MoE blocks sowed, from the "intermediates" an
    apply with `mutable=["intermediates"]` returns (its layer scan stacks them)."""
    flat = traverse_util.flatten_dict(intermediates)
    found = [t for keys, value in flat.items() if keys[-1] == ROUTER_LOGITS for t in value]
    if not found:
        raise ValueError("the model sowed no router logits: not a mixture of experts?")
    return jnp.concatenate(found, axis=0)


class SparseMoe(common.Layer):
    """Router and experts: each token's top-k experts, weighted by their routing weights."""

    @nn.compact
    def __call__(self, x):
        c = self.config
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        count, ff = c.num_experts, c.expert_intermediate_size
        logits = nn.Dense(count, use_bias=False, dtype=self.dtype, name=ROUTER)(x)
        self.sow("intermediates", ROUTER_LOGITS, logits)
        weights, experts = route(logits, c.experts_per_token, c.norm_topk_prob,
                                 c.float32_routing)  # fmt: skip
        # The (token, expert) pairs sorted by expert: each expert's rows are contiguous.
        flat = experts.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        token = order // c.experts_per_token
        sizes = jnp.bincount(flat, length=count).astype(jnp.int32)
        experts_module = _Experts(count, ff, shape[-1], c.hidden_act, self.dtype, name="experts")
        y = experts_module(x[token], sizes)
        y = y * weights.reshape(-1)[order][:, None]
        out = jnp.zeros(x.shape, y.dtype).at[token].add(y)
        return out.astype(x.dtype).reshape(shape)


class _Experts(nn.Module):
    """transformers' `experts`: gate and up fused in one projection, then down."""

    count: int
    intermediate: int
    hidden: int
    act: str
    dtype: Any = None

    @nn.compact
    def __call__(self, rows, sizes):
        def dense(features, name):
            return GroupedDense(features, self.count, dtype=self.dtype, name=name)

        gate, up = jnp.split(dense(2 * self.intermediate, "gate_up_proj")(rows, sizes), 2, -1)
        return dense(self.hidden, "down_proj")(common.activation(self.act)(gate) * up, sizes)
