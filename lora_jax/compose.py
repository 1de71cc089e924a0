"""Functions from adapter trees to adapter trees: sums, averages, SVD, TIES/DARE, task arithmetic.

Inputs are adapters as `lj.split` gives them, each with its LoraConfig; every function
returns `(adapter, config)` with the scales folded in, as peft's `add_weighted_adapter` does:
the result's alpha equals its rank, so its scale is 1 and its update is exactly A·B. Modules
present in only some adapters combine those adapters only. Layers stacked by `nn.scan` are
combined layer by layer (pruning and SVD are per layer, as peft sees them). Everything is pure
and jit-able; DARE's random pruning takes a PRNG key.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import traverse_util

from lora_jax.config import LoraConfig
from lora_jax.tree import (
    ADAPTER_LEAVES,
    LORA_A,
    LORA_B,
    Bank,
    Params,
    Site,
    combine,
    path_str,
    refuse_bank,
    sites,
)

Adapters = Sequence[Params]
Keys = tuple[Any, ...]


class Part(NamedTuple):
    """One adapter's share of a module: its site (with the scale), its weight, its index."""

    site: Site
    weight: float
    index: int


Parts = dict[Keys, list[Part]]


def _checked(
    adapters: Adapters, configs: Sequence[LoraConfig], weights: Sequence[float], base: Params
) -> tuple[Parts, dict[Keys, Any], list[int]]:
    """Each adapted module's parts (sites laid out against `base`), the fully trained leaves
    (modules_to_save, which must come from one adapter only), and each adapter's top rank."""
    if not adapters or not (len(adapters) == len(configs) == len(weights)):
        raise ValueError(
            f"{len(adapters)} adapters, {len(configs)} configs, {len(weights)} weights: give "
            "at least one adapter and one config and one weight per adapter."
        )
    modules: Parts = {}
    saved: dict[Keys, Any] = {}
    ranks = []
    for i, (adapter, config, weight) in enumerate(zip(adapters, configs, weights, strict=True)):
        found = sites(combine(adapter, base), config, "compose")
        for site in found:
            if site.magnitude is not None:
                raise ValueError(f"{site.path}: DoRA adapters cannot be composed.")
            modules.setdefault(site.keys, []).append(Part(site, float(weight), i))
        ranks.append(max((site.rank for site in found), default=0))
        for keys, leaf in traverse_util.flatten_dict(adapter).items():
            if keys[-1] in ADAPTER_LEAVES:
                continue
            if keys in saved:
                raise ValueError(
                    f"{path_str(keys)}: fully trained in several adapters "
                    "(modules_to_save), which cannot be combined."
                )
            saved[keys] = leaf
    if not modules:
        raise ValueError("the adapters hold no lora_a/lora_b leaves.")
    return modules, saved, ranks


def _result_config(configs: Sequence[LoraConfig], rank: int) -> LoraConfig:
    """peft's choice: rank r, alpha r (scale 1), the union of the targets."""
    targets = tuple(dict.fromkeys(t for c in configs for t in c.targets))
    saved = tuple(dict.fromkeys(t for c in configs for t in c.modules_to_save))
    return LoraConfig(
        rank=rank, alpha=float(rank), targets=targets, modules_to_save=saved, dtype=configs[0].dtype
    )


def _pad_rank(x: jax.Array, axis: int, rank: int) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, rank - x.shape[axis])
    return jnp.pad(x, pad)


def _assemble(configs, out_modules, saved, rank):
    flat = {
        (*keys, name): leaf for keys, leaves in out_modules.items() for name, leaf in leaves.items()
    }
    flat.update(saved)
    return traverse_util.unflatten_dict(flat), _result_config(configs, rank)


# ----------------------------------------------------------------------------- exact sums


def cat(
    adapters: Adapters,
    configs: Sequence[LoraConfig],
    weights: Sequence[float] | None = None,
    *,
    rank: int | None = None,
    base: Params,
) -> tuple[dict[str, Any], LoraConfig]:
    """Σ wᵢ·sᵢ·Aᵢ·Bᵢ exactly: A and B concatenated along the rank axis (rank Σ rᵢ, or `rank`
    if larger), the weights and scales folded into A, zero-padded where a module lacks some
    adapters. `cat([adapter], [config], rank=R)` pads one adapter to rank R, so adapters of
    different ranks swap into one jitted function without recompiling."""
    weights = [1.0] * len(adapters) if weights is None else list(weights)
    modules, saved, ranks = _checked(adapters, configs, weights, base)
    if rank is not None and rank < sum(ranks):
        raise ValueError(f"rank {rank} is below the adapters' total rank, {sum(ranks)}.")
    rank = rank or sum(ranks)
    out = {}
    for keys, parts in modules.items():
        lead = parts[0].site.lead
        a = jnp.concatenate([p.site.update_a * (p.weight * p.site.scale) for p in parts], axis=-1)
        b = jnp.concatenate([p.site.lora_b for p in parts], axis=lead)
        out[keys] = {LORA_A: _pad_rank(a, a.ndim - 1, rank), LORA_B: _pad_rank(b, lead, rank)}
    return _assemble(configs, out, saved, rank)


def stack(
    adapters: Adapters, configs: Sequence[LoraConfig], rank: int | None = None, *, base: Params
) -> tuple[dict[str, Any], LoraConfig]:
    """A bank: several adapters side by side for `lj.routed_apply` (and nothing else: its
    A and B leaves are `lj.Bank` boxes, which every other function refuses). Block k of every
    A and B is adapter k, its scale folded in and zero-padded to `rank` (default: the
    largest), zeros where it does not adapt a module; banks of the same count and rank swap
    into one jitted function without recompiling."""
    modules, saved, ranks = _checked(adapters, configs, [1.0] * len(adapters), base)
    biggest = max(ranks)
    rank = rank or biggest
    if rank < biggest:
        raise ValueError(f"rank {rank} is below the largest adapter rank, {biggest}.")
    out = {}
    for keys, parts in modules.items():
        first = parts[0].site
        lead, a0, b0 = first.lead, first.lora_a, first.lora_b
        by_index = {p.index: p.site for p in parts}
        blocks_a, blocks_b = [], []
        for i in range(len(adapters)):
            if (site := by_index.get(i)) is not None:
                a, b = site.update_a * site.scale, site.lora_b
            else:
                a = jnp.zeros((*a0.shape[:-1], 1), a0.dtype)
                b = jnp.zeros((*b0.shape[:lead], 1, *b0.shape[lead + 1 :]), b0.dtype)
            blocks_a.append(_pad_rank(a, a.ndim - 1, rank))
            blocks_b.append(_pad_rank(b, lead, rank))
        out[keys] = {LORA_A: Bank(jnp.concatenate(blocks_a, axis=-1), rank),
                     LORA_B: Bank(jnp.concatenate(blocks_b, axis=lead), rank)}  # fmt: skip
    return _assemble(configs, out, saved, rank)


def scale(adapter: Params, factor: float) -> dict[str, Any]:
    """The adapter whose update is `factor` times this one's (B scaled; task arithmetic)."""
    flat = traverse_util.flatten_dict(adapter)
    for keys, leaf in flat.items():
        refuse_bank(path_str(keys[:-1]), leaf, "compose.scale")
    return traverse_util.unflatten_dict(
        {k: v * factor if k[-1] == LORA_B else v for k, v in flat.items()}
    )


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
    *,
    base: Params,
) -> tuple[dict[str, Any], LoraConfig]:
    """peft's task-arithmetic family: A and B combined separately with weights √|wᵢsᵢ|
    (the sign on A), after pruning each factor (TIES/magnitude: largest; DARE: random)."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density is {density}; must be in [0, 1].")
    if sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method {sign_method!r}; use 'total' or 'frequency'.")
    if method.startswith("dare") and key is None:
        raise ValueError(f"{method} prunes at random: pass a PRNG key.")
    modules, saved, _ = _checked(adapters, configs, weights, base)
    ranks = {p.site.rank for parts in modules.values() for p in parts}
    if len(ranks) != 1:
        raise ValueError(
            f"{method} needs every adapter at the same rank; got ranks {sorted(ranks)}."
        )
    out = {}
    for i, (keys, parts) in enumerate(sorted(modules.items())):
        lead = parts[0].site.lead
        scaled = jnp.asarray([p.weight * p.site.scale for p in parts])
        root = jnp.sqrt(jnp.abs(scaled))
        sub = None if key is None else jax.random.split(jax.random.fold_in(key, i))
        a = _combine_factor(
            [p.site.update_a for p in parts],
            root * jnp.sign(scaled),
            lead,
            method,
            density,
            sign_method,
            None if sub is None else sub[0],
        )
        b = _combine_factor(
            [p.site.lora_b for p in parts],
            root,
            lead,
            method,
            density,
            sign_method,
            None if sub is None else sub[1],
        )
        out[keys] = {LORA_A: a, LORA_B: b}
    return _assemble(configs, out, saved, ranks.pop())


def linear(
    adapters: Adapters, configs: Sequence[LoraConfig], weights: Sequence[float], *, base: Params
):
    """Weighted sum of the A's and of the B's (same ranks): cheap, only approximately the sum
    of the updates (peft: "a very rough approximation")."""
    return _factorwise("linear", adapters, configs, weights, base=base)


def ties(
    adapters: Adapters,
    configs: Sequence[LoraConfig],
    weights: Sequence[float],
    density: float,
    majority_sign_method: str = "total",
    *,
    base: Params,
):
    """TIES-merging of each factor: keep the top `density` magnitudes, elect a sign per entry,
    average the entries that agree with it."""
    return _factorwise("ties", adapters, configs, weights, density, majority_sign_method,
                       base=base)  # fmt: skip


def magnitude_prune(
    adapters: Adapters,
    configs: Sequence[LoraConfig],
    weights: Sequence[float],
    density: float,
    *,
    base: Params,
):
    """Weighted sum of each factor after keeping its top `density` magnitudes."""
    return _factorwise("magnitude_prune", adapters, configs, weights, density, base=base)


def dare_linear(
    key: jax.Array,
    adapters: Adapters,
    configs: Sequence[LoraConfig],
    weights: Sequence[float],
    density: float,
    *,
    base: Params,
):
    """DARE: drop entries at random (keep probability `density`), rescale by 1/density, sum."""
    return _factorwise("dare_linear", adapters, configs, weights, density, key=key, base=base)


def dare_ties(key: jax.Array, adapters: Adapters, configs: Sequence[LoraConfig],
              weights: Sequence[float], density: float, majority_sign_method: str = "total",
              *, base: Params):  # fmt: skip
    """DARE's random drop and rescale, then TIES' sign election and disjoint mean."""
    return _factorwise("dare_ties", adapters, configs, weights, density, majority_sign_method, key,
                       base=base)  # fmt: skip


# ----------------------------------------------------------------------------- svd


def svd(
    adapters: Adapters,
    configs: Sequence[LoraConfig],
    weights: Sequence[float],
    rank: int | None = None,
    *,
    base: Params,
) -> tuple[dict[str, Any], LoraConfig, dict[str, jax.Array]]:
    """Σ wᵢ·sᵢ·Aᵢ·Bᵢ refactored to `rank` (default: the largest input rank) by truncated SVD,
    per layer. Also returns, per module path, the share of the update's energy (squared
    Frobenius norm) that the truncation discarded, one value per stacked layer."""
    modules, saved, ranks = _checked(adapters, configs, weights, base)
    rank = rank or max(ranks)
    out, discarded = {}, {}
    for keys, parts in modules.items():
        first = parts[0].site
        lead, a0, b0 = first.lead, first.lora_a, first.lora_b
        ins, outs = a0.shape[lead:-1], b0.shape[lead + 1 :]
        fan_in, fan_out = math.prod(ins), math.prod(outs)
        if rank > min(fan_in, fan_out):
            raise ValueError(f"{first.path}: svd rank {rank} > min({fan_in}, {fan_out}).")
        layers = a0.shape[:lead]

        delta = sum(
            (p.weight * p.site.scale)
            * jnp.matmul(
                p.site.update_a.reshape(*layers, fan_in, -1).astype(jnp.float32),
                p.site.lora_b.reshape(*layers, -1, fan_out).astype(jnp.float32),
                precision="highest",
            )
            for p in parts
        )
        u, s, vt = jnp.linalg.svd(delta, full_matrices=False)
        energy = jnp.square(s)
        discarded[first.path] = energy[..., rank:].sum(-1) / jnp.maximum(energy.sum(-1), 1e-30)
        a = u[..., :rank] * s[..., None, :rank]
        b = vt[..., :rank, :]
        dtype = a0.dtype
        out[keys] = {
            LORA_A: a.reshape(*layers, *ins, rank).astype(dtype),
            LORA_B: b.reshape(*layers, rank, *outs).astype(dtype),
        }
    adapter, config = _assemble(configs, out, saved, rank)
    return adapter, config, discarded
