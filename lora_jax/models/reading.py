"""A checkpoint's tensors read by the slice: each param leaf knows where its layers lie in
the safetensors files and how torch lays them out, so a process builds a sharded param from
the byte ranges of the shards its own devices hold (`jax.make_array_from_callback`), and no
host reads, and no device holds, the whole model. Shapes are checked from the files' headers
before any tensor is read.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from lora_jax.files import read_json

Index = tuple[slice, ...]


@contextlib.contextmanager
def opened(path: Path) -> Iterator[Any]:
    """A safetensors file opened for reading (numpy: nothing on a device), or a ValueError
    naming it."""
    try:
        handle = safe_open(path, "numpy")
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise ValueError(f"{path}: not a readable safetensors file (truncated or damaged? "
                         f"{err}).") from None  # fmt: skip
    with handle as f:
        yield f


class Checkpoint:
    """The tensors of model.safetensors or a sharded model.safetensors.index.json, by name;
    their shapes from the headers, their data read by the slice."""

    def __init__(self, directory: Path):
        index = directory / "model.safetensors.index.json"
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no weight_map.")
        elif (directory / "model.safetensors").exists():
            with opened(directory / "model.safetensors") as f:
                weight_map = dict.fromkeys(f.keys(), "model.safetensors")
        elif any(directory.glob("pytorch_model*.bin")):
            raise ValueError(
                f"{directory}: only pickle checkpoints (pytorch_model.bin), which can "
                "run code when loaded; convert them to safetensors first."
            )
        else:
            raise FileNotFoundError(f"{directory}: no model.safetensors or its index.")
        self.directory = directory
        self.files = {name: directory / file for name, file in weight_map.items()}
        self._shapes: dict[str, tuple[int, ...]] = {}

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, from its file's header (read once a file)."""
        if name not in self._shapes:
            path = self.files[name]
            with opened(path) as f:
                for other in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if self.files.get(other) == path:
                        self._shapes[other] = tuple(f.get_slice(other).get_shape())
        return self._shapes[name]

    def read(self, name: str, index: Index) -> np.ndarray:
        """The slice `index` of a tensor: only its bytes are read."""
        with opened(self.files[name]) as f:
            try:
                return np.asarray(f.get_slice(name)[index])
            except Exception as err:  # safetensors' own error types: a damaged file
                raise ValueError(f"{self.files[name]}: {name} cannot be read (truncated or "
                                 f"damaged? {err}).") from None  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One layer of a param as the files hold it, in torch's layout: a tensor, or a mixture's
    expert parameter (E, out, in) assembled from each expert's parts, side by side on the
    output axis (`parts`: per part, its tensor per expert)."""

    parts: tuple[tuple[str, ...], ...]
    experts: bool = False

    @classmethod
    def one(cls, name: str) -> Tensor:
        return cls(((name,),))

    def names(self) -> list[str]:
        return [n for part in self.parts for n in part]

    def shape(self, checkpoint: Checkpoint) -> tuple[int, ...]:
        if not self.experts:
            return checkpoint.shape(self.parts[0][0])
        rows = sum(checkpoint.shape(part[0])[0] for part in self.parts)
        return (len(self.parts[0]), rows, *checkpoint.shape(self.parts[0][0])[1:])

    def read(self, checkpoint: Checkpoint, index: Index) -> np.ndarray:
        """The slice `index` (torch's layout) of this layer."""
        if not self.experts:
            return checkpoint.read(self.parts[0][0], index)
        experts, rows, rest = index[0], index[1], index[2:]
        start, stop, _ = rows.indices(self.shape(checkpoint)[1])
        pieces, offset = [], 0
        for part in self.parts:
            size = checkpoint.shape(part[0])[0]
            lo, hi = max(start - offset, 0), min(stop - offset, size)
            if lo < hi:  # the rows of this part the slice holds, each expert's
                pieces.append(np.stack([checkpoint.read(name, (slice(lo, hi), *rest))
                                        for name in part[experts]]))  # fmt: skip
            offset += size
        return np.concatenate(pieces, axis=1)


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One param leaf in the files: its layers (one `Tensor` each, stacked on our axis 0
    where `stacked`), and `axes`, how our layout permutes torch's (ours = torch's
    transposed by `axes`)."""

    layers: tuple[Tensor, ...]
    stacked: bool
    axes: tuple[int, ...]

    def shape(self, checkpoint: Checkpoint) -> tuple[int, ...]:
        """The leaf's shape in our layout, from the files' headers."""
        each = self.layers[0].shape(checkpoint)
        ours = tuple(each[a] for a in self.axes)
        return (len(self.layers), *ours) if self.stacked else ours

    def read(self, checkpoint: Checkpoint, index: Index | None = None, dtype: Any = None):
        """The slice `index` of the leaf (all of it by default) in our layout and `dtype`:
        only the bytes of that slice are read."""
        shape = self.shape(checkpoint)
        index = tuple(index) if index is not None else ()
        index += (slice(None),) * (len(shape) - len(index))
        if not self.stacked:
            return self._layer(checkpoint, self.layers[0], index, dtype)
        layers = range(len(self.layers))[index[0]]
        return np.stack([self._layer(checkpoint, self.layers[i], index[1:], dtype)
                         for i in layers])  # fmt: skip

    def _layer(self, checkpoint: Checkpoint, tensor: Tensor, index: Index, dtype: Any):
        torch_index = [slice(None)] * len(index)
        for ours, theirs in enumerate(self.axes):
            torch_index[theirs] = index[ours]
        array = tensor.read(checkpoint, tuple(torch_index)).transpose(self.axes)
        return array if dtype is None else array.astype(dtype, copy=False)


def permutation(layout: Any, ndim: int) -> tuple[int, ...]:
    """The axes `layout` (an array -> array function that only transposes) moves: a probe of
    distinct sizes goes through it, and each output axis is found by its size."""
    sizes = [2, 3, 5, 7, 11, 13, 17, 19][:ndim]
    probe = np.lib.stride_tricks.as_strided(np.zeros(1), shape=sizes, strides=(0,) * ndim)
    return tuple(sizes.index(n) for n in layout(probe).shape)
