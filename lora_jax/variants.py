"""Every LoRA variant's maths, on one adapted module's arrays: how the update is scaled (α/r,
rsLoRA's α/√r, AdaLoRA's), how A and B start (gaussian, kaiming, PiSSA, OLoRA, AdaLoRA's), and
how the output is shaped (plain, AdaLoRA's singular values folded into A, or DoRA's learned
magnitude per output unit). AdaLoRA's training-time rank allocation is `lora_jax.adalora`.

`tree` walks trees and `apply` intercepts Linen calls; both ask this module, so a new variant
is an entry in `INITS`, a branch in `scale`, or a leaf in `EXTRA_LEAVES` with its two output
functions here (plus its peft tensor name in `io`). Layouts: the kernel is lead + in + out,
A lead + in + (r,), B lead + (r,) + out, with `lead` stacked-layer axes and `n_in` input axes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

MAGNITUDE = "lora_magnitude"  # DoRA: lead + out, the learned norm of each output unit's weights
SINGULAR = "lora_e"  # AdaLoRA: lead + (r,), the singular values E of s·A·diag(E)·B
# Leaves a variant adds beside lora_a / lora_b, with the axes they keep (for sharding).
EXTRA_LEAVES = {MAGNITUDE: "lead+out", SINGULAR: "lead+rank"}


def scale(alpha: float, rank: int, rslora: bool, adalora: bool = False) -> float:
    """The factor that multiplies A·B: α/r, or α/√r with rsLoRA (the update keeps its size as
    the rank grows); AdaLoRA's α/(r + 1e-5), peft's, r its initial rank however many it keeps."""
    if adalora:
        return alpha / (rank + 1e-5)
    return alpha / (math.sqrt(rank) if rslora else rank)


# ----------------------------------------------------------------------------- einsum helpers


def axes(ndim: int, lead: int, n_in: int) -> tuple[str, str, str]:
    """einsum letters for a kernel's layer, input and output axes (r, s name the rank axes)."""
    letters = "abcdefghijklmnopq"[:ndim]
    return letters[:lead], letters[lead : lead + n_in], letters[lead + n_in :]


def einsum32(spec: str, *operands: jax.Array) -> jax.Array:
    # einsum over the kernel's own axes, never a reshape: a reshape that merges sharded axes
    # is refused under explicit sharding, and this keeps every axis's sharding as it was.
    f32 = [x.astype(jnp.float32) for x in operands]
    return jnp.einsum(spec, *f32, precision=jax.lax.Precision.HIGHEST)


def low_rank_update(w: jax.Array, a: jax.Array, b: jax.Array, lead: int, n_in: int) -> jax.Array:
    """A·B in float32, kernel-shaped: the update that merge adds (never used in the forward)."""
    layer, ins, outs = axes(w.ndim, lead, n_in)
    return einsum32(f"{layer}{ins}r,{layer}r{outs}->{layer}{ins}{outs}", a, b)


# ----------------------------------------------------------------------------- inits

# (key, w, rank, scale, lead, n_in, dtype) -> (A, B, the new kernel or None if unchanged)
Init = Callable[..., tuple[jax.Array, jax.Array, jax.Array | None]]


def _zero_b(w: jax.Array, rank: int, lead: int, n_in: int, dtype) -> jax.Array:
    return jnp.zeros((*w.shape[:lead], rank, *w.shape[lead + n_in :]), dtype)


def _gaussian(key, w, rank, scale, lead, n_in, dtype):
    # peft's init_lora_weights="gaussian": A ~ N(0, 1/r), B = 0
    a = jax.random.normal(key, (*w.shape[: lead + n_in], rank), dtype) / rank
    return a, _zero_b(w, rank, lead, n_in, dtype), None


def _kaiming(key, w, rank, scale, lead, n_in, dtype):
    # peft's default (kaiming_uniform with a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1.0 / math.sqrt(math.prod(w.shape[lead : lead + n_in]))
    a = jax.random.uniform(key, (*w.shape[: lead + n_in], rank), dtype, -bound, bound)
    return a, _zero_b(w, rank, lead, n_in, dtype), None


def _principal(kind: str) -> Init:
    """PiSSA (top-r SVD) or OLoRA (QR) factors of W0 in float32, as peft computes them, such
    that scale·A·B is the part of W0 they take over; the kernel becomes the residual."""

    def init(key, w, rank, scale, lead, n_in, dtype):
        layers, fan_in = math.prod(w.shape[:lead]), math.prod(w.shape[lead : lead + n_in])
        w3 = w.reshape(layers, fan_in, -1).astype(jnp.float32)
        if kind == "pissa":
            u, s, vt = jnp.linalg.svd(w3, full_matrices=False)
            root = jnp.sqrt(s[:, :rank] / scale)
            a, b = u[:, :, :rank] * root[:, None, :], root[:, :, None] * vt[:, :rank, :]
        else:  # olora: QR of the (out, in) weight, A = R[:r], B = Q[:, :r]
            q, r = jnp.linalg.qr(jnp.swapaxes(w3, 1, 2))
            a, b = jnp.swapaxes(r[:, :rank, :], 1, 2), jnp.swapaxes(q[:, :, :rank], 1, 2)
        a = a.reshape(*w.shape[: lead + n_in], rank)
        b = b.reshape(*w.shape[:lead], rank, *w.shape[lead + n_in :])
        residual = merged_kernel(w, a, b, None, -scale, lead, n_in)  # stays frozen
        return a.astype(dtype), b.astype(dtype), residual

    return init


INITS: dict[str, Init] = {
    "gaussian": _gaussian,
    "kaiming": _kaiming,
    "pissa": _principal("pissa"),
    "olora": _principal("olora"),
}
# Inits that rewrite the base kernel (so a saved adapter needs converting; see io).
BASE_MODIFYING_INITS = ("pissa", "olora")


# ----------------------------------------------------------------------------- AdaLoRA


def init_factors(
    key: jax.Array, shape: tuple[int, ...], rank: int, lead: int, n_in: int, dtype: Any
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """AdaLoRA's (A, B, E) as peft starts them: A and B ~ N(0, 0.02), E = 0 (a zero update)."""
    ka, kb = jax.random.split(key)
    a = 0.02 * jax.random.normal(ka, (*shape[: lead + n_in], rank), dtype)
    b = 0.02 * jax.random.normal(kb, (*shape[:lead], rank, *shape[lead + n_in :]), dtype)
    return a, b, jnp.zeros((*shape[:lead], rank), dtype)


def fold(a: Any, e: Any) -> Any:
    """A·diag(E): A (lead + in + (r,)) with each rank column scaled by its singular value
    (E: lead + (r,)), the factor every LoRA function then uses as A."""
    n_in = a.ndim - e.ndim
    return a * jnp.expand_dims(e, tuple(range(e.ndim - 1, e.ndim - 1 + n_in))).astype(a.dtype)


# ----------------------------------------------------------------------------- DoRA


def direction_norm(
    w: jax.Array, a: jax.Array, b: jax.Array, scale: float, lead: int, n_in: int
) -> jax.Array:
    """||W0 + s·A·B|| over the input axes, one per output unit (shape lead + out), in float32.

    DoRA's denominator, from ||W0||² + 2s·<AᵀW0, B> + s²·<(AᵀA)B, B>: thin matmuls only, so
    the kernel-sized W0 + s·A·B is never formed. init, merge and the forward all use it.
    """
    layer, ins, outs = axes(w.ndim, lead, n_in)
    a_w = einsum32(f"{layer}{ins}r,{layer}{ins}{outs}->{layer}r{outs}", a, w)
    gram = einsum32(f"{layer}{ins}r,{layer}{ins}s->{layer}rs", a, a)
    gram_b = einsum32(f"{layer}rs,{layer}s{outs}->{layer}r{outs}", gram, b)
    b32 = b.astype(jnp.float32)
    cross, square = jnp.sum(b32 * a_w, axis=lead), jnp.sum(b32 * gram_b, axis=lead)
    w2 = jnp.sum(jnp.square(w.astype(jnp.float32)), axis=tuple(range(lead, lead + n_in)))
    return jnp.sqrt(jnp.maximum(w2 + 2 * scale * cross + scale**2 * square, 0.0))


def initial_magnitude(w, a, b, scale: float, lead: int, n_in: int, dtype) -> jax.Array:
    """DoRA's m at init: ||W0 + s·A·B|| per output unit, so the output is unchanged."""
    return direction_norm(w, a, b, scale, lead, n_in).astype(dtype)


def merged_kernel(
    w: jax.Array, a: jax.Array, b: jax.Array, m: jax.Array | None, scale: jax.Array, lead: int,
    n_in: int,
) -> jax.Array:  # fmt: skip
    """W0 + s·A·B in float32, cast to w's dtype; with a DoRA magnitude m, each output unit
    rescaled to m: m·(W0 + s·A·B)/||W0 + s·A·B||."""
    v = w.astype(jnp.float32) + scale * low_rank_update(w, a, b, lead, n_in)
    if m is not None:
        ratio = m.astype(jnp.float32) / direction_norm(w, a, b, scale, lead, n_in)
        v = v * jnp.expand_dims(ratio, tuple(range(lead, lead + n_in)))
    return v.astype(w.dtype)


def refuse_unmerge(path: str, m: jax.Array | None) -> None:
    """Unmerging subtracts s·A·B; a DoRA merge also rescaled each output unit, which cannot be
    undone without W0."""
    if m is not None:
        raise ValueError(
            f"unmerge: {path} is a DoRA adapter; its merge rescaled each output unit by "
            "m/||W0 + s·A·B||, which cannot be inverted without W0. Keep the base instead."
        )


def output(
    y: jax.Array, delta: jax.Array, m: jax.Array | None, kernel: jax.Array, a: jax.Array,
    b: jax.Array, bias: jax.Array | None, scale: float, n_in: int, trailing: bool, path: str,
) -> jax.Array:  # fmt: skip
    """A layer's output from its base output y = x·W0 + bias and the adapter's s·(x·A)·B.

    Plain LoRA adds them. DoRA: y = m/||W0 + s·A·B|| · (x·W0 + s·x·A·B) + bias, the norm
    detached as in the paper (the output axes must come last to broadcast the ratio)."""
    if m is None:
        return y + delta
    if not trailing:
        raise ValueError(f"{path}: DoRA needs the einsum's output axes last in its result.")
    norm = jax.lax.stop_gradient(direction_norm(kernel, a, b, scale, 0, n_in))
    ratio = (m / norm).astype(y.dtype)
    bias = jnp.asarray(0 if bias is None else bias, y.dtype)
    return ratio * (y - bias + delta) + bias
