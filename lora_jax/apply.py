"""Running a model with its adapters: the factored forward for Linen and NNX, merging otherwise.

`lora_apply` intercepts each adapted nn.Dense / nn.DenseGeneral / nn.Einsum / nn.Conv call
(public `flax.linen.intercept_methods`) and adds (α/r)·((dropout(x)·A)·B) to the base output:
two thin products, never the kernel-shaped A·B (for a convolution x·A is a convolution with the
base's geometry and r output channels, as in peft's Conv LoRA; DoRA then rescales each output
unit by a norm computed from thin matmuls too). The adapter leaves live in the module's own
params, so `nn.scan` slices them per layer and `nn.remat` / `jax.grad` see ordinary arrays.
The thin matmuls have their own backward (`_low_rank`), written so XLA never copies an
activation into a transposed layout for a rank-r product (bench/RESULTS.md has the profile).

`nnx_adapt` does the same for NNX: each adapted nnx.Linear / LinearGeneral / Einsum / Conv
becomes an instance of a subclass of its own class whose __call__ adds the low-rank term, and
holds its factors as variables beside its kernel. NNX's transforms carry a node's class and
variables through `nnx.split` / `nnx.merge`, so `nnx.scan` slices the adapter per layer like
the kernel.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import string
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx, traverse_util
from jax import lax

from lora_jax import variants
from lora_jax.config import LoraConfig
from lora_jax.grouped import GroupedDense, grouped_dot
from lora_jax.kinds import ConvLayout, Grouped, Kind, Linear
from lora_jax.tree import (
    ADAPTER_LEAVES,
    KERNEL,
    LORA_A,
    LORA_B,
    LORA_E,
    LORA_M,
    Bank,
    Params,
    adapter_layout,
    as_dict,
    merge,
    path_str,
    sites,
)

FACTORED_TYPES = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv, GroupedDense)
NNX_TYPES = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv)
# Set while lora_apply / routed_apply run a model, so a model can tell a tree whose adapters
# will be applied from one whose adapters it would silently ignore.
_RUNNING = contextvars.ContextVar("lora_jax_adapters_running", default=False)


def adapters_running() -> bool:
    """Whether the current call runs inside `lora_apply` / `routed_apply`."""
    return _RUNNING.get()


@contextlib.contextmanager
def _running(call):
    token = _RUNNING.set(True)
    try:
        with nn.intercept_methods(call):
            yield
    finally:
        _RUNNING.reset(token)


LowRank = Callable[[jax.Array, jax.Array, jax.Array, Any], jax.Array]


class Plan(NamedTuple):
    """How one call of a supported module contracts its kernel."""

    kind: Kind  # the kernel's kind (`lora_jax.kinds`): its input, output and group axes
    low_rank: LowRank  # (x, A, B, precision) -> (x·A)·B
    trailing: bool  # the output axes come last in y (DoRA scales them by broadcasting)


def _as_tuple(x: int | tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x) if isinstance(x, tuple | list) else (x,)


def _contract(x: jax.Array, a: jax.Array, b: jax.Array, precision: Any, axis: tuple[int, ...]):
    """(x·A)·B where A's leading axes contract with x's `axis` (Dense, DenseGeneral)."""
    return _low_rank(x, a, b, precision, tuple(ax % x.ndim for ax in axis))


def _x_a(x: jax.Array, a: jax.Array, precision: Any, axis: tuple[int, ...]) -> jax.Array:
    return lax.dot_general(x, a, ((axis, tuple(range(len(axis)))), ((), ())), precision=precision)


def _h_b(h: jax.Array, b: jax.Array, precision: Any) -> jax.Array:
    return lax.dot_general(h, b, (((h.ndim - 1,), (0,)), ((), ())), precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _low_rank(x, a, b, precision, axis):
    return _h_b(_x_a(x, a, precision, axis), b, precision)


def _low_rank_fwd(x, a, b, precision, axis):
    h = _x_a(x, a, precision, axis)
    return _h_b(h, b, precision), (x, a, b, h)


def _low_rank_bwd(precision, axis, residuals, g):
    """The three thin products of the backward, each written with the activation-sized operand
    (x, or the output gradient g) on the right, contracted over its leading (token) axes: the
    layout XLA's dot takes as it is. Autodiff's own transpose puts x on the left, and XLA then
    copies the whole activation into a transposed layout for a rank-r product."""
    x, a, b, h = residuals
    kept = tuple(i for i in range(x.ndim) if i not in axis)  # token axes, shared by h and g
    tokens = tuple(range(len(kept)))
    dot = functools.partial(lax.dot_general, precision=precision)
    g_h = dot(g, b, ((tuple(range(len(kept), g.ndim)), tuple(range(1, b.ndim))), ((), ())))
    g_b = dot(h, g, ((tokens, tokens), ((), ())))  # (r, *out)
    g_a = dot(g_h, x, ((tokens, kept), ((), ())))  # (r, *x's contracted axes in x's order)
    # XLA folds a transpose of a dot's output into the dot by swapping its operands, which
    # puts x back on the left: the barrier keeps the transpose on the small (r, in) result.
    g_a = lax.optimization_barrier(g_a)
    order = sorted(axis)
    g_a = jnp.transpose(g_a, [1 + order.index(ax) for ax in axis] + [0])
    g_x = dot(g_h, a, (((g_h.ndim - 1,), (a.ndim - 1,)), ((), ())))  # (*kept, *A's input axes)
    where = {ax: i for i, ax in enumerate(kept + axis)}
    return jnp.transpose(g_x, [where[i] for i in range(x.ndim)]), g_a, g_b


_low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)


def _einsum_plan(spec: str) -> Plan:
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

    return Plan(Linear(len(contracted), len(free)), low_rank, out.endswith(free))


def _conv_plan(module: nn.Conv | nnx.Conv) -> Plan:
    """A convolution's kernel is (*spatial, in, out). The update's x·A is a convolution with the
    base's kernel size, strides, padding and dilations and r output channels (peft's lora_A;
    peft leaves out the dilation, which only agrees with its merge when there is none), then
    a matmul with B (r, out) over the channels: by linearity, conv(x, W0 + s·A·B) exactly."""
    if module.feature_group_count != 1:
        raise ValueError(f"a grouped convolution (feature_group_count={module.feature_group_count}"
                         ") mixes each output with its own group's inputs, which a shared A "
                         "cannot factor; exclude the path.")  # fmt: skip
    if module.mask is not None:
        raise ValueError("a masked convolution masks W0 + s·A·B element by element, which "
                         "the factored forward cannot; exclude the path, or merge.")  # fmt: skip
    names = ("kernel_size", "strides", "padding", "input_dilation", "kernel_dilation")
    geometry = {name: getattr(module, name) for name in names}
    geometry["kernel_size"] = _as_tuple(geometry["kernel_size"])

    def low_rank(x, a, b, precision):
        conv = nn.Conv(a.shape[-1], **geometry, use_bias=False, precision=precision)
        return _h_b(conv.apply({"params": {KERNEL: a}}, x), b, precision)

    return Plan(ConvLayout(len(geometry["kernel_size"]) + 1, 1), low_rank, True)


def _grouped_plan(args: tuple, kwargs: dict) -> Plan:
    """A GroupedDense's kernel is (groups, in, out), each group's rows times its own kernel:
    the update is two grouped products, (x·A_g)·B_g, each group with its own factors."""
    sizes = args[1] if len(args) > 1 else kwargs.get("group_sizes")

    def low_rank(x, a, b, precision):
        return grouped_dot(grouped_dot(x, a, sizes, precision), b, sizes, precision)

    return Plan(Grouped(), low_rank, True)


def _plan(module: Any, args: tuple, kwargs: dict) -> Plan:
    """How a call of a supported Linen or NNX module contracts its kernel; ValueError for others."""
    if isinstance(module, GroupedDense):
        return _grouped_plan(args, kwargs)
    if isinstance(module, nn.Einsum | nnx.Einsum):
        spec = kwargs.get("einsum_str") or (args[1] if len(args) > 1 else None)
        return _einsum_plan(spec or module.einsum_str)
    if isinstance(module, nn.DenseGeneral | nnx.LinearGeneral):
        linen = isinstance(module, nn.DenseGeneral)
        if module.batch_dims if linen else module.batch_axis:
            raise ValueError(f"{type(module).__name__} with batch axes is not supported by LoRA.")
        axis, x = _as_tuple(module.axis), args[0] if args else kwargs.get("inputs")
        if x is not None:  # counted from the end, so the plan also holds per example (vmap)
            axis = tuple(ax % jnp.ndim(x) - jnp.ndim(x) for ax in axis)
        n_out = len(_as_tuple(module.features if linen else module.out_features))
        return Plan(Linear(len(axis), n_out), functools.partial(_contract, axis=axis), True)
    if isinstance(module, nn.Dense | nnx.Linear):
        return Plan(Linear(1, 1), functools.partial(_contract, axis=(-1,)), True)
    if isinstance(module, nn.Conv | nnx.Conv):
        return _conv_plan(module)
    raise ValueError(
        f"{type(module).__name__} is not one of Dense, DenseGeneral, Einsum, Conv, GroupedDense "
        "(Linen) or Linear, LinearGeneral, Einsum, Conv (NNX); the factored forward does not "
        "cover it. "
        "Exclude the path, or merge (lj.merge) instead."
    )


def _layout(module: Any, args: tuple, kwargs: dict) -> Kind | str:
    """A module's entry in `kernel_layouts`: its plan's kernel kind, or why it has none."""
    try:
        return _plan(module, args, kwargs).kind
    except ValueError as err:
        return str(err)


def _nnx_modules(model: nnx.Module) -> dict[str, Any]:
    """{path: module} of every module in an NNX model, paths written as in its pure dict."""
    return {path_str(k): node for k, node in nnx.iter_graph(model) if isinstance(node, nnx.Module)}


def kernel_layouts(
    model: nn.Module | nnx.Module, *args: Any, **kwargs: Any
) -> dict[str, Kind | str]:
    """{module path: its kernel's kind} of every kernel LoRA can factor in `model`: a
    `lora_jax.kinds` record of its input and output axes (equal to the pair (n_in, n_out)), a
    `ConvLayout` for a convolution (spatial axes + input channels, then output channels), a
    `Grouped` for a mixture's experts.

    A Linen model is traced through `model.init(*args, **kwargs)` abstractly (no FLOPs, no
    memory); an NNX model is read off its modules' attributes (no inputs needed). A kernel
    that LoRA cannot adapt maps to the reason, which `lj.init` raises if it is targeted.
    """
    found: dict[str, Kind | str] = {}
    if isinstance(model, nnx.Module):
        for path, module in _nnx_modules(model).items():
            if isinstance(module, NNX_TYPES):
                found[path] = _layout(module, (), {})
        return found

    def record(next_fun, call_args, call_kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, FACTORED_TYPES):
            found["/".join(module.path)] = _layout(module, call_args, call_kwargs)
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


def _routed(plan: Plan, x, a, b, precision, ids: jax.Array, block: int, path: str):
    """Per example e, (x_e·A_k)·B_k of its adapter k = ids[e] (none where -1): A and B hold
    the adapters' blocks of `block` ranks side by side; each example gathers its own."""
    if x.shape[0] != ids.shape[0]:
        raise ValueError(f"{path}: {ids.shape[0]} adapter ids for a batch of {x.shape[0]}.")
    n = a.shape[-1] // block
    pick = jnp.clip(ids, 0, n - 1)
    a_e = jnp.moveaxis(jnp.take(a.reshape(*a.shape[:-1], n, block), pick, axis=-2), -2, 0)
    b_e = jnp.take(b.reshape(n, block, *b.shape[1:]), pick, axis=0)
    delta = jax.vmap(plan.low_rank, in_axes=(0, 0, 0, None))(x, a_e, b_e, precision)
    return jnp.where((ids >= 0).reshape(-1, *(1,) * (delta.ndim - 1)), delta, 0)


def _checked_rank(path: str, plan: Plan, module: Any, kernel: Any, a: Any, b: Any) -> int:
    """The adapter's rank, once its layout is known to fit this call of the module."""
    lead, a_in, _, rank = adapter_layout(path, kernel.shape, a.shape, b.shape)
    if lead != plan.kind.groups or a_in != plan.kind.n_in:
        raise ValueError(
            f"{path}: adapter made for {a_in} input axes (+{lead} stacked), but this "
            f"{type(module).__name__} call contracts {plan.kind.n_in} (+{plan.kind.groups} "
            "grouped); "
            "was `layouts` right?"
        )
    return rank


def _with_adapter(
    plan: Plan, path: str, module: Any, y: jax.Array, x: jax.Array, kernel: Any, a: Any, b: Any,
    m: Any, e: Any, bias: Any, scale: float, routing: tuple[jax.Array, int] | None = None,
) -> jax.Array:  # fmt: skip
    """The adapted output from the base output y: y + s·(x·A)·B, or the variant's form of it
    (AdaLoRA: A·diag(E) as A; DoRA: rescaled by its magnitude m)."""
    a = nn.meta.unbox(a) if e is None else variants.fold(nn.meta.unbox(a), e)
    x, a_c, b_c = nn.dtypes.promote_dtype(x, a, nn.meta.unbox(b), dtype=module.dtype)
    if routing is None:
        delta = plan.low_rank(x, a_c, b_c, module.precision)
    else:
        delta = _routed(plan, x, a_c, b_c, module.precision, *routing, path)
    delta = (delta * scale).astype(y.dtype)
    if m is not None:  # DoRA's norm reads W0: for QLoRA the dequantized kernel the layer used
        kernel = nn.meta.unbox(kernel)
    n_in = plan.kind.n_in
    return variants.output(y, delta, m, kernel, a, b, bias, scale, n_in, plan.trailing, path)


def _factored_call(config: LoraConfig, next_fun, args, kwargs, context, adapter_ids=None):
    module = context.module
    if module.scope is None or not module.has_variable("params", LORA_A):
        return next_fun(*args, **kwargs)
    if context.method_name != "__call__" and isinstance(module, FACTORED_TYPES):
        return next_fun(*args, **kwargs)
    path = "/".join(module.path)
    try:
        plan = _plan(module, args, kwargs)
    except ValueError as err:
        raise ValueError(f"{path}: holds a LoRA adapter, but {err}") from None
    kernel = module.get_variable("params", KERNEL)
    a, b = module.get_variable("params", LORA_A), module.get_variable("params", LORA_B)
    rank = _checked_rank(path, plan, module, kernel, a, b)
    if isinstance(a, Bank) != (adapter_ids is not None):
        raise ValueError(
            f"{path}: lj.routed_apply runs a bank of adapters (lj.compose.stack) and "
            "lj.lora_apply one adapter; this call gave "
            + ("lj.lora_apply a bank." if isinstance(a, Bank) else "lj.routed_apply one adapter.")
        )
    if adapter_ids is not None and isinstance(module, nn.Einsum | nn.Conv | GroupedDense):
        linen = "" if isinstance(module, GroupedDense) else "nn."
        raise ValueError(f"{path}: routing needs nn.Dense/DenseGeneral; this one is "
                         f"{linen}{type(module).__name__}.")  # fmt: skip
    if plan.kind.groups and module.has_variable("params", LORA_M):
        raise ValueError(f"{path}: DoRA on grouped (expert) kernels is not supported (nor in "
                         "peft); adapt the experts with plain LoRA.")  # fmt: skip
    # A bank's scales are folded into its A blocks.
    scale = 1.0 if isinstance(a, Bank) else config.scale_for(path, rank)
    y = next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["inputs"]
    x = _adapter_dropout(module, x, config.dropout)
    m, e, bias = (module.get_variable("params", n) if module.has_variable("params", n) else None
                  for n in (LORA_M, LORA_E, "bias"))  # fmt: skip
    routing = None if adapter_ids is None else (adapter_ids, a.block)
    return _with_adapter(plan, path, module, y, x, kernel, a, b, m, e, bias, scale, routing)


def lora_apply(apply_fn: Callable[..., Any], config: LoraConfig) -> Callable[..., Any]:
    """`apply_fn` (a Linen module's `apply`) running y = x·W0 + (α/r)·(dropout(x)·A)·B.

    Same signature as `apply_fn`; give it the variables from `lj.init` (or `lj.combine`). Pass
    `rngs={"dropout": key}` to train with adapter dropout. Wrap the result in `jax.jit`, not the
    other way round: a jitted `apply_fn` would reuse a trace made without the adapters.
    """

    @functools.wraps(apply_fn)
    def apply(variables: Params, *args: Any, **kwargs: Any) -> Any:
        with _running(functools.partial(_factored_call, config)):
            return apply_fn(variables, *args, **kwargs)

    return apply


def routed_apply(apply_fn: Callable[..., Any], config: LoraConfig) -> Callable[..., Any]:
    """`apply_fn` with one adapter per example: `apply(variables, *args, adapter_ids=ids)`.

    `variables` hold a bank from `lj.compose.stack` (with its `config`); `adapter_ids` (one
    int per example, -1 for the base alone) picks each example's adapter against the one
    shared base, by a gather of its A and B blocks (as Punica / S-LoRA serve many adapters).
    The ids are traced values: changing them, or swapping in another stack of the same
    shapes, never recompiles.
    """

    @functools.wraps(apply_fn)
    def apply(variables: Params, *args: Any, adapter_ids: jax.Array, **kwargs: Any) -> Any:
        call = functools.partial(_factored_call, config, adapter_ids=jnp.asarray(adapter_ids))
        with _running(call):
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


@functools.cache
def _factored_class(cls: type) -> type:
    """`cls` (an NNX Linear / LinearGeneral / Einsum / Conv) whose __call__ also adds the
    adapter held beside its kernel: a plain subclass, as Flax's nnx.LoRALinear is one of
    nnx.Linear."""

    def __call__(self, *args: Any, **kwargs: Any) -> jax.Array:
        plan = _plan(self, args, kwargs)
        kernel, a, b = self.kernel[...], self.lora_a[...], self.lora_b[...]
        _checked_rank(self.lora_path, plan, self, kernel, a, b)
        y = cls.__call__(self, *args, **kwargs)
        x = args[0] if args else kwargs["inputs"]
        m, e, bias = (getattr(self, n, None) for n in (LORA_M, LORA_E, "bias"))
        m, e, bias = (None if v is None else v[...] for v in (m, e, bias))
        path, scale = self.lora_path, self.lora_scale
        return _with_adapter(plan, path, self, y, x, kernel, a, b, m, e, bias, scale)

    doc = f"{cls.__name__} computing x·W0 + (α/r)·(x·A)·B without forming W0 + A·B (lj.nnx_adapt)."
    return type(f"LoRA{cls.__name__}", (cls,), {"__call__": __call__, "__doc__": doc})


def nnx_adapt(model: nnx.Module, params: Params, config: LoraConfig) -> nnx.Module:
    """A copy of an NNX `model` holding `params` and computing y = x·W0 + (α/r)·(x·A)·B.

    `params` is the model's pure dict (`nnx.to_pure_dict(nnx.state(model))`, or the State)
    with adapters (`lj.init`, `lj.combine`, `lj.load_adapter`). Each adapted nnx.Linear /
    LinearGeneral / Einsum / Conv holds its factors as `nnx.LoRAParam` beside its kernel, so
    `nnx.to_pure_dict` of the copy's state gives the same tree back, `nnx.Optimizer(...,
    wrt=nnx.LoRAParam)` trains the adapter alone and `nnx.scan` slices stacked adapters with
    their kernels. A module the factored forward cannot run raises, naming its path; `model`
    itself is left unchanged.
    """
    if config.dropout:
        raise ValueError("nnx_adapt: adapter dropout is not supported for NNX models (NNX modules "
                         "carry no dropout rng here); set LoraConfig(dropout=0).")  # fmt: skip
    found = sites(params, config, "nnx_adapt")
    if not found:
        raise ValueError("nnx_adapt: the tree holds no lora_a/lora_b leaves (see lj.init).")
    model = nnx.clone(model)
    flat = traverse_util.flatten_dict(as_dict(params))
    state = nnx.state(model)
    base = {k: v for k, v in flat.items() if k[-1] not in ADAPTER_LEAVES}
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(base))
    nnx.update(model, state)
    modules = _nnx_modules(model)
    for site in found:
        module = modules.get(site.path)
        try:
            if module is None:
                raise ValueError("the model has no module at this path")
            n_in, n_out = _plan(module, (), {}).kind
        except ValueError as err:
            raise ValueError(f"{site.path}: holds a LoRA adapter, but {err}") from None
        if (n_in, n_out) != (site.n_in, site.n_out):
            raise ValueError(
                f"{site.path}: adapter laid out for {site.n_in} input / {site.n_out} output axes, "
                f"but this {type(module).__name__} has {n_in} / {n_out}; give lj.init "
                "layouts=lj.kernel_layouts(model)."
            )
        module.__class__ = _factored_class(type(module))
        module.lora_path, module.lora_scale = site.path, site.scale
        for name in ADAPTER_LEAVES:
            if (*site.keys, name) in flat:
                setattr(module, name, nnx.LoRAParam(flat[(*site.keys, name)]))
    return model
