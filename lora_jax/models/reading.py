"""A checkpoint's tensors read by the slice: each param leaf knows where its layers lie in
the safetensors files and how torch lays them out, so a process builds a sharded param from
the byte ranges of the shards its own devices hold (`jax.make_array_from_callback`), and no
host reads, and no device holds, the whole model. Shapes are checked from the files' headers
before any tensor is read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from typing import Any

import ml_dtypes
import numpy as np
from etils import epath

from lora_jax.files import read_json

Index = tuple[slice, ...]


# safetensors' dtype names, as numpy (and ml_dtypes, jax's) holds them.
DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
          "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn,
          "F8_E5M2": ml_dtypes.float8_e5m2}  # fmt: skip


class SafetensorsFile:
    """A safetensors file's header, and its tensors read by the range of rows a slice spans:
    a local file or an object in a bucket alike (`files.path`), nothing else fetched."""

    def __init__(self, file: epath.Path):
        self.file = file
        try:
            size = file.stat().length
            with file.open("rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if not 2 <= length <= size - 8:
                    raise ValueError(f"a header of {length} bytes in a file of {size}")
                header = json.loads(f.read(length))
            self.start = 8 + length
            header.pop("__metadata__", None)
            self.tensors = {name: (DTYPES[t["dtype"]], tuple(t["shape"]), *t["data_offsets"])
                            for name, t in header.items()}  # fmt: skip
            if any(self.start + end > size for *_, end in self.tensors.values()):
                raise ValueError("its tensors run past its end")
        except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
            raise ValueError(f"{file}: not a readable safetensors file (truncated or damaged? "
                             f"{err}).") from None  # fmt: skip

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][1]

    def read(self, name: str, index: Index) -> np.ndarray:
        """The slice `index` of a tensor: the bytes of the rows it spans are read, the rest of
        the slice taken in memory."""
        dtype, shape, begin, _ = self.tensors[name]
        rows, rest = (index[0], index[1:]) if index and shape else (slice(None), index)
        lo, hi, _ = rows.indices(shape[0]) if shape else (0, 1, 1)
        row_bytes = math.prod(shape[1:]) * np.dtype(dtype).itemsize
        with self.file.open("rb") as f:
            f.seek(self.start + begin + lo * row_bytes)
            data = f.read((hi - lo) * row_bytes)
        if len(data) != (hi - lo) * row_bytes:
            raise ValueError(f"{self.file}: {name} cannot be read (truncated?).")
        array = np.frombuffer(data, dtype).reshape((hi - lo, *shape[1:]) if shape else ())
        return array[(slice(None), *rest)] if shape else array


class Checkpoint:
    """The tensors of model.safetensors or a sharded model.safetensors.index.json, by name;
    their shapes from the headers, their data read by the slice."""

    def __init__(self, directory: epath.Path):
        index = directory / "model.safetensors.index.json"
        self.directory, self._opened = directory, {}
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no weight_map.")
        elif (directory / "model.safetensors").exists():
            weight_map = dict.fromkeys(self.file(directory / "model.safetensors").tensors,
                                       "model.safetensors")  # fmt: skip
        elif any(directory.glob("pytorch_model*.bin")):
            raise ValueError(
                f"{directory}: only pickle checkpoints (pytorch_model.bin), which can "
                "run code when loaded; convert them to safetensors first."
            )
        else:
            raise FileNotFoundError(f"{directory}: no model.safetensors or its index.")
        self.files = {name: directory / file for name, file in weight_map.items()}

    def file(self, path: epath.Path) -> SafetensorsFile:
        """A file's header, read once."""
        if path not in self._opened:
            self._opened[path] = SafetensorsFile(path)
        return self._opened[path]

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, from its file's header."""
        file = self.file(self.files[name])
        if name not in file.tensors:
            raise ValueError(f"{file.file}: holds no {name}, which the index puts there.")
        return file.shape(name)

    def read(self, name: str, index: Index) -> np.ndarray:
        """The slice `index` of a tensor: only the rows it spans are read."""
        return self.file(self.files[name]).read(name, index)


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
