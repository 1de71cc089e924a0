"""Running a model with its adapters: the factored forward for Linen, merge-on-the-fly otherwise.

`lora_apply` intercepts each adapted nn.Dense / nn.DenseGeneral / nn.Einsum call (public
`flax.linen.intercept_methods`) and adds (α/r)·((dropout(x)·A)·B) to the base output: two thin
matmuls, never the kernel-shaped A·B. The adapter leaves live in the module's own params, so
`nn.scan` slices them per layer and `nn.remat` / `jax.grad` see ordinary arrays.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from lora_jax.config import LoraConfig
from lora_jax.tree import KERNEL, LORA_A, LORA_B, Params, adapter_layout, merge

FACTORED_TYPES = (nn.Dense, nn.DenseGeneral, nn.Einsum)
LowRank = Callable[[jax.Array, jax.Array, jax.Array, Any], jax.Array]


def _as_tuple(x: int | tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x) if isinstance(x, tuple | list) else (x,)


def _contract(x: jax.Array, a: jax.Array, b: jax.Array, precision: Any, axis: tuple[int, ...]):
    """(x·A)·B where A's leading axes contract with x's `axis` (Dense, DenseGeneral)."""
    axis = tuple(ax % x.ndim for ax in axis)
    h = lax.dot_general(x, a, ((axis, tuple(range(len(axis)))), ((), ())), precision=precision)
    return lax.dot_general(h, b, (((h.ndim - 1,), (0,)), ((), ())), precision=precision)


def _einsum_plan(spec: str) -> tuple[int, int, LowRank]:
    """Splits "x,kernel->out" into the kernel's input and output axes and two low-rank einsums."""
    spec = spec.replace(" ", "")
    if "->" not in spec or "..." in spec or spec.count(",") != 1:
        raise ValueError(f"einsum {spec!r}: LoRA needs an explicit 'x,kernel->out' spec.")
    lhs, out = spec.split("->")
    x_spec, k_spec = lhs.split(",")
    contracted = "".join(c for c in k_spec if c in x_spec and c not in out)
    free = "".join(c for c in k_spec if c in out and c not in x_spec)
    if not contracted or not free or k_spec != contracted + free:
        raise ValueError(
            f"einsum {spec!r}: LoRA needs the kernel's axes ordered input (contracted) then "
            "output, with no batch axes; write the kernel in that order or merge instead."
        )
    r = next(c for c in string.ascii_letters if c not in spec)
    kept = "".join(c for c in x_spec if c in out)
    first, second = f"{x_spec},{contracted}{r}->{kept}{r}", f"{kept}{r},{r}{free}->{out}"

    def low_rank(x, a, b, precision):
        return jnp.einsum(
            second, jnp.einsum(first, x, a, precision=precision), b, precision=precision
        )

    return len(contracted), len(free), low_rank


def _plan(module: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, LowRank]:
    """(input axes, output axes, x,A,B -> (x·A)·B) for one call of a supported module."""
    if isinstance(module, nn.Einsum):
        spec = kwargs.get("einsum_str") or (args[1] if len(args) > 1 else None)
        return _einsum_plan(spec or module.einsum_str)
    if isinstance(module, nn.DenseGeneral):
        if module.batch_dims:
            raise ValueError("nn.DenseGeneral with batch_dims is not supported by LoRA.")
        axis = _as_tuple(module.axis)
        return len(axis), len(_as_tuple(module.features)), functools.partial(_contract, axis=axis)
    if isinstance(module, nn.Dense):
        return 1, 1, functools.partial(_contract, axis=(-1,))
    raise ValueError(
        f"{type(module).__name__} is not one of Dense, DenseGeneral, Einsum; the factored forward "
        "does not cover it. Use lj.merged_apply for this model, or exclude the path."
    )


def kernel_layouts(model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, tuple[int, int] | str]:
    """{module path: (input axes, output axes)} of every Dense/DenseGeneral/Einsum in `model`.

    Traces `model.init(*args, **kwargs)` abstractly (no FLOPs, no memory). A kernel that LoRA
    cannot adapt maps to the reason, which `lj.init` raises if that kernel is targeted.
    """
    found: dict[str, tuple[int, int] | str] = {}

    def record(next_fun, call_args, call_kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, FACTORED_TYPES):
            try:
                found["/".join(module.path)] = _plan(module, call_args, call_kwargs)[:2]
            except ValueError as err:
                found["/".join(module.path)] = str(err)
        return next_fun(*call_args, **call_kwargs)

    def init():
        key = jax.random.key(0)
        return model.init({"params": key, "dropout": key}, *args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(init)
    return found


def _adapter_dropout(module: nn.Module, x: jax.Array, rate: float) -> jax.Array:
    # Only when the caller passed a "dropout" rng, i.e. in training: eval is deterministic.
    if not rate or not module.has_rng("dropout"):
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _factored_call(config: LoraConfig, next_fun, args, kwargs, context):
    module = context.module
    if module.scope is None or not module.has_variable("params", LORA_A):
        return next_fun(*args, **kwargs)
    if context.method_name != "__call__" and isinstance(module, FACTORED_TYPES):
        return next_fun(*args, **kwargs)
    path = "/".join(module.path)
    try:
        n_in, _, low_rank = _plan(module, args, kwargs)
    except ValueError as err:
        raise ValueError(f"{path}: holds a LoRA adapter, but {err}") from None
    kernel = module.get_variable("params", KERNEL)
    a, b = module.get_variable("params", LORA_A), module.get_variable("params", LORA_B)
    lead, a_in, _, rank = adapter_layout(path, kernel.shape, a.shape, b.shape)
    if lead or a_in != n_in:
        raise ValueError(
            f"{path}: adapter made for {a_in} input axes (+{lead} stacked), but "
            f"this {type(module).__name__} call contracts {n_in}; was `layouts` right?"
        )
    y = next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["inputs"]
    x = _adapter_dropout(module, x, config.dropout)
    x, a, b = nn.dtypes.promote_dtype(x, a, b, dtype=module.dtype)
    delta = low_rank(x, a, b, module.precision) * config.scale_for(path, rank)
    return y + delta.astype(y.dtype)


def lora_apply(apply_fn: Callable[..., Any], config: LoraConfig) -> Callable[..., Any]:
    """`apply_fn` (a Linen module's `apply`) running y = x·W0 + (α/r)·(dropout(x)·A)·B.

    Same signature as `apply_fn`; give it the variables from `lj.init` (or `lj.combine`). Pass
    `rngs={"dropout": key}` to train with adapter dropout. Wrap the result in `jax.jit`, not the
    other way round: a jitted `apply_fn` would reuse a trace made without the adapters.
    """

    @functools.wraps(apply_fn)
    def apply(variables: Params, *args: Any, **kwargs: Any) -> Any:
        with nn.intercept_methods(functools.partial(_factored_call, config)):
            return apply_fn(variables, *args, **kwargs)

    return apply


def merged_apply(fn: Callable[..., Any], config: LoraConfig) -> Callable[..., Any]:
    """For any function of a params tree (plain JAX, NNX pure dicts, ...): merges, then calls.

    The fallback for models without Linen modules: it forms W0 + (α/r)·A·B per call, so it
    costs one kernel-sized temporary per adapted layer.
    """

    @functools.wraps(fn)
    def apply(params: Params, *args: Any, **kwargs: Any) -> Any:
        return fn(merge(params, config), *args, **kwargs)

    return apply
