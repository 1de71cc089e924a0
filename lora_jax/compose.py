"""Functions from adapter trees to adapter trees: sums, averages, SVD, TIES/DARE, task arithmetic.

Inputs are adapters as `lj.extract` gives them, each with its LoraConfig; every function
returns `(adapter, config)` with the scales folded in, as peft's `add_weighted_adapter` does:
the result's alpha equals its rank, so its scale is 1 and its update is exactly A·B. Modules
present in only some adapters combine those adapters only. Layers stacked by `nn.scan` are
combined layer by layer (pruning and SVD are per layer, as peft sees them). Everything is pure
and jit-able; DARE's random pruning takes a PRNG key.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.config import LoraConfig
from lora_jax.tree import (
    ADAPTER_LEAVES,
    LORA_A,
    LORA_B,
    LORA_M,
    Keys,
    Params,
    _flatten,
    _modules,
    _unflatten,
    path_str,
)

Adapters = Sequence[Params]


def _checked(adapters: Adapters, configs: Sequence[LoraConfig], weights: Sequence[float]):
    if not adapters or not (len(adapters) == len(configs) == len(weights)):
        raise ValueError(
            f"{len(adapters)} adapters, {len(configs)} configs, {len(weights)} weights: give "
            "at least one adapter and one config and one weight per adapter."
        )
    modules: dict[Keys, list[tuple[dict[str, Any], LoraConfig, float]]] = {}
    saved: dict[Keys, Any] = {}
    for adapter, config, weight in zip(adapters, configs, weights, strict=True):
        for keys, leaves in _modules(_flatten(adapter)).items():
            if LORA_M in leaves:
                raise ValueError(f"{path_str(keys)}: DoRA adapters cannot be composed.")
            if LORA_A in leaves:
                modules.setdefault(keys, []).append((leaves, config, float(weight)))
            for name, leaf in leaves.items():
                if name in ADAPTER_LEAVES:
                    continue
                if (*keys, name) in saved:
                    raise ValueError(
                        f"{path_str((*keys, name))}: fully trained in several adapters "
                        "(modules_to_save), which cannot be combined."
                    )
                saved[(*keys, name)] = leaf
    if not modules:
        raise ValueError("the adapters hold no lora_a/lora_b leaves.")
    return modules, saved


def _result_config(configs: Sequence[LoraConfig], rank: int) -> LoraConfig:
    """peft's choice: rank r, alpha r (scale 1), the union of the targets."""
    targets = tuple(dict.fromkeys(t for c in configs for t in c.targets))
    saved = tuple(dict.fromkeys(t for c in configs for t in c.modules_to_save))
    return LoraConfig(
        rank=rank, alpha=float(rank), targets=targets, modules_to_save=saved, dtype=configs[0].dtype
    )


def _scale(keys: Keys, leaves: dict[str, Any], config: LoraConfig) -> float:
    return config.scale_for(path_str(keys), leaves[LORA_A].shape[-1])


def _lead(leaves: dict[str, Any]) -> int:
    """Stacked-layer axes of A = lead+in+(r,), B = lead+(r,)+out, read from the two shapes.

    Without the kernel a few shapes read two ways (e.g. an unstacked kernel with two input
    axes whose first size and output size both equal the rank); the most stacked reading is
    taken, which is what scanned models hold.
    """
    a, b = leaves[LORA_A].shape, leaves[LORA_B].shape
    fits = [
        lead
        for lead in range(min(len(a), len(b)) - 1)
        if a[:lead] == b[:lead] and b[lead] == a[-1] and len(a) - lead >= 2
    ]
    if not fits:
        raise ValueError(f"lora_a {a} and lora_b {b} are not lead+in+(r,) and lead+(r,)+out.")
    return fits[-1]


def _pad_rank(x: jax.Array, axis: int, rank: int) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, rank - x.shape[axis])
    return jnp.pad(x, pad)


def _assemble(configs, out_modules, saved, rank):
    flat = {
        (*keys, name): leaf for keys, leaves in out_modules.items() for name, leaf in leaves.items()
    }
    flat.update(saved)
    return _unflatten(flat), _result_config(configs, rank)


# ----------------------------------------------------------------------------- exact sums


def cat(
    adapters: Adapters, configs: Sequence[LoraConfig], weights: Sequence[float] | None = None
) -> tuple[dict[str, Any], LoraConfig]:
    """Σ wᵢ·sᵢ·Aᵢ·Bᵢ exactly: A and B concatenated along the rank axis (rank = Σ rᵢ), the
    weights and scales folded into A, zero-padded where a module lacks some adapters."""
    weights = [1.0] * len(adapters) if weights is None else list(weights)
    modules, saved = _checked(adapters, configs, weights)
    rank = sum(max(_ranks(a)) for a in adapters)
    out = {}
    for keys, parts in modules.items():
        lead = _lead(parts[0][0])
        a = jnp.concatenate([p[LORA_A] * (w * _scale(keys, p, c)) for p, c, w in parts], axis=-1)
        b = jnp.concatenate([p[LORA_B] for p, _, _ in parts], axis=lead)
        out[keys] = {LORA_A: _pad_rank(a, a.ndim - 1, rank), LORA_B: _pad_rank(b, lead, rank)}
    return _assemble(configs, out, saved, rank)


def stack(
    adapters: Adapters, configs: Sequence[LoraConfig], rank: int | None = None
) -> tuple[dict[str, Any], LoraConfig]:
    """Several adapters side by side for `lj.routed_apply`: block k of every A and B is
    adapter k, its scale folded in and zero-padded to `rank` (default: the largest), zeros
    where it does not adapt a module. With one adapter, this pads it to `rank`, so adapters
    of different ranks swap in a jitted function without recompiling."""
    modules, saved = _checked(adapters, configs, [1.0] * len(adapters))
    biggest = max(r for a in adapters for r in _ranks(a))
    rank = rank or biggest
    if rank < biggest:
        raise ValueError(f"rank {rank} is below the largest adapter rank, {biggest}.")
    flats = [_modules(_flatten(a)) for a in adapters]
    out = {}
    for keys, parts in modules.items():
        lead = _lead(parts[0][0])
        a0, b0 = parts[0][0][LORA_A], parts[0][0][LORA_B]
        blocks_a, blocks_b = [], []
        for flat, config in zip(flats, configs, strict=True):
            leaves = flat.get(keys, {})
            if LORA_A in leaves:
                a = leaves[LORA_A] * _scale(keys, leaves, config)
                b = leaves[LORA_B]
            else:
                a = jnp.zeros((*a0.shape[:-1], 1), a0.dtype)
                b = jnp.zeros((*b0.shape[:lead], 1, *b0.shape[lead + 1 :]), b0.dtype)
            blocks_a.append(_pad_rank(a, a.ndim - 1, rank))
            blocks_b.append(_pad_rank(b, lead, rank))
        out[keys] = {LORA_A: jnp.concatenate(blocks_a, axis=-1),
                     LORA_B: jnp.concatenate(blocks_b, axis=lead)}  # fmt: skip
    return _assemble(configs, out, saved, rank)


def _ranks(adapter: Params) -> list[int]:
    return [m[LORA_A].shape[-1] for m in _modules(_flatten(adapter)).values() if LORA_A in m]


def scale(adapter: Params, factor: float) -> dict[str, Any]:
    """The adapter whose update is `factor` times this one's (B scaled; task arithmetic)."""
    flat = _flatten(adapter)
    return _unflatten({k: v * factor if k[-1] == LORA_B else v for k, v in flat.items()})


def negate(adapter: Params) -> dict[str, Any]:
    """The opposite update: subtracting a task (task arithmetic's negation)."""
    return scale(adapter, -1.0)


# ----------------------------------------------------------------------------- per factor


def _per_layer(fn, x: jax.Array, lead: int) -> jax.Array:
    for _ in range(lead):
        fn = jax.vmap(fn)
    return fn(x)


def _magnitude_prune(x: jax.Array, density: float) -> jax.Array:
    """Keeps the round(density·size) largest magnitudes (peft: int(density·numel))."""
    k = int(density * x.size)
    if density >= 1:
        return x
    flat = jnp.abs(x).reshape(-1)
    kept = jnp.zeros(flat.shape, bool).at[jax.lax.top_k(flat, k)[1]].set(k > 0)
    return jnp.where(kept.reshape(x.shape), x, 0)


def _random_prune(key: jax.Array, x: jax.Array, density: float) -> jax.Array:
    if density >= 1:
        return x
    return jnp.where(jax.random.bernoulli(key, density, x.shape), x / density, 0)


def _disjoint(stacked: jax.Array, weighted: jax.Array, method: str) -> jax.Array:
    """TIES: keep entries agreeing with the majority sign, average over those kept."""
    sign = jnp.sign(stacked)
    votes = stacked.sum(0) if method == "total" else sign.sum(0)
    agree = sign == jnp.where(votes >= 0, 1.0, -1.0)
    return (weighted * agree).sum(0) / jnp.maximum(agree.sum(0), 1.0)


def _combine_factor(
    factors: list[jax.Array],
    weights: jax.Array,
    lead: int,
    method: str,
    density: float,
    sign_method: str,
    key: jax.Array | None,
) -> jax.Array:
    if method in ("ties", "magnitude_prune"):
        factors = [_per_layer(lambda x: _magnitude_prune(x, density), f, lead) for f in factors]
    elif method.startswith("dare"):
        keys = jax.random.split(key, len(factors))
        factors = [_random_prune(k, f, density) for k, f in zip(keys, factors, strict=True)]
    stacked = jnp.stack(factors)
    weighted = stacked * weights.reshape(-1, *(1,) * (stacked.ndim - 1))
    if method in ("ties", "dare_ties"):
        return _disjoint(stacked, weighted, sign_method)
    return weighted.sum(0)


def _factorwise(
    method: str,
    adapters: Adapters,
    configs: Sequence[LoraConfig],
    weights: Sequence[float],
    density: float = 1.0,
    sign_method: str = "total",
    key: jax.Array | None = None,
) -> tuple[dict[str, Any], LoraConfig]:
    """peft's task-arithmetic family: A and B combined separately with weights √|wᵢsᵢ|
    (the sign on A), after pruning each factor (TIES/magnitude: largest; DARE: random)."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density is {density}; must be in [0, 1].")
    if sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method {sign_method!r}; use 'total' or 'frequency'.")
    if method.startswith("dare") and key is None:
        raise ValueError(f"{method} prunes at random: pass a PRNG key.")
    modules, saved = _checked(adapters, configs, weights)
    ranks = {r for a in adapters for r in _ranks(a)}
    if len(ranks) != 1:
        raise ValueError(
            f"{method} needs every adapter at the same rank; got ranks {sorted(ranks)}."
        )
    out = {}
    for i, (keys, parts) in enumerate(sorted(modules.items())):
        lead = _lead(parts[0][0])
        scaled = jnp.asarray([w * _scale(keys, p, c) for p, c, w in parts])
        root = jnp.sqrt(jnp.abs(scaled))
        sub = None if key is None else jax.random.split(jax.random.fold_in(key, i))
        a = _combine_factor(
            [p[LORA_A] for p, _, _ in parts],
            root * jnp.sign(scaled),
            lead,
            method,
            density,
            sign_method,
            None if sub is None else sub[0],
        )
        b = _combine_factor(
            [p[LORA_B] for p, _, _ in parts],
            root,
            lead,
            method,
            density,
            sign_method,
            None if sub is None else sub[1],
        )
        out[keys] = {LORA_A: a, LORA_B: b}
    return _assemble(configs, out, saved, ranks.pop())


def linear(adapters: Adapters, configs: Sequence[LoraConfig], weights: Sequence[float]):
    """Weighted sum of the A's and of the B's (same ranks): cheap, only approximately the sum
    of the updates (peft: "a very rough approximation")."""
    return _factorwise("linear", adapters, configs, weights)


def ties(
    adapters: Adapters,
    configs: Sequence[LoraConfig],
    weights: Sequence[float],
    density: float,
    majority_sign_method: str = "total",
):
    """TIES-merging of each factor: keep the top `density` magnitudes, elect a sign per entry,
    average the entries that agree with it."""
    return _factorwise("ties", adapters, configs, weights, density, majority_sign_method)


def magnitude_prune(
    adapters: Adapters, configs: Sequence[LoraConfig], weights: Sequence[float], density: float
):
    """Weighted sum of each factor after keeping its top `density` magnitudes."""
    return _factorwise("magnitude_prune", adapters, configs, weights, density)


def dare_linear(
    key: jax.Array,
    adapters: Adapters,
    configs: Sequence[LoraConfig],
    weights: Sequence[float],
    density: float,
):
    """DARE: drop entries at random (keep probability `density`), rescale by 1/density, sum."""
    return _factorwise("dare_linear", adapters, configs, weights, density, key=key)


def dare_ties(
    key: jax.Array,
    adapters: Adapters,
    configs: Sequence[LoraConfig],
    weights: Sequence[float],
    density: float,
    majority_sign_method: str = "total",
):
    """DARE's random drop and rescale, then TIES' sign election and disjoint mean."""
    return _factorwise("dare_ties", adapters, configs, weights, density, majority_sign_method, key)


# ----------------------------------------------------------------------------- svd


def svd(
    adapters: Adapters,
    configs: Sequence[LoraConfig],
    weights: Sequence[float],
    rank: int | None = None,
) -> tuple[dict[str, Any], LoraConfig, dict[str, jax.Array]]:
    """Σ wᵢ·sᵢ·Aᵢ·Bᵢ refactored to `rank` (default: the largest input rank) by truncated SVD,
    per layer. Also returns, per module path, the share of the update's energy (squared
    Frobenius norm) that the truncation discarded, one value per stacked layer."""
    modules, saved = _checked(adapters, configs, weights)
    rank = rank or max(r for a in adapters for r in _ranks(a))
    out, discarded = {}, {}
    for keys, parts in modules.items():
        lead = _lead(parts[0][0])
        a0, b0 = parts[0][0][LORA_A], parts[0][0][LORA_B]
        ins, outs = a0.shape[lead:-1], b0.shape[lead + 1 :]
        fan_in, fan_out = math.prod(ins), math.prod(outs)
        if rank > min(fan_in, fan_out):
            raise ValueError(f"{path_str(keys)}: svd rank {rank} > min({fan_in}, {fan_out}).")
        layers = a0.shape[:lead]

        delta = sum(
            (w * _scale(keys, p, c))
            * jnp.matmul(
                p[LORA_A].reshape(*layers, fan_in, -1).astype(jnp.float32),
                p[LORA_B].reshape(*layers, -1, fan_out).astype(jnp.float32),
                precision="highest",
            )
            for p, c, w in parts
        )
        u, s, vt = jnp.linalg.svd(delta, full_matrices=False)
        energy = jnp.square(s)
        discarded[path_str(keys)] = energy[..., rank:].sum(-1) / jnp.maximum(energy.sum(-1), 1e-30)
        a = u[..., :rank] * s[..., None, :rank]
        b = vt[..., :rank, :]
        dtype = a0.dtype
        out[keys] = {
            LORA_A: a.reshape(*layers, *ins, rank).astype(dtype),
            LORA_B: b.reshape(*layers, rank, *outs).astype(dtype),
        }
    adapter, config = _assemble(configs, out, saved, rank)
    return adapter, config, discarded
