"""AdaLoRA (Zhang et al. 2023; peft's AdaLoraModel and RankAllocator) on parameter trees.

Each adapted module holds A (lead + in + (r,)), E (`lora_e`, lead + (r,)) and B
(lead + (r,) + out), and adds s·(x·A·diag(E))·B with s = α/(r + 1e-5): an SVD-shaped update
whose singular values E are pruned during training, so a rank budget moves to the modules
and layers that use it. Pruned entries of E are held at zero and the arrays keep their
initial rank: stacked layers share one shape, and peft's files are sliced on save (`io`).

`adalora_allocator` wraps any optax transformation with peft's RankAllocator: importance
|w·∇w| smoothed by two EMAs, a cubic budget schedule, and a mask on E. `adalora_penalty` is
the orthogonality regulariser, a loss term of the adapter for `make_step(penalty=...)`. The
update's own maths (E folded into A, the init, the scale) is in `variants`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from lora_jax.config import LoraConfig
from lora_jax.tree import LORA_A, LORA_B, LORA_E, as_dict, path_str
from lora_jax.variants import einsum32


def _triplets(tree: Any) -> dict[tuple, tuple[Any, Any, Any]]:
    """Module keys -> (A, B, E) of every AdaLoRA module of a (sub)tree of nested dicts."""
    flat = traverse_util.flatten_dict(tree)
    return {k[:-1]: (flat[(*k[:-1], LORA_A)], flat[(*k[:-1], LORA_B)], v)
            for k, v in flat.items() if k[-1] == LORA_E}  # fmt: skip


def adalora_penalty(config: LoraConfig) -> Callable[[Any], jax.Array]:
    """The orthogonality regulariser: orth_reg_weight times the mean over every layer's A and
    B of ||AᵀA - I||_F and ||BBᵀ - I||_F (r x r), peft's term added to the loss."""
    weight = config.adalora.orth_reg_weight

    def term(adapter: Any) -> jax.Array:
        total, count = jnp.float32(0), 0
        for a, b, e in _triplets(adapter).values():
            lead = e.ndim - 1
            layers = math.prod(e.shape[:lead])
            a2 = a.reshape(layers, -1, a.shape[-1])  # (layers, fan_in, r)
            b2 = b.reshape(layers, b.shape[lead], -1)  # (layers, r, fan_out)
            eye = jnp.eye(a.shape[-1], dtype=jnp.float32)
            for gram in (einsum32("lir,lis->lrs", a2, a2), einsum32("lro,lso->lrs", b2, b2)):
                total += jnp.sum(jnp.linalg.norm(gram - eye, axis=(-2, -1)))
            count += 2 * layers
        return weight * total / max(count, 1)

    return term


def adalora_ranks(params: Any) -> dict[str, np.ndarray]:
    """Module path -> the ranks each of its layers keeps (E's nonzero entries), shape lead."""
    return {path_str(k): np.count_nonzero(np.asarray(e), axis=-1)
            for k, (_, _, e) in _triplets(as_dict(params)).items()}  # fmt: skip


class AdaLoraState(NamedTuple):
    """The allocator's state: the step, the two EMAs of each adapter leaf's importance, the
    final pattern of E (fixed at `AdaLora.final_step`), and the wrapped transformation's."""

    count: jax.Array
    ipt: Any  # EMA of |w·∇w|, like the adapter (float32)
    unc: Any  # EMA of |importance - its EMA|
    keep: Any  # like the adapter (bool, so optax lays it out as the adapter); read on E
    inner: optax.OptState


def budget_schedule(
    config: LoraConfig, init_budget: int, target_budget: int
) -> tuple[np.ndarray, np.ndarray]:
    """(budget, whether to mask) for steps 0..final_step: peft's `budget_schedule` in Python
    floats, so every int() rounds as peft's does. The initial budget until tinit, then a cubic
    fall to the target, a mask every delta_t steps and at final_step (the target reached)."""
    spec = config.adalora
    final = spec.final_step
    budgets, masks = np.full(final + 1, init_budget, np.int64), np.zeros(final + 1, bool)
    for step in range(spec.tinit + 1, final + 1):
        mul = 1 - (step - spec.tinit) / (final - spec.tinit)
        budgets[step] = int((init_budget - target_budget) * (mul**3) + target_budget)
        masks[step] = step % spec.delta_t == 0 or step == final
    return budgets, masks


def _scores(ipt: Any, unc: Any) -> dict[tuple, jax.Array]:
    """Module keys -> each triplet's importance (lead + (r,)): E's score plus the mean score
    of its column of A and of its row of B, a score being EMA(importance) · EMA(uncertainty)."""
    out, uncs = {}, _triplets(unc)
    for keys, (a_i, b_i, e_i) in _triplets(ipt).items():
        a_u, b_u, e_u = uncs[keys]
        lead = e_i.ndim - 1
        a_s = jnp.mean(a_i * a_u, axis=tuple(range(lead, a_i.ndim - 1)))
        b_s = jnp.mean(b_i * b_u, axis=tuple(range(lead + 1, b_i.ndim)))
        out[keys] = e_i * e_u + (a_s + b_s)
    return out


def adalora_allocator(
    tx: optax.GradientTransformation, config: LoraConfig
) -> optax.GradientTransformation:
    """`tx` (e.g. `lj.optimizer(optax.adamw(...), adapter, config)`) followed by AdaLoRA's
    rank allocation, on the adapter tree (`lj.split`), as peft's `update_and_allocate` after
    each optimizer step: importance |w·∇w| of the stepped weights with this step's gradients
    (EMAs until final_step), and on the schedule's steps E's least important entries set to
    zero so that the kept ranks meet the budget; from final_step on, the final pattern."""
    spec = config.adalora
    if spec is None or spec.total_steps is None:
        raise ValueError("adalora allocator: the config needs adalora=AdaLora(total_steps=...).")
    inner = optax.with_extra_args_support(tx)
    final = spec.final_step

    def init(params: Any) -> AdaLoraState:
        def zeros():  # one tree per EMA: a step that donates its state needs distinct buffers
            return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)

        keep = jax.tree.map(lambda p: jnp.ones(jnp.shape(p), bool), params)
        return AdaLoraState(jnp.zeros((), jnp.int32), zeros(), zeros(), keep, inner.init(params))

    def update(grads: Any, state: AdaLoraState, params: Any = None, **extra: Any):
        if params is None:
            raise ValueError("adalora allocator: update needs the params (importance is |w·∇w|).")
        updates, inner_state = inner.update(grads, state.inner, params, **extra)
        stepped = optax.apply_updates(params, updates)
        count, learning = state.count, state.count < final

        def ema(avg, unc, w, g):
            now = jnp.abs(w.astype(jnp.float32) * g.astype(jnp.float32))
            avg_new = spec.beta1 * avg + (1 - spec.beta1) * now
            unc_new = spec.beta2 * unc + (1 - spec.beta2) * jnp.abs(now - avg_new)
            return jnp.where(learning, avg_new, avg), jnp.where(learning, unc_new, unc)

        pairs = jax.tree.map(ema, state.ipt, state.unc, stepped, grads)
        ipt = jax.tree.map(lambda _, p: p[0], params, pairs)
        unc = jax.tree.map(lambda _, p: p[1], params, pairs)

        scores = _scores(ipt, unc)
        layer_count = sum(math.prod(s.shape[:-1]) for s in scores.values())
        init_budget = sum(s.size for s in scores.values())
        budgets, masks = budget_schedule(config, init_budget, spec.target_rank * layer_count)
        at = jnp.minimum(count, final)
        cut = init_budget - jnp.asarray(budgets)[at]  # how many triplets go
        ranked = jnp.sort(jnp.concatenate([s.ravel() for s in scores.values()]))
        threshold = jnp.where(cut > 0, ranked[jnp.maximum(cut - 1, 0)], -jnp.inf)
        masking, after = jnp.asarray(masks)[at], count > final  # after: the final pattern

        flat_updates, flat_params = _flat(updates), _flat(params)
        flat_keep = _flat(state.keep)
        for keys, score in scores.items():
            e_keys = (*keys, LORA_E)
            now = score > threshold
            used = jnp.where(after, flat_keep[e_keys], jnp.where(masking, now, True))
            flat_keep[e_keys] = jnp.where(count == final, now, flat_keep[e_keys])
            flat_updates[e_keys] = jnp.where(used, flat_updates[e_keys], -flat_params[e_keys])
        new_state = AdaLoraState(count + 1, ipt, unc, _unflat(flat_keep), inner_state)
        return _unflat(flat_updates), new_state

    return optax.GradientTransformationExtraArgs(init, update)


def _flat(tree: Any) -> dict[tuple, Any]:
    return traverse_util.flatten_dict(tree, keep_empty_nodes=True)


def _unflat(flat: dict[tuple, Any]) -> Any:
    return traverse_util.unflatten_dict(flat)
