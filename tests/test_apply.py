"""The factored forward: equals the merged model, starts at the base, never forms A·B."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jaxpr_check import kernel_shapes, leaves_named, materialised
from small_models import CASES, D, Stack, randomize_adapters, tokens

import lora_jax as lj

CONFIG = lj.LoraConfig(rank=4, alpha=8.0, targets=("all-linear",))


def setup(name, config=CONFIG, seed=0):
    model, make_input = CASES[name]
    key = jax.random.key(seed)
    x = make_input(jax.random.fold_in(key, 1))
    variables = model.init(jax.random.fold_in(key, 2), x)
    layouts = lj.kernel_layouts(model, x)
    params = lj.init(jax.random.fold_in(key, 3), variables, config, layouts)
    return model, x, variables, params


@pytest.mark.parametrize("name", sorted(CASES))
def test_factored_forward_equals_merged_model(name):
    model, x, _, params = setup(name)
    params = randomize_adapters(params, jax.random.key(5))
    factored = jax.jit(lj.lora_apply(model.apply, CONFIG))(params, x)
    merged = model.apply(lj.merge(params, CONFIG), x)
    base = model.apply(lj.split(params, CONFIG)[1], x)
    # float32: both paths sum the same terms in a different order (~1e-6 relative).
    np.testing.assert_allclose(factored, merged, rtol=1e-5, atol=1e-5 * np.abs(merged).max())
    assert np.abs(factored - base).max() > 1e-2  # the adapter really contributes


@pytest.mark.parametrize("name", sorted(CASES))
def test_output_at_init_equals_base_exactly(name):
    model, x, variables, params = setup(name)
    np.testing.assert_array_equal(
        jax.jit(lj.lora_apply(model.apply, CONFIG))(params, x), jax.jit(model.apply)(variables, x)
    )


@pytest.mark.parametrize(
    ("module", "x_shape", "n_in"),
    [
        (nn.Dense(6), (3, 5), 1),
        (nn.DenseGeneral((2, 3), axis=-1), (3, 5), 1),
        (nn.DenseGeneral(6, axis=(-2, -1)), (3, 2, 5), 2),
        (nn.Einsum((5, 2, 3), "bd,dhk->bhk"), (3, 5), 1),
    ],
    ids=["dense", "dense_general_out", "dense_general_in", "einsum"],
)
def test_single_layer_matches_float64_reference(module, x_shape, n_in):
    x = jax.random.normal(jax.random.key(0), x_shape)
    variables = module.init(jax.random.key(1), x)
    config = lj.LoraConfig(rank=2, alpha=3.0, targets=(".*",))
    params = lj.init(jax.random.key(2), variables, config, lj.kernel_layouts(module, x))
    params = randomize_adapters(params, jax.random.key(3), scale=0.5)
    p = {k: np.asarray(v, np.float64) for k, v in params["params"].items()}
    update = np.tensordot(p["lora_a"], p["lora_b"], axes=1)
    lead = x.ndim - n_in
    expected = np.tensordot(np.asarray(x, np.float64), p["kernel"] + 1.5 * update, axes=n_in)
    expected = expected + p["bias"] if "bias" in p else expected
    got = lj.lora_apply(module.apply, config)(params, x)
    assert got.shape == expected.shape and lead >= 1
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def adapter_loss(apply_fn, config, base, x):
    def loss(adapter):
        return jnp.mean(apply_fn(lj.combine(adapter, base), x) ** 2)

    return loss


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_match_merged_path(name):
    model, x, _, params = setup(name)
    adapter, base = lj.split(randomize_adapters(params, jax.random.key(5)), CONFIG)
    factored = jax.grad(adapter_loss(lj.lora_apply(model.apply, CONFIG), CONFIG, base, x))
    merged = jax.grad(adapter_loss(lj.merged_apply(model.apply, CONFIG), CONFIG, base, x))
    g_f, g_m = jax.jit(factored)(adapter), jax.jit(merged)(adapter)
    for f, m in zip(jax.tree.leaves(g_f), jax.tree.leaves(g_m), strict=True):
        np.testing.assert_allclose(f, m, rtol=1e-4, atol=1e-5 * np.abs(m).max())
    assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(g_f))


@pytest.mark.parametrize("name", sorted(CASES))
def test_no_weight_sized_product_of_a_and_b(name):
    model, x, _, params = setup(name)
    adapter, base = lj.split(params, CONFIG)
    args = (adapter, base, x)
    ab = (leaves_named(adapter, "lora_a"), leaves_named(adapter, "lora_b"), [x])
    shapes = kernel_shapes(params)

    def forward(apply_fn):
        return lambda adapter, base, x: apply_fn(lj.combine(adapter, base), x)

    def backward(apply_fn):
        return jax.grad(lambda adapter, base, x: jnp.sum(forward(apply_fn)(adapter, base, x)))

    factored = lj.lora_apply(model.apply, CONFIG)
    assert materialised(forward(factored), args, *ab, shapes) == []
    assert materialised(backward(factored), args, *ab, shapes) == []
    # The check can fail: merge-on-the-fly builds W0 + A·B, and it is caught.
    assert materialised(forward(lj.merged_apply(model.apply, CONFIG)), args, *ab, shapes)


def test_dropout_applies_to_adapter_input_only_with_rng():
    config = lj.LoraConfig(rank=4, targets=("all-linear",), dropout=0.5)
    model, x, variables, params = setup("scan", config)
    run = jax.jit(lj.lora_apply(model.apply, config))
    rngs = {"dropout": jax.random.key(9)}
    base = jax.jit(model.apply)(variables, x)
    # B = 0: dropout on the adapter input cannot change the output, rng or not.
    np.testing.assert_array_equal(run(params, x, rngs=rngs), base)
    params = randomize_adapters(params, jax.random.key(5))
    train_a, train_b = (
        run(params, x, rngs=rngs),
        run(params, x, rngs={"dropout": jax.random.key(8)}),
    )
    eval_1, eval_2 = run(params, x), run(params, x)
    np.testing.assert_array_equal(eval_1, eval_2)  # no rng: deterministic
    np.testing.assert_allclose(
        eval_1,
        model.apply(lj.merge(params, config), x),
        rtol=1e-5,
        atol=1e-5 * np.abs(eval_1).max(),
    )
    assert np.abs(train_a - eval_1).max() > 1e-3 and np.abs(train_a - train_b).max() > 1e-3


def test_bfloat16_compute_with_float32_adapter():
    model, x = Stack(dtype=jnp.bfloat16), tokens(jax.random.key(0))
    variables = model.init(jax.random.key(1), x)
    params = lj.init(jax.random.key(2), variables, CONFIG, lj.kernel_layouts(model, x))
    params = randomize_adapters(params, jax.random.key(3))
    assert {v.dtype for v in leaves_named(params, "lora_")} == {jnp.dtype(jnp.float32)}
    out = jax.jit(lj.lora_apply(model.apply, CONFIG))(params, x)
    ref = Stack().apply(lj.merge(params, CONFIG), x)  # float32 compute
    assert out.dtype == jnp.bfloat16
    # bf16 activations through 3 blocks: a few bf16 roundings (2^-8 each) per value on average;
    # a rare token whose RMSNorm input is small can deviate more, hence the looser max bound.
    err = np.abs(np.asarray(out, np.float32) - ref)
    assert err.mean() <= 0.02 * np.abs(ref).mean() and err.max() <= 0.3 * np.abs(ref).max()


def test_unsupported_module_with_adapter_fails_loudly():
    conv = nn.ConvTranspose(4, (3,))
    x = jnp.ones((1, 6, 2))
    variables = conv.init(jax.random.key(0), x)
    config = lj.LoraConfig(rank=1, targets=(".*",))
    params = lj.init(jax.random.key(1), variables, config, {"": (2, 1)})
    with pytest.raises(ValueError, match="ConvTranspose is not one of Dense, DenseGeneral, Ein"):
        lj.lora_apply(conv.apply, config)(params, x)


def test_einsum_with_kernel_axes_out_of_order_is_refused():
    module, x = nn.Einsum((3, 5), "bd,fd->bf"), jnp.ones((2, 5))
    layouts = lj.kernel_layouts(module, x)
    assert "ordered input (contracted) then output" in layouts[""]
    variables = module.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="cannot be adapted"):
        lj.init(jax.random.key(1), variables, lj.LoraConfig(rank=1, targets=(".*",)), layouts)


def test_kernel_layouts_reads_every_kernel_without_computing():
    model, make_input = CASES["scan"]
    layouts = lj.kernel_layouts(model, make_input(jax.random.key(0)))
    assert layouts == {
        "layers/attn/q_proj": (1, 2),
        "layers/attn/k_proj": (1, 2),
        "layers/attn/v_proj": (1, 2),
        "layers/attn/o_proj": (2, 1),
        "layers/gate_proj": (1, 1),
        "layers/up_proj": (1, 1),
        "layers/down_proj": (1, 1),
        "lm_head": (1, 1),
    }


def test_merged_apply_serves_plain_jax_functions():
    def mlp(params, x):
        return jnp.tanh(x @ params["hidden"]["kernel"]) @ params["out"]["kernel"]

    key = jax.random.key(0)
    params = {
        "hidden": {"kernel": jax.random.normal(key, (D, 8))},
        "out": {"kernel": jax.random.normal(jax.random.fold_in(key, 1), (8, 3))},
    }
    config = lj.LoraConfig(rank=2, alpha=4.0, targets=("hidden",))
    adapted = randomize_adapters(lj.init(key, params, config), jax.random.key(4), scale=0.5)
    x = jax.random.normal(jax.random.key(2), (4, D))
    h = adapted["hidden"]
    expected = (
        jnp.tanh(x @ h["kernel"] + 2.0 * (x @ h["lora_a"]) @ h["lora_b"]) @ params["out"]["kernel"]
    )
    got = jax.jit(lj.merged_apply(mlp, config))(adapted, x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_merged_apply_serves_nnx_models():
    model = nnx.Sequential(nnx.Linear(D, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 3, rngs=nnx.Rngs(1)))
    graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)
    config = lj.LoraConfig(rank=2, targets=("layers/0",))
    adapted = randomize_adapters(lj.init(jax.random.key(0), pure, config), jax.random.key(1))

    def forward(params, x):
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(graphdef, state)(x)

    x = jax.random.normal(jax.random.key(2), (4, D))
    first = adapted["layers"][0]
    scale = config.alpha / config.rank
    hidden = x @ (first["kernel"] + scale * first["lora_a"] @ first["lora_b"]) + first["bias"]
    last = adapted["layers"][1]
    expected = hidden @ last["kernel"] + last["bias"]
    got = lj.merged_apply(forward, config)(adapted, x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_lora_apply_trains_under_jit_with_optax():
    model, x, _, params = setup("scan")
    adapter, base = lj.split(params, CONFIG)
    tx = optax.adam(1e-2)
    loss_fn = adapter_loss(lj.lora_apply(model.apply, CONFIG), CONFIG, base, x)

    @jax.jit
    def step(adapter, state):
        loss, grads = jax.value_and_grad(loss_fn)(adapter)
        updates, state = tx.update(grads, state, adapter)
        return optax.apply_updates(adapter, updates), state, loss

    state, losses = tx.init(adapter), []
    for _ in range(5):
        adapter, state, loss = step(adapter, state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    ("x_shape", "axis"),
    [((2, 5, 6), (-1,)), ((2, 3, 4), (1, 2)), ((2, 3, 4), (-1, -2)), ((4, 3, 2), (0,))],
    ids=["dense", "two_in_axes", "two_in_axes_reversed", "leading_axis"],
)
def test_low_rank_backward_equals_autodiff(x_shape, axis):
    # The adapter's hand-written backward (thin products laid out for XLA) against JAX's own
    # derivative of the same contraction, for every way a DenseGeneral names its input axes.
    from lora_jax.apply import _contract

    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], x_shape)
    a = jax.random.normal(keys[1], (*(x_shape[ax] for ax in axis), 3))
    b = jax.random.normal(keys[2], (3, 2, 5))
    kept = [i for i in range(x.ndim) if i not in [ax % x.ndim for ax in axis]]
    w = jax.random.normal(keys[3], (*(x_shape[i] for i in kept), 2, 5))

    def reference(x, a, b):
        h = jnp.tensordot(x, a, axes=([ax % x.ndim for ax in axis], list(range(len(axis)))))
        return jnp.sum(jnp.tensordot(h, b, axes=1) * w)

    ours = jax.grad(lambda x, a, b: jnp.sum(_contract(x, a, b, None, axis) * w), (0, 1, 2))
    for got, want in zip(ours(x, a, b), jax.grad(reference, (0, 1, 2))(x, a, b), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_low_rank_backward_keeps_the_activation_off_the_left_of_its_dot():
    # dA = xᵀ·(g·Bᵀ) is computed as (r, in) and transposed after: XLA folds a transpose of a
    # dot's output into the dot by swapping its operands, and XLA's CPU dot then contracts
    # the activation over its leading (token) axes, about 8x slower (bench/RESULTS.md).
    from lora_jax.apply import _contract

    x, a, b = jnp.ones((2, 64, 96)), jnp.ones((96, 4)), jnp.ones((4, 80))
    grad = jax.jit(jax.grad(lambda x, a, b: jnp.sum(_contract(x, a, b, None, (2,))), (0, 1, 2)))
    dots = [line for line in grad.lower(x, a, b).compile().as_text().splitlines()
            if " dot(" in line]  # fmt: skip
    assert any("f32[4,96]" in line.split("=")[1] for line in dots), dots
    assert not any("f32[96,4]" in line.split("=")[1] for line in dots), dots
