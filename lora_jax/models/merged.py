"""A merged checkpoint written without the model in memory (`lora-jax merge`): each param is
read from the base a layer at a time (`models.reading`), its adapter folded in (`lj.merge` on
that layer alone) and streamed into safetensors shards whose headers were laid out first. The
host holds one layer of one param and the adapter, never the model."""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util
from tqdm.auto import tqdm

from lora_jax.config import LoraConfig
from lora_jax.files import atomic_dir, check_finite, path
from lora_jax.models.hub import (
    MODEL_FILES,
    MODEL_MARKER,
    copy_tokenizer,
    file_tensors,
    naming_of,
    plan,
)  # fmt: skip
from lora_jax.models.naming import Naming
from lora_jax.models.reading import DTYPES, Checkpoint
from lora_jax.tree import ADAPTER_LEAVES, KERNEL, LORA_A, merge

# safetensors' names of numpy's dtypes: `models.reading`'s table, the other way.
DTYPE_CODES = {np.dtype(dtype).name: code for code, dtype in DTYPES.items()}
Layout = list[tuple[str, tuple[int, ...]]]  # (tensor name, shape) in the order written


def merge_checkpoint(
    base: str | os.PathLike,
    adapter: dict[str, Any],
    config: LoraConfig,
    model: nn.Module,
    hf_config: dict[str, Any],
    out_dir: str | os.PathLike,
    dtype: Any,
    new_head: bool = False,
) -> Any:
    """Writes the model `base` + `adapter` (its lj.merge) to `out_dir` in `dtype`, as shards of
    at most the base's largest file (one file for a one-file base), tokenizer files beside;
    the whole directory appears at once, or nothing does (`files.atomic_dir`). `model` and
    `hf_config` are the base's (with the adapter's head where `new_head`)."""
    checkpoint, naming, dtype = Checkpoint(path(base)), naming_of(hf_config), np.dtype(dtype)
    shapes, leaves = plan(model, checkpoint, hf_config, new_head)
    flat = traverse_util.flatten_dict(adapter.get("params", adapter))
    if absent := [k for k in shapes if k not in leaves and k not in flat]:
        raise ValueError(f"{base}: has no {'/'.join(absent[0])} and the adapter brings none.")
    layout = [spec for keys in shapes for spec in _layout(naming, keys, shapes[keys].shape, dtype)]
    limit = max(f.stat().length for f in set(checkpoint.files.values()))
    shards = _shards(layout, dtype, limit)

    def layer(keys: tuple, index: tuple) -> np.ndarray:
        """One layer (`index`) of the param at `keys`: the adapter's own where it trains the
        whole param (modules_to_save), else the base's with the adapter folded in."""
        if keys in flat:
            return np.asarray(flat[keys][index], dtype)
        module = keys[:-1]
        if keys[-1] != KERNEL or (*module, LORA_A) not in flat:
            return leaves[keys].read(checkpoint, index, dtype)
        factors = {(*module, n): flat[(*module, n)][index] for n in ADAPTER_LEAVES
                   if (*module, n) in flat}  # fmt: skip
        # Merged at float32 and rounded to `dtype` once, as peft's merge_and_unload then a
        # cast: a base read in bfloat16 first would be rounded twice.
        value = leaves[keys].read(checkpoint, index, np.promote_types(dtype, np.float32))
        tree = traverse_util.unflatten_dict({**factors, keys: value})
        return np.asarray(traverse_util.flatten_dict(merge(tree, config))[keys], dtype)

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        """The merged checkpoint's tensors, in `layout`'s order."""
        for keys, shape in shapes.items():
            layers = shape.shape[0] if naming.stacked(keys) else 1
            for i in range(layers):
                index = (slice(i, i + 1),) if naming.stacked(keys) else ()
                value = layer(keys, index)
                name, torch = naming.layer_tensor(keys, i, layers, value[0] if index else value)
                for file_name, tensor in file_tensors(naming, name, torch):
                    yield file_name, np.asarray(tensor)

    out_config = dict(hf_config, dtype=dtype.name)
    stream = iter(tqdm(tensors(), total=len(layout), desc="merging", unit="tensor", delay=1))
    with atomic_dir(out_dir, "model", MODEL_FILES, MODEL_MARKER) as tmp:
        for file, specs in shards.items():
            _write_shard(tmp / file, specs, dtype, stream, out_dir)
        if len(shards) > 1:
            total = sum(_nbytes(shape, dtype) for _, shape in layout)
            names = {n: file for file, specs in shards.items() for n, _ in specs}
            index = {"metadata": {"total_size": total}, "weight_map": names}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / MODEL_MARKER).write_text(json.dumps(out_config, indent=2, sort_keys=True))
        copy_tokenizer(base, tmp)
    return path(out_dir)


def _layout(naming: Naming, keys: tuple, shape: tuple[int, ...], dtype: np.dtype) -> Layout:
    """The (name, shape) of each file tensor the param at `keys` becomes, layer by layer:
    found by tracing the conversion on shapes alone (nothing computed)."""
    stacked = naming.stacked(keys)
    layers, one = (shape[0], shape[1:]) if stacked else (1, shape)
    out: Layout = []
    for i in range(layers):
        names: list[str] = []

        def convert(array: Any, i: int = i, names: list[str] = names) -> list[Any]:
            pieces = file_tensors(naming, *naming.layer_tensor(keys, i, layers, array))
            names.extend(n for n, _ in pieces)  # the names, taken as the trace passes
            return [t for _, t in pieces]

        traced = jax.eval_shape(convert, jax.ShapeDtypeStruct(one, dtype))
        out += [(n, tuple(t.shape)) for n, t in zip(names, traced, strict=True)]
    return out


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _shards(layout: Layout, dtype: np.dtype, limit: int) -> dict[str, Layout]:
    """The layout cut, in order, into files of at most `limit` bytes (a larger tensor alone),
    named as transformers names them."""
    groups: list[Layout] = [[]]
    size = 0
    for name, shape in layout:
        if groups[-1] and size + _nbytes(shape, dtype) > limit:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += _nbytes(shape, dtype)
    if len(groups) == 1:
        return {"model.safetensors": groups[0]}
    n = len(groups)
    return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": g for i, g in enumerate(groups)}


def _write_shard(
    path: Path, specs: Layout, dtype: np.dtype, stream: Iterator, out_dir: str | Path
) -> None:
    """One safetensors file: its header from `specs`, then each tensor's bytes as `stream`
    yields them (in the same order), each checked finite."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    begin = 0
    for name, shape in specs:
        end = begin + _nbytes(shape, dtype)
        header[name] = {"dtype": DTYPE_CODES[dtype.name], "shape": list(shape),
                        "data_offsets": [begin, end]}  # fmt: skip
        begin = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in specs:
            got, tensor = next(stream)
            if (got, tensor.shape) != (name, shape):  # the layout and the stream disagree
                raise RuntimeError(f"merge wrote {got} {tensor.shape} where {name} {shape} is due")
            check_finite({name: tensor}, out_dir)
            f.write(np.ascontiguousarray(tensor, dtype).reshape(-1).view(np.uint8).data)
