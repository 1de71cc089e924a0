"""The sparse mixture-of-experts block of Mixtral and Qwen3-MoE, named like transformers' runtime
modules: `mlp/gate` (the router, a Dense to one logit per expert) and `mlp/experts/gate_up_proj`
(E, hidden, 2·ff) and `mlp/experts/down_proj` (E, ff, hidden), one kernel per expert.

Each token goes to its top-k experts. The (token, expert) pairs are sorted by expert and run
as grouped matmuls (`lora_jax.grouped.GroupedDense`: ragged_dot on TPU and GPU, blocks of
rows on the CPU), so each expert computes only the tokens routed to it; the outputs are
weighted and summed back per token. On a mesh with an `expert` axis the experts split
over it and run in shard_map, each device only its own experts (`_Experts`). Each block
sows its router logits (collection "intermediates"), from which `load_balancing_loss`
computes transformers' auxiliary loss when the router is trained.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.core import lift
from jax.sharding import PartitionSpec

from lora_jax import sharding
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
        count, ff = c.num_experts, c.expert_intermediate_size
        logits = nn.Dense(count, use_bias=False, dtype=self.dtype, name=ROUTER)(x)
        self.sow("intermediates", ROUTER_LOGITS, logits.reshape(-1, count))  # (tokens, E)
        weights, experts = route(logits, c.experts_per_token, c.norm_topk_prob,
                                 c.float32_routing)  # fmt: skip
        manual = () if self.is_initializing() else _manual_axes(x.shape[0], count)
        layer = _shard_mapped(manual) if manual else _Experts
        experts_module = layer(count, ff, c.hidden_act, self.dtype, manual, name="experts")
        return experts_module(x, weights, experts)


def _manual_axes(batch: int, count: int) -> tuple[str, ...]:
    """Where the trace's mesh has an expert axis, the axes that split the batch (those of
    `sharding.BATCH` of more than one device), over which the experts run in shard_map, each
    device routing its own tokens; () without one (XLA partitions the experts like any
    layer), or where the batch does not split over them."""
    mesh = jax.sharding.get_abstract_mesh()
    shards = 1 if mesh.empty else mesh.shape.get(sharding.EXPERT, 1)
    if shards == 1:
        return ()
    if count % shards:
        raise ValueError(f"{count} experts do not split over the mesh's {shards} expert shards.")
    axes = tuple(a for a in sharding.batch_axes(mesh) if mesh.shape[a] > 1)
    return axes if batch % sharding.batch_shards(mesh) == 0 else ()


def _shard_mapped(manual: tuple[str, ...]) -> type[nn.Module]:
    """`_Experts` run in shard_map, manual over the batch axes `manual` (the tensor axis stays
    XLA's): each device's tokens (B, ...) in and out, every parameter split on its leading
    expert axis over `expert` where that is manual, and gathered whole over the others (a
    layer's fsdp all-gather, and in the backward its reduce-scatter)."""
    tokens = PartitionSpec(manual)
    params = PartitionSpec(sharding.EXPERT if sharding.EXPERT in manual else None)

    def lifted(fn):
        def inner(scope_fn, repack_fn, variable_groups, rng_groups, *args):
            def body(variable_groups, rng_groups, *args):
                # Each device its own dropout masks: the keys come in replicated.
                index = jax.lax.axis_index(manual)
                rng_groups = lift.tree_map_rngs(lambda k: jax.random.fold_in(k, index), rng_groups)
                scope = scope_fn(variable_groups, rng_groups)
                return fn(scope, *args), repack_fn(scope)

            mapped = jax.shard_map(
                body, in_specs=(params, PartitionSpec(), *(tokens,) * len(args)),
                out_specs=(tokens, PartitionSpec()), axis_names=set(manual),
            )  # fmt: skip
            return mapped(variable_groups, rng_groups, *args)

        # Parameters in; nothing written back (the experts sow nothing); rngs (dropout) in.
        return lift.pack(inner, (True,), (False,), (True,), name="shard_map")

    return nn.transforms.lift_transform(lifted, _Experts)


class _Experts(nn.Module):
    """transformers' `experts` (gate and up fused in one projection, then down) and the
    dispatch to them: the (token, expert) pairs sorted by expert, so each expert's rows are
    contiguous and it multiplies only those, then weighted and summed back per token.

    Run over a mesh's batch axes (`manual`), each device dispatches its own tokens; with an
    `expert` axis among them, each device holds E / n experts and runs MaxText's "ring of
    experts": the tokens of the n devices along the axis are gathered, each device runs the
    pairs of its own experts, and the partial sums are reduce-scattered back to their
    devices. Dropless: its rows buffer holds min(k, E / n) pairs of every token gathered, as
    many as could reach its experts."""

    count: int
    intermediate: int
    act: str
    dtype: Any = None
    manual: tuple[str, ...] = ()

    @nn.compact
    def __call__(self, x, weights, experts):
        ring = sharding.EXPERT in self.manual
        if ring:
            x, weights, experts = (jax.lax.all_gather(t, sharding.EXPERT, tiled=True)
                                   for t in (x, weights, experts))  # fmt: skip
        shape, k = x.shape, experts.shape[-1]
        x, flat = x.reshape(-1, shape[-1]), experts.reshape(-1)
        # This device's experts first (ids rotated so they are 0 .. local - 1), each
        # expert's rows contiguous; group sizes for the local experts only. A token picks k
        # distinct experts, so at most min(k, local) of its pairs are this device's: the
        # rows past that bound are others' and never computed.
        shards = jax.lax.axis_size(sharding.EXPERT) if ring else 1
        local, first = self.count // shards, 0
        if ring:
            first = jax.lax.axis_index(sharding.EXPERT) * local
        order = jnp.argsort((flat - first) % self.count, stable=True)
        order = order[: x.shape[0] * min(k, local)]
        token = order // k
        sizes = jnp.bincount(flat, length=self.count).astype(jnp.int32)
        sizes = jax.lax.dynamic_slice_in_dim(sizes, first, local)

        def dense(features, name):
            return GroupedDense(features, local, dtype=self.dtype, name=name)

        rows = x[token]
        gate, up = jnp.split(dense(2 * self.intermediate, "gate_up_proj")(rows, sizes), 2, -1)
        y = dense(shape[-1], "down_proj")(common.activation(self.act)(gate) * up, sizes)
        y = y * weights.reshape(-1)[order][:, None]
        out = jnp.zeros(x.shape, y.dtype).at[token].add(y).astype(x.dtype).reshape(shape)
        if ring:
            out = jax.lax.psum_scatter(out, sharding.EXPERT, tiled=True)
        return out
