"""LoRA as a pure transform of nested-dict parameter trees (Linen params, NNX pure dicts, ...).

A targeted module's dict holds `kernel` of shape lead + in + out (lead: stacked-layer axes from
`nn.scan`, in/out: the input and output axes). `init` adds `lora_a` (lead + in + (r,)) and
`lora_b` (lead + (r,) + out) beside it, for DoRA `lora_magnitude` (lead + out), for AdaLoRA
`lora_e` (lead + (r,), its singular values: the update is s·A·diag(E)·B). From then
on the tree describes itself: the shapes determine lead, in and out (see `adapter_layout`), so
no other function needs the model.

Paths are '/'-joined dict keys relative to the params collection: a leading "params" key (a
Linen variables dict) is left out, so `{"params": {"attn": {"q": ...}}}` has module "attn/q".
Every function returns a new tree and shares, never copies or mutates, the arrays it keeps.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct, traverse_util
from flax.core import meta
from jax.sharding import PartitionSpec

from lora_jax import variants
from lora_jax.config import LOFTQ, LoraConfig
from lora_jax.kinds import Kind, Linear, kind_of
from lora_jax.variants import BASE_MODIFYING_INITS

KERNEL = "kernel"
LORA_A = "lora_a"
LORA_B = "lora_b"
LORA_M = variants.MAGNITUDE
LORA_E = variants.SINGULAR
ADAPTER_LEAVES = (LORA_A, LORA_B, *variants.EXTRA_LEAVES)
LORA, FROZEN = "lora", "frozen"

Params = Mapping[str, Any]
Keys = tuple[Any, ...]  # dict keys: str for Linen, also int for NNX lists


# Per module path: its kernel's kind (`lora_jax.kinds`: a Linear, ConvLayout or Grouped; a
# plain (number of input axes, number of output axes) is a Linear's), or a string saying why
# that kernel cannot be adapted (see `lora_jax.apply.kernel_layouts`).
Layouts = Mapping[str, tuple[int, int] | str]


# ----------------------------------------------------------------------------- paths


def as_dict(params: Params) -> Params:
    """`params` as nested dicts: an NNX State (`nnx.state(model)`) becomes its pure dict, with
    the same paths and leaf names; any other tree is returned as it is."""
    return nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params


def _flatten(params: Params) -> dict[Keys, Any]:
    # Empty dicts are kept so that `split` then `combine` restores the exact structure.
    return traverse_util.flatten_dict(as_dict(params), keep_empty_nodes=True)


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
    """One adapted module: its leaves and layout, the one record every other part reads.

    The kernel is lead + in + out, lora_a lead + in + (rank,), lora_b lead + (rank,) + out
    (lead: stacked-layer axes); magnitude is DoRA's (lead + out), singular AdaLoRA's E
    (lead + (rank,)); scale multiplies A·B (None when `sites` was given no config)."""

    keys: Keys
    kernel: Any
    lora_a: Any
    lora_b: Any
    magnitude: Any | None
    singular: Any | None
    lead: int
    n_in: int
    n_out: int
    rank: int
    scale: float | None = None

    @property
    def path(self) -> str:
        """The module path, '/'-joined, without a leading "params"."""
        return path_str(self.keys)

    @property
    def update_a(self) -> Any:
        """The A of the update s·A·B: lora_a, times diag(E) for AdaLoRA."""
        return self.lora_a if self.singular is None else variants.fold(self.lora_a, self.singular)


class Bank(struct.PyTreeNode, meta.AxisMetadata):
    """Several adapters' A (or B) side by side along the rank axis, `block` ranks each, their
    scales folded in (`lj.compose.stack`). Only `lj.routed_apply` runs a bank: every other
    function refuses it, since read as one adapter it would be the adapters' mean."""

    value: jax.Array
    block: int = struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    @property
    def dtype(self) -> Any:
        return self.value.dtype

    @property
    def ndim(self) -> int:
        return self.value.ndim

    @property
    def size(self) -> int:
        return self.value.size

    def unbox(self) -> jax.Array:
        return self.value

    def replace_boxed(self, val: jax.Array) -> Bank:
        return self.replace(value=val)

    # nn.scan slices and stacks the value itself; the box holds no axis names.
    def add_axis(self, index: int, params: dict[Any, Any]) -> Bank:
        return self

    def remove_axis(self, index: int, params: dict[Any, Any]) -> Bank:
        return self


def refuse_bank(path: str, leaf: Any, what: str) -> None:
    """A ValueError naming routed_apply when `leaf` is a Bank given to anything else."""
    if isinstance(leaf, Bank):
        raise ValueError(
            f"{what}: {path} holds a bank of {leaf.shape[-1] // leaf.block} adapters "
            "(lj.compose.stack), which only lj.routed_apply runs; read as one adapter it "
            "would be their mean. Use lj.routed_apply, or pass the adapters themselves."
        )


def _shape(x: Any) -> tuple[int, ...]:
    # Arrays, abstract ShapeDtypeStructs and boxes (quantized kernels, banks) all have .shape.
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def sites(params: Params, config: LoraConfig | None = None, what: str = "sites") -> list[Site]:
    """Every adapted module of a tree in path order, laid out by `adapter_layout`. Kernels may
    be abstract (jax.ShapeDtypeStruct) or quantized: only their shapes are read here. With a
    config, each site carries its scale. A bank (compose.stack) is refused, naming `what`."""
    found = []
    for keys, leaves in sorted(_adapted(_flatten(params)).items(), key=lambda kv: path_str(kv[0])):
        path = path_str(keys)
        if not all(n in leaves for n in (KERNEL, LORA_A, LORA_B)):
            raise ValueError(f"{path}: an adapted module needs kernel, lora_a and lora_b; it "
                             f"holds {sorted(leaves)}.")  # fmt: skip
        w, a, b = leaves[KERNEL], leaves[LORA_A], leaves[LORA_B]
        refuse_bank(path, a, what)
        layout = adapter_layout(path, _shape(w), _shape(a), _shape(b))
        scale = None if config is None else config.scale_for(path, layout[-1])
        found.append(Site(keys, w, a, b, leaves.get(LORA_M), leaves.get(LORA_E), *layout, scale))
    return found


def kernel_layout(
    path: str, shape: tuple[int, ...], layouts: Layouts | None = None, lead: int = 0
) -> tuple[int, Kind]:
    """(lead, kind): a kernel's stacked-layer axis count (a group axis included) and its kind
    (`lora_jax.kinds`: input and output axes), from `layouts` (`lj.kernel_layouts`) where it
    names `path`, else a Linear (1, 1) where `lead` stacked axes leave two, else a ValueError
    asking for layouts. The one place a bare kernel's layout is decided: `init` and adapter
    files (`lj.load_adapter`) ask it."""
    given = (layouts or {}).get(path)
    if isinstance(given, str):
        raise ValueError(f"{path}: cannot be adapted: {given}")
    if given is not None:
        kind = kind_of(given)
        if kind.n_in < 1 or kind.n_out < 1 or kind.n_in + kind.n_out > len(shape):
            raise ValueError(f"{path}: layout {given} does not fit kernel shape {shape}.")
        return len(shape) - kind.n_in - kind.n_out, kind
    if len(shape) - lead == 2:
        return lead, Linear(1, 1)
    raise ValueError(
        f"{path}: kernel shape {shape} is ambiguous (a stacked nn.Dense, or an nn.DenseGeneral "
        "with several input or output axes?). Pass layouts=lj.kernel_layouts(model, *inputs), "
        "or a dict {path: (n_in, n_out)}."
    )


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
                "adapts Dense/DenseGeneral/Einsum/Conv kernels. Narrow `targets` or add `exclude`."
            )
    for keys in chosen:
        if config.is_saved(f"{path_str(keys)}/{KERNEL}"):
            raise ValueError(f"{path_str(keys)}: both a LoRA target and in modules_to_save.")
    if not chosen:
        raise ValueError(
            f"no kernel matches targets={config.targets} (exclude={config.exclude}). "
            f"Module paths with a kernel: {[path_str(k) for k in kernels]}"
        )
    _every_pattern_matches(modules, [path_str(k) for k in kernels],
                           [path_str(k) for k in chosen], config)  # fmt: skip
    return chosen


def _every_pattern_matches(
    modules: Mapping[Keys, Mapping[str, Any]], kernels: list[str], chosen: list[str],
    config: LoraConfig,
) -> None:  # fmt: skip
    """A ValueError for a pattern that names nothing (a typo would otherwise train no head,
    or no other rank, silently): each exclude must match a kernel's module path, each
    modules_to_save a leaf path, each rank / alpha pattern an adapted module's path."""
    leaves = [f"{path_str(k)}/{leaf}" for k, m in modules.items() for leaf in m]
    for field, patterns, paths in (
        ("exclude", config.exclude, kernels),
        ("modules_to_save", config.modules_to_save, leaves),
        ("rank_pattern", [p for p, _ in config.rank_pattern], chosen),
        ("alpha_pattern", [p for p, _ in config.alpha_pattern], chosen),
    ):
        for pattern in patterns:
            if not any(re.search(pattern, path) for path in paths):
                more = " ..." if len(paths) > 8 else ""
                raise ValueError(f"LoraConfig.{field} {pattern!r} matches nothing; it is "
                                 f"searched in {paths[:8]}{more}.")  # fmt: skip


def targets(params: Params, config: LoraConfig) -> list[str]:
    """The module paths whose kernels `init` would adapt; ValueError if a target is unusable."""
    return [path_str(k) for k in _targets(_modules(_flatten(params)), config)]


def init(
    key: jax.Array,
    params: Params,
    config: LoraConfig,
    layouts: Layouts | None = None,
    progress: Callable[[Sequence[Any]], Iterable[Any]] = iter,
) -> dict[str, Any]:
    """Adds `lora_a` (random) and `lora_b` (zeros) beside every targeted kernel.

    At init A·B = 0, so the model computes exactly what the base does. With init="pissa" or
    "olora", A and B take W0's principal part (SVD / QR) and the kernel becomes the residual
    W0 − s·A·B (float32, then the kernel's dtype): same output, but a new base tree, so keep
    this tree's adapter (`lj.split`) to convert the trained one for peft (`lj.save_adapter`).
    With `config.adalora`, A and B start as peft's AdaLoRA (N(0, 0.02)) and E at zero.
    `layouts` says how many input/output axes each kernel has; it is only needed for kernels
    of more than two axes (stacked or DenseGeneral), and `lj.kernel_layouts(model, *inputs)`
    reads it off the model.
    Each adapter's randomness depends on its path alone, so adding a target leaves the others'.
    `progress` wraps the list of targets as they are initialised (`tqdm` shows a bar: PiSSA
    and OLoRA take an SVD / QR of each kernel).
    """
    if config.init == LOFTQ:
        raise ValueError("init='loftq' fits the adapter and the quantized base together: call "
                         "lj.loftq(params, config, kind, block_size, ...) instead of lj.init "
                         "(lora-jax train: lora.init=loftq with model.quantize).")  # fmt: skip
    flat = _flatten(params)
    _no_adapter(flat, "init")
    modules = _modules(flat)
    plans = []
    for keys in _targets(modules, config):
        path, shape = path_str(keys), tuple(modules[keys][KERNEL].shape)
        lead, kind = kernel_layout(path, shape, layouts)
        n_in = kind.n_in
        fan_in, fan_out = math.prod(shape[lead : lead + n_in]), math.prod(shape[lead + n_in :])
        rank = config.rank_for(path)
        if rank > min(fan_in, fan_out):
            raise ValueError(
                f"{path}: rank {rank} exceeds the kernel's smallest dimension "
                f"min({fan_in}, {fan_out}) (shape {shape}, {n_in} input axes)."
            )
        plans.append((keys, path, lead, n_in, rank))
    new = dict(flat)
    for keys, path, lead, n_in, rank in progress(plans):
        w, scale = modules[keys][KERNEL], config.scale_for(path, rank)
        if config.init in BASE_MODIFYING_INITS and isinstance(w, meta.AxisMetadata):
            raise ValueError(
                f"{path}: init={config.init!r} rewrites the base kernel, which is quantized; "
                "run lj.init on the float base, then lj.quantize (the residual is quantized)."
            )
        w = meta.unbox(w)  # a quantized kernel: DoRA's norm needs its values
        sub = jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
        if config.adalora is not None:
            a, b, e = variants.init_factors(sub, w.shape, rank, lead, n_in, config.dtype)
            new[(*keys, LORA_A)], new[(*keys, LORA_B)], new[(*keys, LORA_E)] = a, b, e
            continue
        init_fn = variants.INITS[config.init]
        a, b, residual = init_fn(sub, w, rank, scale, lead, n_in, config.dtype)
        if residual is not None:
            w = new[(*keys, KERNEL)] = residual
        new[(*keys, LORA_A)], new[(*keys, LORA_B)] = a, b
        if config.use_dora:
            m = variants.initial_magnitude(w, a, b, scale, lead, n_in, config.dtype)
            new[(*keys, LORA_M)] = m
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


def _groups(kernel: tuple, lead: int, n_in: int, rank: Any) -> dict[str, tuple]:
    """A kernel's shape (or spec) cut into its layer, input and output axes, and the rank
    axis (its size, or None for a spec: never split)."""
    return {"lead": kernel[:lead], "in": kernel[lead : lead + n_in],
            "out": kernel[lead + n_in :], "rank": (rank,)}  # fmt: skip


def _extra_axes(name: str, groups: dict[str, tuple]) -> tuple:
    """A variant leaf's axes (e.g. DoRA's magnitude: lead + out) from the kernel's groups."""
    return tuple(x for g in variants.EXTRA_LEAVES[name].split("+") for x in groups[g])


def combine(adapter: Params, base: Params) -> dict[str, Any]:
    """`base` with the adapter's leaves added, after checking every path and shape against it:
    how an adapter (from `split`, `load_adapter` or `compose`) goes onto a base, and the exact
    inverse of `split`: `combine(*split(params, config)) == params`."""
    flat_base, flat_adapter = _flatten(base), _flatten(adapter)
    _no_adapter(flat_base, "combine")
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
            w = _shape(module[KERNEL])
            lead, n_in, _, rank = adapter_layout(path, w, _shape(leaves[LORA_A]),
                                                 _shape(leaves[LORA_B]))  # fmt: skip
            for name in variants.EXTRA_LEAVES:
                want = _extra_axes(name, _groups(w, lead, n_in, rank))
                if name in leaves and _shape(leaves[name]) != want:
                    raise ValueError(f"{path}: {name} {_shape(leaves[name])} != the kernel's "
                                     f"{variants.EXTRA_LEAVES[name]} axes {want}.")  # fmt: skip
        for name, leaf in leaves.items():
            if name in module and _shape(module[name]) != _shape(leaf):
                raise ValueError(
                    f"{path}/{name}: adapter shape {_shape(leaf)} != base shape "
                    f"{_shape(module[name])}."
                )
    merged = dict(flat_base)
    for keys, leaf in flat_adapter.items():
        if leaf is not traverse_util.empty_node:
            merged.pop(keys[:-1], None)  # an emptied module dict is filled again
            merged[keys] = leaf
    return _unflatten(merged)


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
    for site in sites(params, what="adapter_specs"):
        kernel = specs.get((*site.keys, KERNEL)) or ()
        if isinstance(kernel, meta.AxisMetadata):  # a quantized kernel's specs: take its codes'
            kernel = jax.tree.leaves(kernel)[0]
        kernel = tuple(kernel)
        kernel += (None,) * (len(_shape(site.kernel)) - len(kernel))  # trailing axes left out
        g = _groups(kernel, site.lead, site.n_in, None)
        out[(*site.keys, LORA_A)] = PartitionSpec(*g["lead"], *g["in"], None)
        out[(*site.keys, LORA_B)] = PartitionSpec(*g["lead"], None, *g["out"])
        for name in variants.EXTRA_LEAVES:
            if (*site.keys, name) in flat:
                out[(*site.keys, name)] = PartitionSpec(*_extra_axes(name, g))
    return _unflatten(out)


# ----------------------------------------------------------------------------- merge


def _apply_delta(w, a, b, m, scale: float, lead: int, n_in: int) -> jax.Array:
    # Outside a trace, pin the result to the kernel's sharding so a merged sharded model stays
    # sharded as it was; inside one, the caller's jit decides.
    concrete = isinstance(w, jax.Array) and not isinstance(w, jax.core.Tracer)
    pin = {"out_shardings": w.sharding} if concrete else {}
    fn = jax.jit(variants.merged_kernel, static_argnames=("lead", "n_in"), **pin)
    return fn(w, a, b, m, jnp.float32(scale), lead=lead, n_in=n_in)


def _fold(params: Params, config: LoraConfig, sign: float, what: str) -> dict[str, Any]:
    """Adds sign·s·A·B into the kernel of every adapted module and drops the adapter leaves."""
    found = sites(params, config, what)
    if not found:
        raise ValueError(f"{what}: the tree holds no lora_a/lora_b leaves.")
    out = {k: v for k, v in _flatten(params).items() if k[-1] not in ADAPTER_LEAVES}
    for site in found:
        if sign < 0:
            variants.refuse_unmerge(site.path, site.magnitude)
        w, scale = meta.unbox(site.kernel), sign * site.scale
        out[(*site.keys, KERNEL)] = _apply_delta(
            w, site.update_a, site.lora_b, site.magnitude, scale, site.lead, site.n_in
        )
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
    return _fold(params, config, 1.0, "merge")


def unmerge(merged: Params, adapter: Params, config: LoraConfig) -> dict[str, Any]:
    """W0 back from a merged tree: kernel − (α/r)·A·B, in float32, cast to the kernel's dtype.

    Error bound: a float32 base comes back within 2·2⁻²⁴·(|W0| + |(α/r)·A·B|) per element
    (two roundings); a bfloat16 base within 2·2⁻⁸·|W0 + (α/r)·A·B| (the merge's rounding to
    bfloat16 cannot be undone). modules_to_save leaves keep their trained values.
    """
    _no_adapter(_flatten(merged), "unmerge")
    # Only the factors are subtracted: modules_to_save keep the merged tree's (trained) values.
    factors = {k: v for k, v in _flatten(adapter).items() if k[-1] in ADAPTER_LEAVES}
    return _fold(combine(_unflatten(factors), merged), config, -1.0, "unmerge")


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
