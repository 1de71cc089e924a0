"""Finds LoRA weight materialisation in a jaxpr: a kernel-shaped value computed from A and B
without the activations (W0 + A·B built as a weight, which the factored forward must avoid)."""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.extend import core as jex_core

import lora_jax as lj

A, B, X = "A", "B", "X"


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        for item in value if isinstance(value, tuple | list) else (value,):
            if isinstance(item, jex_core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jex_core.Jaxpr):
                yield item


def _align_end(values: list, n: int, empty=frozenset()) -> list:
    # scan / pjit / remat pass operands one to one; cond and while drop leading operands (the
    # branch index, the other half's consts), so sub-jaxpr operands line up from the end.
    return [empty] * max(n - len(values), 0) + values[max(len(values) - n, 0) :]


def _walk(jaxpr, taint_in, shapes, found):
    env = dict(zip(jaxpr.invars, taint_in, strict=True))
    read = lambda v: frozenset() if isinstance(v, jex_core.Literal) else env.get(v, frozenset())  # noqa: E731
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        outs = [frozenset().union(*ins)] * len(eqn.outvars)
        subs = list(_sub_jaxprs(eqn))
        if subs:
            outs = [frozenset()] * len(eqn.outvars)
            for sub in subs:
                inner = _walk(sub, _align_end(ins, len(sub.invars)), shapes, found)
                outs = [o | t for o, t in zip(outs, _align_end(inner, len(outs)), strict=True)]
        for var, taint in zip(eqn.outvars, outs, strict=True):
            env[var] = taint
            shape = tuple(getattr(var.aval, "shape", ()))
            if A in taint and B in taint and X not in taint and shape in shapes:
                found.append((eqn.primitive.name, shape))
    return [read(v) for v in jaxpr.outvars]


def materialised(fn, args, a_leaves: Iterable, b_leaves: Iterable, x_leaves: Iterable, shapes):
    """(primitive, shape) of every kernel-shaped value `fn(*args)` builds from A and B alone.

    `a_leaves`, `b_leaves` and `x_leaves` name, by identity, which flattened inputs are the
    adapters' A and B factors and the activations.
    """
    closed = jax.make_jaxpr(fn)(*args)
    ids = {A: {id(v) for v in a_leaves}, B: {id(v) for v in b_leaves}, X: {id(v) for v in x_leaves}}
    leaves = jax.tree.leaves(args)
    taint = [frozenset(k for k, s in ids.items() if id(leaf) in s) for leaf in leaves]
    found: list = []
    _walk(closed.jaxpr, taint, {tuple(s) for s in shapes}, found)
    return found


def kernel_shapes(params):
    """Each adapted kernel's shape, per layer and flattened to (fan_in, fan_out)."""
    shapes, flat = set(), traverse_util.flatten_dict(params)
    for keys, leaf in flat.items():
        if keys[-1] != "lora_a":
            continue
        w, b = flat[(*keys[:-1], "kernel")], flat[(*keys[:-1], "lora_b")]
        lead, n_in, *_ = lj.adapter_layout("", w.shape, leaf.shape, b.shape)
        for drop in range(lead + 1):  # stacked, and per layer inside the scan
            shape, k = w.shape[drop:], lead - drop
            matrix = (int(np.prod(shape[k : k + n_in])), int(np.prod(shape[k + n_in :])))
            shapes |= {shape, shape[:k] + matrix, matrix}
    return shapes


def leaves_named(tree, name):
    return [
        v for p, v in jax.tree_util.tree_leaves_with_path(tree) if name in jax.tree_util.keystr(p)
    ]


def factored_like_merged(factored, merged, args, a_leaves, b_leaves, x_leaves, shapes):
    """Asserts that `factored(adapter, ...)` and the gradient of its mean square w.r.t. the
    adapter build no kernel-shaped product from A and B, that `merged` does (so the check can
    fail), and that both give the same, non-zero gradients; returns the factored ones."""

    def loss(fn):
        return lambda *a: jnp.mean(fn(*a) ** 2)

    ab = (a_leaves, b_leaves, x_leaves)
    assert materialised(factored, args, *ab, shapes) == []
    assert materialised(jax.grad(loss(factored)), args, *ab, shapes) == []
    assert materialised(merged, args, *ab, shapes)
    g_f = jax.jit(jax.grad(loss(factored)))(*args)
    g_m = jax.jit(jax.grad(loss(merged)))(*args)
    for f, m in zip(jax.tree.leaves(g_f), jax.tree.leaves(g_m), strict=True):
        np.testing.assert_allclose(f, m, rtol=1e-4, atol=1e-5 * np.abs(m).max())
    assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(g_f))
    return g_f


def mapped_operands(jaxpr) -> set[tuple[tuple[int, ...], str]]:
    """(shape, in_spec) of each operand every shard_map body in `jaxpr` (a ClosedJaxpr;
    nested ones too) receives: the shape as one device holds it, the spec as written."""
    found = set()

    def walk(inner):
        for eqn in inner.eqns:
            if eqn.primitive.name == "shard_map":
                body, specs = eqn.params["jaxpr"].invars, eqn.params["in_specs"]
                found.update((v.aval.shape, str(s)) for v, s in zip(body, specs, strict=True))
            for sub in _sub_jaxprs(eqn):
                walk(sub)

    walk(jaxpr.jaxpr)
    return found
