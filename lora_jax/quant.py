"""QLoRA's frozen base: kernels stored as int8 or 4-bit NormalFloat, dequantized on use.

A quantized leaf is a `QuantizedKernel`, a Flax `AxisMetadata` box. Linen layers read their
params through `self.param`, which unboxes, so every Dense / DenseGeneral / Einsum / Embed
computes with the dequantized weight inside the traced forward; the stored tree holds only
codes and block scales. `nn.scan` slices the box's arrays like any param (every array keeps
the kernel's leading axes), so scanned layers need nothing special.

Storage, per block of `block_size` consecutive entries along the last axis:
- int8: round(127·w/absmax), |w − ŵ| ≤ absmax/254.
- nf4: the nearest of the 16 NF4 levels to w/absmax, two codes per byte. NF4 is the QLoRA
  paper's code: quantiles of N(0, 1) scaled to [−1, 1], with an exact zero. Rounding to the
  nearest level gives |w − ŵ| ≤ absmax·NF4_HALF_GAP (half the widest gap between levels).
- double quantization (the paper's, with rows as the second-level groups): each row's float32
  block scales become int8 codes around the row's mean, adding at most
  (max |absmax − mean| over the row)/254 to each scale.

`loftq` quantizes the base and initialises the adapters together (LoftQ), so that quantized
base + adapter starts closer to the float weights than the quantized base alone.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util
from flax.core import meta

from lora_jax import variants
from lora_jax.config import LoraConfig
from lora_jax.tree import KERNEL, LORA_A, LORA_B, Layouts, init, path_str, sites

# bitsandbytes' NF4 table (QLoRA, appendix E): 7 negative and 8 positive quantiles of N(0, 1)
# with an exact zero, normalised to [-1, 1].
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)  # fmt: skip
NF4_HALF_GAP = float(np.max(np.diff(NF4)) / 2)
KINDS = ("nf4", "int8")
QUANTIZED_LEAVES = ("kernel", "embedding")  # what `quantize` stores in low precision


class QuantizedKernel(struct.PyTreeNode, meta.AxisMetadata):
    """A weight stored as codes and block scales; `unbox()` gives it back in `dtype`.

    codes: uint8 (nf4, two per byte) or int8, the weight's shape with the last axis halved
    for nf4. scales: float32 absmax per block (lead + (blocks,)), or int8 codes of them when
    double-quantized, with float32 `scale_offset` and `scale_step` per row (lead + (1,)).
    """

    codes: jax.Array
    scales: jax.Array
    scale_offset: jax.Array | None = None
    scale_step: jax.Array | None = None
    kind: str = struct.field(pytree_node=False, default="nf4")
    dtype: Any = struct.field(pytree_node=False, default=jnp.bfloat16)

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, last = self.codes.shape
        return (*lead, last * 2 if self.kind == "nf4" else last)

    @property
    def ndim(self) -> int:
        return self.codes.ndim

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return nbytes(self)

    def block_scales(self) -> jax.Array:
        """The float32 absmax of every block (dequantizing them first if double-quantized)."""
        if self.scale_step is None:
            return self.scales
        return self.scale_offset + self.scale_step * self.scales.astype(jnp.float32)

    def unbox(self) -> jax.Array:
        """The dequantized weight, in `dtype`: what Linen layers compute with."""
        if self.kind == "nf4":
            pairs = jnp.stack([self.codes & 0xF, self.codes >> 4], axis=-1)
            levels = jnp.asarray(NF4)[pairs.reshape(self.shape).astype(jnp.int32)]
        else:
            levels = self.codes.astype(jnp.float32) / 127.0
        blocks = self.block_scales().shape[-1]
        by_block = levels.reshape(*self.shape[:-1], blocks, -1)
        w = by_block * self.block_scales()[..., None]
        return w.reshape(self.shape).astype(self.dtype)

    def replace_boxed(self, val: jax.Array) -> QuantizedKernel:
        # A layer writing its weight back (rare for params) stores it in the same format.
        return quantize_array(val, self.kind, self.shape[-1] // self.scales.shape[-1],
                              self.scale_step is not None)  # fmt: skip

    # nn.scan / nn.vmap slice and stack the arrays themselves; the box holds no axis names.
    def add_axis(self, index: int, params: dict[Any, Any]) -> QuantizedKernel:
        return self

    def remove_axis(self, index: int, params: dict[Any, Any]) -> QuantizedKernel:
        return self


def quantize_array(
    w: jax.Array, kind: str = "nf4", block_size: int = 64, double_quant: bool = True
) -> QuantizedKernel:
    """One weight as a QuantizedKernel: block-wise absmax along the last axis, then codes."""
    if kind not in KINDS:
        raise ValueError(f"quantization kind {kind!r}; choose one of {KINDS}.")
    if block_size < 2 or block_size % 2:
        raise ValueError(f"block_size is {block_size}; must be an even number >= 2.")
    if w.shape[-1] % block_size:
        raise ValueError(
            f"last axis {w.shape[-1]} of shape {tuple(w.shape)} is not a multiple of "
            f"block_size {block_size}."
        )
    return _quantize(jnp.asarray(w), kind, block_size, double_quant)


@functools.partial(jax.jit, static_argnames=("kind", "block_size", "double_quant"))
def _quantize(w: jax.Array, kind: str, block_size: int, double_quant: bool) -> QuantizedKernel:
    blocks = w.astype(jnp.float32).reshape(*w.shape[:-1], -1, block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    x = (blocks / jnp.where(absmax == 0, 1.0, absmax)[..., None]).reshape(w.shape)
    if kind == "nf4":
        # Nearest level via the midpoints (ties to the lower level), never a 16x-sized argmin.
        idx = jnp.searchsorted(jnp.asarray((NF4[1:] + NF4[:-1]) / 2), x).astype(jnp.uint8)
        codes = idx[..., 0::2] | (idx[..., 1::2] << 4)
    else:
        codes = jnp.round(x * 127.0).astype(jnp.int8)
    if not double_quant:
        return QuantizedKernel(codes, absmax, kind=kind, dtype=w.dtype)
    offset = jnp.mean(absmax, axis=-1, keepdims=True)
    step = jnp.max(jnp.abs(absmax - offset), axis=-1, keepdims=True) / 127.0
    scale_codes = jnp.round((absmax - offset) / jnp.where(step == 0, 1.0, step))
    return QuantizedKernel(codes, scale_codes.astype(jnp.int8), offset, step, kind, w.dtype)


def quantize(
    params: Any,
    config: LoraConfig | None = None,
    kind: str = "nf4",
    block_size: int = 64,
    double_quant: bool = True,
) -> dict[str, Any]:
    """The frozen base with every kernel and embedding table stored as `kind` (QLoRA).

    Adapter leaves, biases, norms and the config's modules_to_save stay as they are, so
    `lj.init` can run before or after (PiSSA/OLoRA: before, so the residual is what gets
    quantized). A weight whose last axis is not a multiple of `block_size` stays unquantized,
    with a warning naming it. Compare `lj.nbytes` before and after for the memory saved.
    """
    if kind not in KINDS:
        raise ValueError(f"quantization kind {kind!r}; choose one of {KINDS}.")
    flat = traverse_util.flatten_dict(params, keep_empty_nodes=True)
    out, skipped = {}, []
    for keys, leaf in flat.items():
        path = path_str(keys)
        frozen = config is None or not config.is_saved(path)
        array = isinstance(leaf, jax.Array | np.ndarray)
        eligible = keys[-1] in QUANTIZED_LEAVES and array and frozen
        if eligible and leaf.ndim >= 2 and leaf.shape[-1] % block_size == 0:
            leaf = quantize_array(leaf, kind, block_size, double_quant)
        elif eligible:
            skipped.append(f"{path} {tuple(leaf.shape)}")
        out[keys] = leaf
    if skipped:
        warnings.warn(
            f"left unquantized (last axis not a multiple of block_size {block_size}): "
            + ", ".join(skipped),
            stacklevel=2,
        )
    return traverse_util.unflatten_dict(out)


def dequantize(params: Any) -> Any:
    """Every QuantizedKernel in the tree back to a dense array in its original dtype."""
    return meta.unbox(params)


def nbytes(params: Any) -> int:
    """Bytes the tree's arrays occupy (codes and scales for quantized weights); abstract
    trees (`jax.eval_shape`) count too, so a large model's footprint needs no memory."""
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))


def loftq(
    params: Any,
    config: LoraConfig,
    kind: str = "nf4",
    block_size: int = 64,
    double_quant: bool = True,
    iters: int = 1,
    layouts: Layouts | None = None,
    progress: Callable[[Sequence[Any]], Iterable[Any]] = iter,
) -> tuple[dict[str, Any], dict[str, tuple[float, float]]]:
    """QLoRA's base and adapters initialised together (LoftQ), so that the quantized base plus
    the adapter starts close to the float weights rather than at their quantization.

    For each targeted kernel W, `iters` rounds of: Q = the quantization of W − s·A·B (of W
    itself in the first round), then s·A·B = the top-r SVD of W − Q (peft's `loftq_init`,
    which fits A·B without the scale s; the two agree when alpha = rank). Returns the tree
    `quantize` would give, with the targets' kernels holding the last Q and the adapters
    beside them, and per target path (‖W − Q(W)‖, ‖W − Q − s·A·B‖) relative to ‖W‖: the
    error of plain quantization and LoftQ's. The adapter fits this Q, not the float base
    (LoftQ is deterministic: the same base and settings give the same Q again). `config.init`
    may be "loftq" (the config then records it) or a plain init; either way A and B are LoftQ's.
    `progress` wraps the list of targets as it is worked through (`tqdm` shows a bar: each
    target costs `iters` quantizations and SVDs).
    """
    if iters < 1:
        raise ValueError(f"loftq: iters is {iters}; at least one round is needed.")
    if config.use_dora or config.init in variants.BASE_MODIFYING_INITS:
        raise ValueError("loftq: sets A and B itself; use it with plain LoRA (no DoRA, no "
                         f"init={config.init!r}).")  # fmt: skip
    # `init` checks targets, ranks and layouts and lays the factors out; LoftQ then sets them.
    laid_out = init(jax.random.key(0), params, dataclasses.replace(config, init="gaussian"),
                    layouts)  # fmt: skip
    flat = traverse_util.flatten_dict(laid_out, keep_empty_nodes=True)
    report = {}
    for site in progress(sites(traverse_util.unflatten_dict(flat), config, "loftq")):
        if isinstance(site.kernel, meta.AxisMetadata):
            raise ValueError(f"loftq: {site.path} is already quantized; pass the float base "
                             "(LoftQ quantizes it itself).")  # fmt: skip
        if site.kernel.shape[-1] % block_size:
            raise ValueError(f"loftq: {site.path}: last axis {site.kernel.shape[-1]} is not a "
                             f"multiple of block_size {block_size}.")  # fmt: skip
        q, a, b, errors = _loftq_kernel(site, kind, block_size, double_quant, iters, config)
        flat[(*site.keys, KERNEL)], flat[(*site.keys, LORA_A)], flat[(*site.keys, LORA_B)] = q, a, b
        report[site.path] = errors
    return quantize(traverse_util.unflatten_dict(flat), config, kind, block_size,
                    double_quant), report  # fmt: skip


def _loftq_kernel(
    site: Any, kind: str, block_size: int, double_quant: bool, iters: int, config: LoraConfig
) -> tuple[QuantizedKernel, jax.Array, jax.Array, tuple[float, float]]:
    """LoftQ's alternation on one kernel: (Q, A, B, (plain error, LoftQ's error))."""
    w = jnp.asarray(site.kernel)
    w32, svd = w.astype(jnp.float32), variants.INITS["pissa"]
    norm = float(jnp.linalg.norm(w32)) or 1.0
    target = w32
    for round_ in range(iters):
        q = quantize_array(target.astype(w.dtype), kind, block_size, double_quant)
        gap = w32 - q.unbox().astype(jnp.float32)
        if round_ == 0:
            plain = float(jnp.linalg.norm(gap)) / norm
        # PiSSA's init on W − Q: s·A·B its top-r SVD, and the rest W − Q − s·A·B.
        a, b, rest = svd(None, gap, site.rank, site.scale, site.lead, site.n_in, jnp.float32)
        target = w32 - (gap - rest)
    dtype = config.dtype or jnp.float32
    return q, a.astype(dtype), b.astype(dtype), (plain, float(jnp.linalg.norm(rest)) / norm)
