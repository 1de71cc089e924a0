"""LoRA as a pure transform of nested-dict parameter trees (Linen params, NNX pure dicts, ...).

A targeted module's dict holds `kernel` of shape lead + in + out (lead: stacked-layer axes from
`nn.scan`, in/out: the input and output axes). `init` adds `lora_a` (lead + in + (r,)) and
`lora_b` (lead + (r,) + out) beside it, and for DoRA `lora_magnitude` (lead + out). From then
on the tree describes itself: the shapes determine lead, in and out (see `adapter_layout`), so
no other function needs the model.

Paths are '/'-joined dict keys relative to the params collection: a leading "params" key (a
Linen variables dict) is left out, so `{"params": {"attn": {"q": ...}}}` has module "attn/q".
Every function returns a new tree and shares, never copies or mutates, the arrays it keeps.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from flax.core import meta
from jax.sharding import PartitionSpec

from lora_jax.config import BASE_MODIFYING_INITS, LoraConfig

KERNEL = "kernel"
LORA_A = "lora_a"
LORA_B = "lora_b"
LORA_M = "lora_magnitude"  # DoRA: lead + out, the learned norm of each output unit's weights
ADAPTER_LEAVES = (LORA_A, LORA_B, LORA_M)
LORA, FROZEN = "lora", "frozen"

Params = Mapping[str, Any]
Keys = tuple[Any, ...]  # dict keys: str for Linen, also int for NNX lists
# Per module path: (number of input axes, number of output axes) of its kernel, or a string
# saying why that kernel cannot be adapted (see `lora_jax.apply.kernel_layouts`).
Layouts = Mapping[str, tuple[int, int] | str]


# ----------------------------------------------------------------------------- paths


def _flatten(params: Params) -> dict[Keys, Any]:
    # Empty dicts are kept so that `split` then `combine` restores the exact structure.
    return traverse_util.flatten_dict(params, keep_empty_nodes=True)


def _unflatten(flat: Mapping[Keys, Any]) -> dict[str, Any]:
    return traverse_util.unflatten_dict(dict(flat))


def path_str(keys: Keys) -> str:
    """'/'-joined path relative to the params collection (a leading "params" is dropped)."""
    return "/".join(str(k) for k in (keys[1:] if keys[:1] == ("params",) else keys))


def _modules(flat: Mapping[Keys, Any]) -> dict[Keys, dict[str, Any]]:
    """Leaves grouped by the dict (module) that holds them."""
    modules: dict[Keys, dict[str, Any]] = {}
    for keys, leaf in flat.items():
        if leaf is traverse_util.empty_node:
            modules.setdefault(keys, {})
        else:
            modules.setdefault(keys[:-1], {})[keys[-1]] = leaf
    return modules


def _adapted(flat: Mapping[Keys, Any]) -> dict[Keys, dict[str, Any]]:
    """The modules that hold an adapter."""
    return {k: m for k, m in _modules(flat).items() if any(n in m for n in ADAPTER_LEAVES)}


# ----------------------------------------------------------------------------- layout


def adapter_layout(
    path: str, kernel_shape: tuple[int, ...], a_shape: tuple[int, ...], b_shape: tuple[int, ...]
) -> tuple[int, int, int, int]:
    """(lead, n_in, n_out, rank) for a kernel and its factors, or a ValueError naming the path.

    Solves kernel = lead+in+out, A = lead+in+(r,), B = lead+(r,)+out for the axis counts, then
    checks every size, so a mis-shaped adapter is caught before it is used.
    """
    k, na, nb = len(kernel_shape), len(a_shape), len(b_shape)
    lead, n_in, n_out = na + nb - 2 - k, k - nb + 1, k - na + 1
    fits = (
        lead >= 0
        and n_in >= 1
        and n_out >= 1
        and a_shape[: lead + n_in] == kernel_shape[: lead + n_in]
        and b_shape[:lead] == kernel_shape[:lead]
        and b_shape[lead + 1 :] == kernel_shape[lead + n_in :]
        and a_shape[-1] == b_shape[lead]
    )
    if not fits:
        raise ValueError(
            f"{path}: lora_a {tuple(a_shape)} and lora_b {tuple(b_shape)} do not fit kernel "
            f"{tuple(kernel_shape)} (expected lead+in+(r,) and lead+(r,)+out)."
        )
    return lead, n_in, n_out, a_shape[-1]


@dataclasses.dataclass(frozen=True)
class Site:
    """One adapted module: its leaves and layout. The kernel is lead + in + out, lora_a
    lead + in + (rank,), lora_b lead + (rank,) + out; magnitude is DoRA's (lead + out)."""

    path: str
    kernel: Any
    lora_a: Any
    lora_b: Any
    magnitude: Any | None
    lead: int
    n_in: int
    n_out: int
    rank: int


def sites(params: Params) -> list[Site]:
    """Every adapted module of a tree in path order, laid out by `adapter_layout`. Kernels may
    be abstract (jax.ShapeDtypeStruct) or quantized: only their shapes are read here."""
    found = []
    for keys, leaves in sorted(_adapted(_flatten(params)).items(), key=lambda kv: path_str(kv[0])):
        path = path_str(keys)
        if not all(n in leaves for n in (KERNEL, LORA_A, LORA_B)):
            raise ValueError(f"{path}: an adapted module needs kernel, lora_a and lora_b; it "
                             f"holds {sorted(leaves)}.")  # fmt: skip
        w, a, b = leaves[KERNEL], leaves[LORA_A], leaves[LORA_B]
        layout = adapter_layout(path, tuple(w.shape), tuple(a.shape), tuple(b.shape))
        found.append(Site(path, w, a, b, leaves.get(LORA_M), *layout))
    return found


def _kernel_layout(path: str, shape: tuple[int, ...], layouts: Layouts | None) -> tuple[int, int]:
    given = (layouts or {}).get(path)
    if isinstance(given, str):
        raise ValueError(f"{path}: cannot be adapted: {given}")
    if given is not None:
        n_in, n_out = given
        if n_in < 1 or n_out < 1 or n_in + n_out > len(shape):
            raise ValueError(f"{path}: layout {given} does not fit kernel shape {shape}.")
        return n_in, n_out
    if len(shape) == 2:
        return 1, 1
    raise ValueError(
        f"{path}: kernel shape {shape} is ambiguous (a stacked nn.Dense, or an nn.DenseGeneral "
        "with several input or output axes?). Pass layouts=lj.kernel_layouts(model, *inputs), "
        "or a dict {path: (n_in, n_out)}."
    )


def _axes(w: jax.Array, lead: int, n_in: int) -> tuple[str, str, str]:
    """einsum letters for a kernel's layer, input and output axes (r, s name the rank axes)."""
    letters = "abcdefghijklmnopq"[: w.ndim]
    return letters[:lead], letters[lead : lead + n_in], letters[lead + n_in :]


def _einsum(spec: str, *operands: jax.Array) -> jax.Array:
    # einsum over the kernel's own axes, never a reshape: a reshape that merges sharded axes
    # is refused under explicit sharding, and this keeps every axis's sharding as it was.
    f32 = [x.astype(jnp.float32) for x in operands]
    return jnp.einsum(spec, *f32, precision=jax.lax.Precision.HIGHEST)


def _low_rank_update(w: jax.Array, a: jax.Array, b: jax.Array, lead: int, n_in: int) -> jax.Array:
    """A·B in float32, kernel-shaped: the update that merge adds (not used in the forward)."""
    layer, ins, outs = _axes(w, lead, n_in)
    return _einsum(f"{layer}{ins}r,{layer}r{outs}->{layer}{ins}{outs}", a, b)


def direction_norm(
    w: jax.Array, a: jax.Array, b: jax.Array, scale: float, lead: int, n_in: int
) -> jax.Array:
    """||W0 + s·A·B|| over the input axes, one per output unit (shape lead + out), in float32.

    DoRA's denominator, from ||W0||² + 2s·<AᵀW0, B> + s²·<(AᵀA)B, B>: thin matmuls only, so
    the kernel-sized W0 + s·A·B is never formed. init, merge and the forward all use it.
    """
    layer, ins, outs = _axes(w, lead, n_in)
    a_w = _einsum(f"{layer}{ins}r,{layer}{ins}{outs}->{layer}r{outs}", a, w)
    gram = _einsum(f"{layer}{ins}r,{layer}{ins}s->{layer}rs", a, a)
    gram_b = _einsum(f"{layer}rs,{layer}s{outs}->{layer}r{outs}", gram, b)
    b32 = b.astype(jnp.float32)
    cross, square = jnp.sum(b32 * a_w, axis=lead), jnp.sum(b32 * gram_b, axis=lead)
    w2 = jnp.sum(jnp.square(w.astype(jnp.float32)), axis=tuple(range(lead, lead + n_in)))
    return jnp.sqrt(jnp.maximum(w2 + 2 * scale * cross + scale**2 * square, 0.0))


# ----------------------------------------------------------------------------- init


def _init_a(key: jax.Array, shape: tuple[int, ...], fan_in: int, config: LoraConfig) -> jax.Array:
    rank = shape[-1]
    if config.init == "gaussian":  # peft's init_lora_weights="gaussian": N(0, 1/r)
        return jax.random.normal(key, shape, config.dtype) / rank
    # peft's default (kaiming_uniform with a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, config.dtype, -bound, bound)


def _principal(
    w: jax.Array, rank: int, scale: float, lead: int, n_in: int, kind: str
) -> tuple[jax.Array, jax.Array]:
    """PiSSA (top-r SVD) or OLoRA (QR) factors of W0 in float32, as peft computes them, such
    that scale·A·B is the part of W0 they take over."""
    layers, fan_in = math.prod(w.shape[:lead]), math.prod(w.shape[lead : lead + n_in])
    w3 = w.reshape(layers, fan_in, -1).astype(jnp.float32)
    if kind == "pissa":
        u, s, vt = jnp.linalg.svd(w3, full_matrices=False)
        root = jnp.sqrt(s[:, :rank] / scale)
        a, b = u[:, :, :rank] * root[:, None, :], root[:, :, None] * vt[:, :rank, :]
    else:  # olora: QR of the (out, in) weight, A = R[:r], B = Q[:, :r]
        q, r = jnp.linalg.qr(jnp.swapaxes(w3, 1, 2))
        a, b = jnp.swapaxes(r[:, :rank, :], 1, 2), jnp.swapaxes(q[:, :, :rank], 1, 2)
    return (a.reshape(*w.shape[: lead + n_in], rank),
            b.reshape(*w.shape[:lead], rank, *w.shape[lead + n_in :]))  # fmt: skip


def _no_adapter(flat: Mapping[Keys, Any], what: str) -> None:
    for keys in flat:
        if keys[-1] in ADAPTER_LEAVES:
            raise ValueError(
                f"{what}: the tree already holds an adapter at {path_str(keys[:-1])!r}; "
                "merge it (lj.merge) or take it out (lj.split) first."
            )


def _targets(modules: Mapping[Keys, Mapping[str, Any]], config: LoraConfig) -> list[Keys]:
    """Keys of the modules whose kernels get an adapter; ValueError if a target is unusable."""
    kernels = sorted((k for k, m in modules.items() if KERNEL in m), key=path_str)
    chosen = [k for k in kernels if config.is_target(path_str(k))]
    for keys, leaves in modules.items():
        path = path_str(keys)
        if KERNEL not in leaves and leaves and config.is_target(path, presets=False):
            raise ValueError(
                f"target matches {path!r}, which holds {sorted(leaves)} but no kernel; LoRA "
                "adapts Dense/DenseGeneral/Einsum kernels. Narrow `targets` or add `exclude`."
            )
    for keys in chosen:
        if config.is_saved(f"{path_str(keys)}/{KERNEL}"):
            raise ValueError(f"{path_str(keys)}: both a LoRA target and in modules_to_save.")
    if not chosen:
        raise ValueError(
            f"no kernel matches targets={config.targets} (exclude={config.exclude}). "
            f"Module paths with a kernel: {[path_str(k) for k in kernels]}"
        )
    return chosen


def targets(params: Params, config: LoraConfig) -> list[str]:
    """The module paths whose kernels `init` would adapt; ValueError if a target is unusable."""
    return [path_str(k) for k in _targets(_modules(_flatten(params)), config)]


def init(
    key: jax.Array, params: Params, config: LoraConfig, layouts: Layouts | None = None
) -> dict[str, Any]:
    """Adds `lora_a` (random) and `lora_b` (zeros) beside every targeted kernel.

    At init A·B = 0, so the model computes exactly what the base does. With init="pissa" or
    "olora", A and B take W0's principal part (SVD / QR) and the kernel becomes the residual
    W0 − s·A·B (float32, then the kernel's dtype): same output, but a new base tree, so keep
    `lj.extract` of this tree to convert the trained adapter for peft (`lj.save_adapter`).
    `layouts` says how many input/output axes each kernel has; it is only needed for kernels
    of more than two axes (stacked or DenseGeneral), and `lj.kernel_layouts(model, *inputs)`
    reads it off the model.
    Each adapter's randomness depends on its path alone, so adding a target leaves the others'.
    """
    flat = _flatten(params)
    _no_adapter(flat, "init")
    modules = _modules(flat)
    plans = []
    for keys in _targets(modules, config):
        path, shape = path_str(keys), tuple(modules[keys][KERNEL].shape)
        n_in, n_out = _kernel_layout(path, shape, layouts)
        lead = len(shape) - n_in - n_out
        fan_in, fan_out = math.prod(shape[lead : lead + n_in]), math.prod(shape[lead + n_in :])
        rank = config.rank_for(path)
        if rank > min(fan_in, fan_out):
            raise ValueError(
                f"{path}: rank {rank} exceeds the kernel's smallest dimension "
                f"min({fan_in}, {fan_out}) (shape {shape}, {n_in} input axes)."
            )
        plans.append((keys, path, shape, lead, n_in, fan_in, rank))
    new = dict(flat)
    for keys, path, shape, lead, n_in, fan_in, rank in plans:
        w, scale = modules[keys][KERNEL], config.scale_for(path, rank)
        if config.init in BASE_MODIFYING_INITS and isinstance(w, meta.AxisMetadata):
            raise ValueError(
                f"{path}: init={config.init!r} rewrites the base kernel, which is quantized; "
                "run lj.init on the float base, then lj.quantize (the residual is quantized)."
            )
        w = meta.unbox(w)  # a quantized kernel: DoRA's norm needs its values
        if config.init in BASE_MODIFYING_INITS:
            a, b = _principal(w, rank, scale, lead, n_in, config.init)
            w = _apply_delta(w, a, b, None, -scale, lead, n_in)  # the residual stays frozen
            new[(*keys, KERNEL)] = w
            a, b = a.astype(config.dtype), b.astype(config.dtype)
        else:
            sub = jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
            a = _init_a(sub, (*shape[: lead + n_in], rank), fan_in, config)
            b = jnp.zeros((*shape[:lead], rank, *shape[lead + n_in :]), config.dtype)
        new[(*keys, LORA_A)], new[(*keys, LORA_B)] = a, b
        if config.use_dora:  # m = ||W0|| per output unit, so the output is unchanged at init
            m = direction_norm(w, a, b, scale, lead, n_in)
            new[(*keys, LORA_M)] = m.astype(config.dtype)
    return _unflatten(new)


# ----------------------------------------------------------------------------- partition


def partition(params: Params, config: LoraConfig) -> dict[str, Any]:
    """A tree of "lora" (trained: adapters and modules_to_save) / "frozen" labels."""
    flat = _flatten(params)
    return _unflatten(
        {k: v if v is traverse_util.empty_node else _label(k, config) for k, v in flat.items()}
    )


def _label(keys: Keys, config: LoraConfig) -> str:
    trained = keys[-1] in ADAPTER_LEAVES or config.is_saved(path_str(keys))
    return LORA if trained else FROZEN


def optimizer(
    tx: optax.GradientTransformation,
    params: Params,
    config: LoraConfig,
    lr_ratio: float | None = None,
) -> optax.GradientTransformation:
    """`tx` on the trained leaves, zero updates (and no optimizer state) for the frozen ones.

    `lr_ratio` (LoRA+): B's updates are `tx`'s scaled by this factor, i.e. B learns at
    lr_ratio times A's learning rate (the LoRA+ paper suggests 16).
    """
    labels = partition(params, config)
    transforms = {LORA: tx, FROZEN: optax.set_to_zero()}
    if lr_ratio is not None:
        if lr_ratio <= 0:
            raise ValueError(f"lr_ratio is {lr_ratio}; must be > 0.")
        flat = _flatten(labels)
        labels = _unflatten({k: LORA_B if k[-1] == LORA_B else v for k, v in flat.items()})
        transforms[LORA_B] = optax.chain(tx, optax.scale(lr_ratio))
    return optax.multi_transform(transforms, labels)


def split(params: Params, config: LoraConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(adapter, base): the trained leaves and the rest, so grads can be taken w.r.t. the adapter.

    `combine(adapter, base)` is the exact inverse. The base keeps emptied module dicts so its
    structure still says where each adapter leaf goes.
    """
    flat = _flatten(params)
    adapter, base = {}, {}
    for keys, leaf in flat.items():
        trained = leaf is not traverse_util.empty_node and _label(keys, config) == LORA
        (adapter if trained else base)[keys] = leaf
    for keys in {k[:-1] for k in adapter}:
        if not any(k[: len(keys)] == keys for k in base):
            base[keys] = traverse_util.empty_node
    return _unflatten(adapter), _unflatten(base)


def extract(params: Params, config: LoraConfig) -> dict[str, Any]:
    """Only the trained leaves (adapters and modules_to_save), at their paths."""
    return split(params, config)[0]


def attach(base: Params, adapter: Params) -> dict[str, Any]:
    """`base` with the adapter's leaves added, after checking every path and shape against it."""
    flat_base, flat_adapter = _flatten(base), _flatten(adapter)
    _no_adapter(flat_base, "attach")
    base_modules = _modules(flat_base)
    for keys, leaves in _modules(flat_adapter).items():
        path = path_str(keys)
        if keys not in base_modules:
            raise ValueError(
                f"{path}: the adapter has leaves {sorted(leaves)} but the base has no such module."
            )
        module = base_modules[keys]
        if any(n in leaves for n in ADAPTER_LEAVES):
            if not all(n in leaves for n in (LORA_A, LORA_B)) or KERNEL not in module:
                raise ValueError(
                    f"{path}: an adapter needs lora_a and lora_b beside a base "
                    f"kernel; adapter has {sorted(leaves)}, base {sorted(module)}."
                )
            w = module[KERNEL]
            lead, n_in, *_ = adapter_layout(path, w.shape, leaves[LORA_A].shape,
                                            leaves[LORA_B].shape)  # fmt: skip
            out_shape = w.shape[:lead] + w.shape[lead + n_in :]
            if LORA_M in leaves and leaves[LORA_M].shape != out_shape:
                raise ValueError(
                    f"{path}: lora_magnitude {leaves[LORA_M].shape} != the "
                    f"kernel's output shape {out_shape}."
                )
        for name, leaf in leaves.items():
            if name in module and jnp.shape(module[name]) != jnp.shape(leaf):
                raise ValueError(
                    f"{path}/{name}: adapter shape {jnp.shape(leaf)} != base shape "
                    f"{jnp.shape(module[name])}."
                )
    merged = dict(flat_base)
    for keys, leaf in flat_adapter.items():
        if leaf is not traverse_util.empty_node:
            merged.pop(keys[:-1], None)  # an emptied module dict is filled again
            merged[keys] = leaf
    return _unflatten(merged)


def combine(adapter: Params, base: Params) -> dict[str, Any]:
    """Inverse of `split`: `combine(*split(params, config)) == params`."""
    return attach(base, adapter)


def adapter_specs(params: Params, base_specs: Params) -> dict[str, Any]:
    """PartitionSpecs for every leaf of an adapted tree, derived from the base's specs.

    Each factor is sharded like its kernel on the axes it shares with it (A: layer + input
    axes, B: layer + output axes, DoRA's magnitude: layer + output axes) and replicated on
    the rank axis, so the adapter follows the base's layout instead of being replicated.
    """
    flat, specs = _flatten(params), _flatten(base_specs)
    out = {}
    for keys, leaf in flat.items():
        if leaf is traverse_util.empty_node or keys[-1] not in ADAPTER_LEAVES:
            if keys not in specs:
                raise ValueError(f"{path_str(keys)}: no spec in base_specs for this base leaf.")
            out[keys] = specs[keys]
            continue
        module = keys[:-1]
        w, a, b = (flat[(*module, n)] for n in (KERNEL, LORA_A, LORA_B))
        lead, n_in, _, _ = adapter_layout(path_str(module), w.shape, a.shape, b.shape)
        kernel = specs.get((*module, KERNEL)) or ()
        if isinstance(kernel, meta.AxisMetadata):  # a quantized kernel's specs: take its codes'
            kernel = jax.tree.leaves(kernel)[0]
        kernel = tuple(kernel)
        kernel += (None,) * (w.ndim - len(kernel))  # a spec may leave trailing axes out
        layer, ins, outs = kernel[:lead], kernel[lead : lead + n_in], kernel[lead + n_in :]
        axes = {
            LORA_A: (*layer, *ins, None),
            LORA_B: (*layer, None, *outs),
            LORA_M: (*layer, *outs),
        }
        out[keys] = PartitionSpec(*axes[keys[-1]])
    return _unflatten(out)


# ----------------------------------------------------------------------------- merge


def _with_delta(
    w: jax.Array, a: jax.Array, b: jax.Array, m: jax.Array | None, scale: jax.Array, lead: int,
    n_in: int,
) -> jax.Array:  # fmt: skip
    """W0 + s·A·B in float32 (DoRA: rescaled to m per output unit), cast to w's dtype."""
    delta = _low_rank_update(w, a, b, lead, n_in)
    v = w.astype(jnp.float32) + scale * delta
    if m is not None:
        ratio = m.astype(jnp.float32) / direction_norm(w, a, b, scale, lead, n_in)
        v = v * jnp.expand_dims(ratio, tuple(range(lead, lead + n_in)))
    return v.astype(w.dtype)


def _apply_delta(w, a, b, m, scale: float, lead: int, n_in: int) -> jax.Array:
    # Outside a trace, pin the result to the kernel's sharding so a merged sharded model stays
    # sharded as it was; inside one, the caller's jit decides.
    concrete = isinstance(w, jax.Array) and not isinstance(w, jax.core.Tracer)
    pin = {"out_shardings": w.sharding} if concrete else {}
    fn = jax.jit(_with_delta, static_argnames=("lead", "n_in"), **pin)
    return fn(w, a, b, m, jnp.float32(scale), lead=lead, n_in=n_in)


def _fold(
    params: Params, adapter_flat: Mapping[Keys, Any], config: LoraConfig, sign: float, what: str
) -> dict[str, Any]:
    """Adds sign·(α/r)·A·B from the adapter's modules into the kernels of `params`."""
    flat = _flatten(params)
    adapted = _adapted(adapter_flat)
    if not adapted:
        raise ValueError(f"{what}: the tree holds no lora_a/lora_b leaves.")
    out = {k: v for k, v in flat.items() if k[-1] not in ADAPTER_LEAVES}
    for keys, leaves in adapted.items():
        path = path_str(keys)
        if (*keys, KERNEL) not in flat or not all(n in leaves for n in (LORA_A, LORA_B)):
            raise ValueError(f"{what}: {path} needs a kernel, lora_a and lora_b.")
        if sign < 0 and LORA_M in leaves:
            raise ValueError(
                f"unmerge: {path} is a DoRA adapter; its merge rescaled each output unit by "
                "m/||W0 + s·A·B||, which cannot be inverted without W0. Keep the base instead."
            )
        w, a, b = meta.unbox(flat[(*keys, KERNEL)]), leaves[LORA_A], leaves[LORA_B]
        lead, n_in, _, rank = adapter_layout(path, w.shape, a.shape, b.shape)
        scale = sign * config.scale_for(path, rank)
        out[(*keys, KERNEL)] = _apply_delta(w, a, b, leaves.get(LORA_M), scale, lead, n_in)
    return _unflatten(out)


def merge(params: Params, config: LoraConfig) -> dict[str, Any]:
    """kernel = W0 + (α/r)·A·B, adapter leaves removed: the base tree's exact structure and dtypes.

    DoRA adapters fold their magnitude in: kernel = m·(W0 + s·A·B)/||W0 + s·A·B|| per output.
    A quantized kernel (QLoRA) is dequantized, so merged kernels come back dense in the
    base's dtype; `lj.quantize` the result to re-quantize, or `lj.dequantize` it for a fully
    dense tree (kernels without an adapter stay as they were stored).

    The sum is formed in float32 and rounded once to the kernel's dtype, so a bfloat16 base is
    within one bfloat16 rounding of the float32 merge. Pure and jitted per kernel.
    """
    return _fold(params, _flatten(params), config, 1.0, "merge")


def unmerge(merged: Params, adapter: Params, config: LoraConfig) -> dict[str, Any]:
    """W0 back from a merged tree: kernel − (α/r)·A·B, in float32, cast to the kernel's dtype.

    Error bound: a float32 base comes back within 2·2⁻²⁴·(|W0| + |(α/r)·A·B|) per element
    (two roundings); a bfloat16 base within 2·2⁻⁸·|W0 + (α/r)·A·B| (the merge's rounding to
    bfloat16 cannot be undone). modules_to_save leaves keep their trained values.
    """
    _no_adapter(_flatten(merged), "unmerge")
    return _fold(merged, _flatten(adapter), config, -1.0, "unmerge")


# ----------------------------------------------------------------------------- summary


def summary(params: Params, config: LoraConfig) -> str:
    """A table of adapted paths, shapes, rank, alpha and trainable counts, like peft's
    print_trainable_parameters."""
    flat = {k: v for k, v in _flatten(params).items() if v is not traverse_util.empty_node}
    rows = [("path", "kernel", "lora_a", "lora_b", "rank", "alpha", "trainable")]
    for keys, leaves in sorted(_adapted(flat).items()):
        path = path_str(keys)
        a, b = leaves[LORA_A], leaves[LORA_B]
        rows.append(
            (
                path,
                str(leaves[KERNEL].shape),
                str(a.shape),
                str(b.shape),
                str(a.shape[-1]),
                f"{config.alpha_for(path):g}",
                f"{sum(leaves[n].size for n in ADAPTER_LEAVES if n in leaves):,}",
            )
        )
    for keys, leaf in sorted(flat.items()):
        if keys[-1] not in ADAPTER_LEAVES and _label(keys, config) == LORA:
            rows.append((path_str(keys), str(leaf.shape), "-", "-", "full", "-", f"{leaf.size:,}"))
    trainable = sum(v.size for k, v in flat.items() if _label(k, config) == LORA)
    total = sum(jnp.size(v) for v in flat.values())
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append(
        f"trainable params: {trainable:,} || all params: {total:,} || "
        f"trainable%: {100 * trainable / max(total, 1):.4f}"
    )
    return "\n".join(lines)
