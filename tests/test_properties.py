"""Property-based tests: random layer kinds, shapes, ranks and target sets."""

import flax.linen as nn
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from small_models import randomize_adapters

import lora_jax as lj


class Chain(nn.Module):
    """Layers by spec: ("dense", n), ("heads", h, k) then ("join", n), ("einsum", n)."""

    specs: tuple

    @nn.compact
    def __call__(self, x):
        for i, (kind, *dims) in enumerate(self.specs):
            name = f"l{i}"
            if kind == "dense":
                x = nn.Dense(dims[0], name=name)(x)
            elif kind == "heads":
                x = nn.DenseGeneral(tuple(dims), name=name)(x)
            elif kind == "join":
                x = nn.DenseGeneral(dims[0], axis=(-2, -1), name=name)(x)
            else:
                x = nn.Einsum((x.shape[-1], dims[0]), "bd,dn->bn", name=name)(x)
            x = jnp.tanh(x)
        return x


size = st.integers(2, 7)
layer = st.one_of(
    st.tuples(st.just("dense"), size),
    st.tuples(st.just("einsum"), size),
    st.tuples(size, size, size).map(lambda d: (("heads", d[0], d[1]), ("join", d[2]))),
)


@st.composite
def chains(draw):
    specs = []
    for item in draw(st.lists(layer, min_size=1, max_size=4)):
        specs.extend(item if isinstance(item[0], tuple) else (item,))
    chosen = draw(st.lists(st.sampled_from(range(len(specs))), min_size=1, unique=True))
    targets = tuple(f"l{i}$" for i in chosen)
    return tuple(specs), targets, draw(st.integers(1, 4)), draw(st.sampled_from([1.0, 4.0, 16.0]))


def build(specs, targets, rank, alpha, d_in):
    model, x = Chain(specs), jax.random.normal(jax.random.key(0), (3, d_in))
    variables = model.init(jax.random.key(1), x)
    # Every kernel's first and last axes are one input and one output axis, so the smallest of
    # those bounds min(fan_in, fan_out) from below: a rank that fits every kernel.
    smallest = min(
        min(v["kernel"].shape[0], v["kernel"].shape[-1]) for v in variables["params"].values()
    )
    config = lj.LoraConfig(rank=min(rank, int(smallest)), alpha=alpha, targets=targets)
    layouts = lj.kernel_layouts(model, x)
    return model, x, variables, config, layouts


@given(chains(), st.integers(2, 6))
def test_factored_equals_merged_and_init_is_exact(chain, d_in):
    specs, targets, rank, alpha = chain
    model, x, variables, config, layouts = build(specs, targets, rank, alpha, d_in)
    params = lj.init(jax.random.key(2), variables, config, layouts)
    apply = jax.jit(lj.lora_apply(model.apply, config))
    np.testing.assert_array_equal(apply(params, x), jax.jit(model.apply)(variables, x))
    # B = 0, so merging at init gives back the base kernels bit for bit.
    for got, base in zip(
        jax.tree.leaves(lj.merge(params, config)), jax.tree.leaves(variables), strict=True
    ):
        np.testing.assert_array_equal(got, base)
    params = randomize_adapters(params, jax.random.key(3), scale=0.3)
    np.testing.assert_allclose(
        apply(params, x), model.apply(lj.merge(params, config), x), rtol=1e-5, atol=1e-5
    )


@given(chains(), st.integers(2, 6), st.integers(1, 3))
def test_tree_round_trips(chain, d_in, layers):
    specs, targets, rank, alpha = chain
    _, _, variables, config, layouts = build(specs, targets, rank, alpha, d_in)
    # Stack the params along a leading layer axis, as nn.scan would.
    stacked = jax.tree.map(lambda v: jnp.stack([v * (i + 1) for i in range(layers)]), variables)
    params = lj.init(jax.random.key(2), stacked, config, layouts)
    params = randomize_adapters(params, jax.random.key(3), scale=0.3)
    adapter, base = lj.split(params, config)
    assert jax.tree.leaves(lj.combine(adapter, base)) == jax.tree.leaves(params)
    assert jax.tree.structure(lj.combine(adapter, base)) == jax.tree.structure(params)
    labels = jax.tree.leaves(lj.partition(params, config))
    assert (
        labels.count("lora")
        == len(jax.tree.leaves(adapter))
        == 2 * len(lj.targets(stacked, config))
    )
    merged = lj.merge(params, config)
    assert jax.tree.structure(merged) == jax.tree.structure(stacked)
    for name, module in params["params"].items():
        if "lora_a" not in module:
            assert merged["params"][name]["kernel"] is module["kernel"]
            continue
        a, b = (np.asarray(module[k], np.float64) for k in ("lora_a", "lora_b"))
        w = np.asarray(module["kernel"], np.float64)
        update = np.stack([np.tensordot(a[i], b[i], axes=1) for i in range(layers)])
        expected = w + config.alpha / a.shape[-1] * update
        np.testing.assert_allclose(merged["params"][name]["kernel"], expected, rtol=1e-5, atol=1e-6)
    restored = lj.unmerge(merged, adapter, config)
    for got, w0 in zip(jax.tree.leaves(restored), jax.tree.leaves(stacked), strict=True):
        np.testing.assert_allclose(got, w0, rtol=1e-5, atol=1e-5)
    trainable = sum(v.size for v in jax.tree.leaves(adapter))
    assert f"trainable params: {trainable:,}" in lj.summary(params, config)
