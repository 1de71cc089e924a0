"""Device meshes and shardings: base params by path rules, adapters derived from their kernels.

The mesh has four axes: `data` (pure data parallelism), `fsdp` (batch and params both split,
ZeRO-3 style), `expert` (a mixture's experts split, E / n a device, and the batch too, as
MaxText places them) and `tensor` (Megatron: column-parallel projections split on their output
axis, row-parallel ones on their input axis). The batch is split over (data, fsdp, expert).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from lora_jax.quant import QuantizedKernel
from lora_jax.tree import ADAPTER_LEAVES, LORA_A, LORA_B, adapter_specs, as_dict, path_str

# The mesh's axes, by name. `expert` sits next to `tensor`, the fastest links: the experts'
# tokens cross it every layer.
DATA, FSDP, EXPERT, TENSOR = "data", "fsdp", "expert", "tensor"
AXES = (DATA, FSDP, EXPERT, TENSOR)
BATCH = PartitionSpec((DATA, FSDP, EXPERT))

# A partition rule: (regex over a leaf's path, mesh axes of its trailing axes: each None, an
# axis or a tuple of axes). The first match wins, the rest is replicated; leading axes (the
# nn.scan layer axis) are never split. The zoo's rules live with its families
# (`lora_jax.models.hub.SHARDING_RULES`).
Rules = Sequence[tuple[str, tuple[str | tuple[str, ...] | None, ...]]]


def make_mesh(
    data: int = -1,
    fsdp: int = 1,
    tensor: int = 1,
    devices: Sequence[Any] | None = None,
    expert: int = 1,
) -> Mesh:
    """A (data, fsdp, expert, tensor) mesh over `devices` (default: all, every process); -1
    takes what is left. Auto axes: XLA propagates shardings through the model."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, expert, tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes {dict(zip(AXES, sizes, strict=True))}: one -1 at most.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(AXES, sizes, strict=True))} needs {math.prod(sizes)} devices; "
            f"there are {len(devices)}."
        )
    return jax.make_mesh(tuple(sizes), AXES, axis_types=(AxisType.Auto,) * 4, devices=devices)


def _spec(path: str, shape: tuple[int, ...], mesh: Mesh, rules) -> PartitionSpec:
    for pattern, axes in rules:
        if re.search(pattern, path) and len(axes) <= len(shape):
            trailing = shape[len(shape) - len(axes) :]
            fit = [_fit(entry, n, mesh) for entry, n in zip(axes, trailing, strict=True)]
            return PartitionSpec(*(None,) * (len(shape) - len(axes)), *fit)
    return PartitionSpec()


def _fit(entry: Any, n: int, mesh: Mesh) -> Any:
    """A rule's entry (None, an axis, or axes) for an axis of length `n`: the mesh axes it
    names that the mesh has (a mesh of the caller's own may lack some), those of one device
    dropped from a tuple, and as many of them as split `n` evenly; None (whole) where none
    does (tiny models, odd vocabularies)."""
    axes = [a for a in _as_axes(entry) if a in mesh.shape]
    axes = [a for a in axes if mesh.shape[a] > 1] or axes[:1]
    while axes and n % _size(mesh, tuple(axes)):
        axes.pop()
    return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def _leaf_spec(path: str, leaf: Any, mesh: Mesh, rules) -> Any:
    if not isinstance(leaf, QuantizedKernel):
        return _spec(path, np.shape(leaf), mesh, rules)
    # QLoRA: codes and block scales keep the kernel's axes and are split like it, the last
    # (packed codes, blocks) too where each shard then holds whole blocks: left whole, a row
    # kernel's fsdp axis was lost, and a 70B base took 16 GiB a chip of a v5e-8, not 5.
    # The per-row scales of double quantization (last axis 1) stay whole there.
    kernel = tuple(_spec(path, leaf.shape, mesh, rules))
    kernel += (None,) * (len(leaf.shape) - len(kernel))
    last = kernel[-1] if leaf.scales.shape[-1] % _size(mesh, kernel[-1]) == 0 else None
    return jax.tree.map(
        lambda x: PartitionSpec(*kernel[:-1], last if x.shape[-1] > 1 else None), leaf
    )


def base_specs(params: Any, mesh: Mesh, rules: Rules) -> dict[str, Any]:
    """A PartitionSpec per leaf of a base params tree, from `rules` (path regex -> axes); a
    quantized kernel gets a box holding one spec per array."""
    flat = traverse_util.flatten_dict(as_dict(params))
    return traverse_util.unflatten_dict(
        {k: _leaf_spec(path_str(k), v, mesh, rules) for k, v in flat.items()}
    )


def param_shardings(params: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a tree with or without adapters: the base's by `rules`, each
    adapter leaf's derived from its kernel's (rank axis replicated)."""
    flat = traverse_util.flatten_dict(as_dict(params))
    base = {k: v for k, v in flat.items() if k[-1] not in ADAPTER_LEAVES}
    specs = adapter_specs(params, base_specs(traverse_util.unflatten_dict(base), mesh, rules))
    specs = traverse_util.flatten_dict(specs)
    for keys in specs.keys() & {k for k in flat if k[-1] in (LORA_A, LORA_B)}:
        specs[keys] = _factor_over_fsdp(specs[keys], np.shape(flat[keys]), keys[-1], mesh)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), traverse_util.unflatten_dict(specs))


def _factor_over_fsdp(spec: PartitionSpec, shape, leaf: str, mesh: Mesh) -> PartitionSpec:
    """A LoRA factor split over fsdp on its kernel-facing axis (A's last input axis, B's last
    output axis) where its kernel's spec leaves it whole there: fsdp holds every trained
    leaf and its optimizer state split (ZeRO-3). A column kernel's B, split like its output
    axis (over tensor), and a row kernel's A would otherwise be whole on every chip: 1.7 GiB
    a chip of a 70B model's factors and Adam moments."""
    size = mesh.shape[FSDP]
    entries = list(spec) + [None] * (len(shape) - len(spec))
    axis = len(shape) - (2 if leaf == LORA_A else 1)
    names = [a for e in entries for a in ((e,) if isinstance(e, str) else e or ())]
    if size == 1 or FSDP in names or shape[axis] % (_size(mesh, entries[axis]) * size):
        return spec
    entries[axis] = (*_as_axes(entries[axis]), FSDP)
    return PartitionSpec(*entries)


def _as_axes(entry: Any) -> tuple[str, ...]:
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def _size(mesh: Mesh, entry: Any) -> int:
    """How many ways a PartitionSpec entry (None, an axis or axes) splits its axis."""
    return math.prod(mesh.shape[a] for a in _as_axes(entry))


def constrain_batch(x: jax.Array) -> jax.Array:
    """`x` with its leading (batch) axis split over data x fsdp x expert, where the current
    trace has a mesh (`jax.sharding.use_abstract_mesh`, as `make_step` sets its shardings'
    mesh; else `x` as is). The zoo pins its activations so: left to itself, XLA's propagation
    follows the embedding table's split (hidden axis over fsdp), so every chip then holds
    every example's activations; on a TPU slice that cost 77 GiB a chip of an 8B step."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = batch_axes(mesh)
    if not axes or x.shape[0] % batch_shards(mesh):
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(axes))


def batch_axes(mesh: Mesh | AbstractMesh) -> tuple[str, ...]:
    """The axes of `BATCH` that `mesh` has (a mesh of the caller's own may lack some)."""
    return tuple(a for a in BATCH[0] if a in mesh.axis_names)


def batch_shards(mesh: Mesh | AbstractMesh) -> int:
    """How many ways the batch splits: the product of the mesh's batch axes."""
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same whole value on every device (scalars, the step number)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Examples split over the data, fsdp and expert axes."""
    return NamedSharding(mesh, BATCH)


def local_rows(mesh: Mesh, global_batch: int) -> slice:
    """The rows of each global batch that this process's devices hold: what it must load."""
    index = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
    starts = sorted({(s[0].start or 0, s[0].stop or global_batch) for s in index.values()})
    lo, hi = starts[0][0], starts[-1][1]
    if sum(b - a for a, b in starts) != hi - lo:
        raise ValueError("this process's batch rows are not contiguous; check the mesh order.")
    return slice(lo, hi)


def global_batch(mesh: Mesh, local: dict[str, np.ndarray], size: int) -> dict[str, jax.Array]:
    """One global jax.Array per field from this process's rows (`local_rows`)."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, v, (size, *v.shape[1:]))
        for k, v in local.items()
    }
