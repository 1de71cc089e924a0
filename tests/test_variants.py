"""LoRA variants as config switches: rsLoRA, DoRA, LoRA+ (references in numpy and peft)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
from hf_peer import PEERS, peer_logits
from jaxpr_check import materialised
from small_models import CASES, randomize_adapters

import lora_jax as lj
from lora_jax import models


def dense_layer(config, seed=0, scale=0.5):
    layer, x = nn.Dense(6), jax.random.normal(jax.random.key(seed), (4, 5))
    params = lj.init(jax.random.key(1), layer.init(jax.random.key(2), x), config)
    return layer, x, randomize_adapters(params, jax.random.key(3), scale=scale)


def f64(params):
    return {k: np.asarray(v, np.float64) for k, v in params["params"].items()}


def test_rslora_scales_by_alpha_over_sqrt_rank():
    config = lj.LoraConfig(rank=4, alpha=6.0, targets=(".*",), use_rslora=True)
    layer, x, params = dense_layer(config)
    p = f64(params)
    expected = np.asarray(x, np.float64) @ (p["kernel"] + 6.0 / 2.0 * p["lora_a"] @ p["lora_b"])
    np.testing.assert_allclose(lj.lora_apply(layer.apply, config)(params, x),
                               expected + p["bias"], rtol=1e-5, atol=1e-5)  # fmt: skip
    np.testing.assert_allclose(layer.apply(lj.merge(params, config), x), expected + p["bias"],
                               rtol=1e-5, atol=1e-5)  # fmt: skip


DORA = lj.LoraConfig(rank=2, alpha=4.0, targets=("all-linear",), use_dora=True)


def test_dora_matches_float64_reference_and_merge():
    config = lj.LoraConfig(rank=2, alpha=3.0, targets=(".*",), use_dora=True)
    layer, x, params = dense_layer(config)
    params["params"]["lora_magnitude"] = params["params"]["lora_magnitude"] * 1.3
    p = f64(params)
    v = p["kernel"] + 1.5 * p["lora_a"] @ p["lora_b"]
    w = p["lora_magnitude"] * v / np.linalg.norm(v, axis=0)  # norm over inputs, per output
    expected = np.asarray(x, np.float64) @ w + p["bias"]
    np.testing.assert_allclose(lj.lora_apply(layer.apply, config)(params, x), expected,
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    np.testing.assert_allclose(lj.merge(params, config)["params"]["kernel"], w, rtol=1e-5,
                               atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("name", sorted(CASES))
def test_dora_starts_at_the_base_and_factored_equals_merged(name):
    model, make_input = CASES[name]
    x = make_input(jax.random.key(0))
    variables = model.init(jax.random.key(1), x)
    params = lj.init(jax.random.key(2), variables, DORA, lj.kernel_layouts(model, x))
    apply = jax.jit(lj.lora_apply(model.apply, DORA))
    base = jax.jit(model.apply)(variables, x)
    # m = ||W0|| and B = 0: the ratio is 1 up to one float32 ulp (init's norm and the jitted
    # forward's may reduce in a different order), so the output matches to float32 rounding.
    np.testing.assert_allclose(apply(params, x), base, rtol=1e-5, atol=1e-5 * np.abs(base).max())
    params = randomize_adapters(params, jax.random.key(3), scale=0.2)
    got, merged = apply(params, x), model.apply(lj.merge(params, DORA), x)
    np.testing.assert_allclose(got, merged, rtol=1e-5, atol=1e-5 * np.abs(merged).max())
    assert np.abs(got - base).max() > 1e-2


def test_dora_gradients_follow_the_paper_with_the_norm_detached():
    config = lj.LoraConfig(rank=2, alpha=3.0, targets=(".*",), use_dora=True)
    layer, x, params = dense_layer(config)
    adapter, base = lj.split(params, config)
    kernel, bias = base["params"]["kernel"], base["params"]["bias"]

    def reference(adapter):  # the DoRA paper, with the full weight formed explicitly
        a, b, m = (adapter["params"][k] for k in ("lora_a", "lora_b", "lora_magnitude"))
        v = kernel + 1.5 * a @ b
        w = m * v / jax.lax.stop_gradient(jnp.linalg.norm(v, axis=0))
        return jnp.sum(jnp.sin(x @ w + bias))

    def factored(adapter):
        return jnp.sum(jnp.sin(lj.lora_apply(layer.apply, config)(lj.combine(adapter, base), x)))

    for got, want in zip(jax.tree.leaves(jax.grad(factored)(adapter)),
                         jax.tree.leaves(jax.grad(reference)(adapter)), strict=True):  # fmt: skip
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        assert np.abs(got).max() > 0


def test_dora_forward_and_backward_never_form_the_kernel():
    model, make_input = CASES["scan"]
    x = make_input(jax.random.key(0))
    params = lj.init(jax.random.key(2), model.init(jax.random.key(1), x), DORA,
                     lj.kernel_layouts(model, x))  # fmt: skip
    adapter, base = lj.split(params, DORA)
    leaves = lambda name: [v for p, v in jax.tree_util.tree_leaves_with_path(adapter)  # noqa: E731
                           if name in jax.tree_util.keystr(p)]  # fmt: skip
    shapes = set()
    for layer in jax.tree.leaves(base, is_leaf=lambda t: isinstance(t, dict) and "kernel" in t):
        if isinstance(layer, dict):
            shapes |= {layer["kernel"].shape, layer["kernel"].shape[1:]}
    apply = lj.lora_apply(model.apply, DORA)
    forward = lambda a, b, x: apply(lj.combine(a, b), x)  # noqa: E731
    backward = jax.grad(lambda a, b, x: jnp.sum(forward(a, b, x)))
    tagged = (leaves("lora_a"), leaves("lora_b"), [x])
    assert materialised(forward, (adapter, base, x), *tagged, shapes) == []
    assert materialised(backward, (adapter, base, x), *tagged, shapes) == []


def test_dora_unmerge_is_refused():
    config = lj.LoraConfig(rank=2, targets=(".*",), use_dora=True)
    _, _, params = dense_layer(config)
    with pytest.raises(ValueError, match="DoRA adapter; its merge rescaled"):
        lj.unmerge(lj.merge(params, config), lj.split(params, config)[0], config)


def test_lora_plus_scales_b_updates_by_the_ratio():
    config = lj.LoraConfig(rank=2, targets=(".*",))
    layer, x, params = dense_layer(config)
    grads = jax.grad(lambda p: jnp.sum(lj.lora_apply(layer.apply, config)(p, x) ** 2))(params)

    def one_step(tx):
        return tx.update(grads, tx.init(params), params)[0]

    plain = one_step(lj.optimizer(optax.sgd(0.1), params, config))
    plus = one_step(lj.optimizer(optax.sgd(0.1), params, config, lr_ratio=16.0))
    for name in ("lora_a", "lora_b"):
        np.testing.assert_allclose(plus["params"][name],
                                   (16.0 if name == "lora_b" else 1.0) * plain["params"][name],
                                   rtol=1e-6)  # fmt: skip
        assert np.abs(plain["params"][name]).max() > 0
    assert not np.any(plus["params"]["kernel"])  # frozen stays frozen
    with pytest.raises(ValueError, match="lr_ratio is 0"):
        lj.optimizer(optax.sgd(0.1), params, config, lr_ratio=0)


IDS = np.random.RandomState(0).randint(3, 96, (2, 7))


def test_rslora_dora_adapter_round_trips_with_peft(checkpoints, tmp_path):
    directory = checkpoints / "llama"
    model, params, hf_config = models.from_pretrained(directory)
    config = lj.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"),
                           use_rslora=True, use_dora=True)  # fmt: skip
    adapted = lj.init(jax.random.key(0), params, config, lj.kernel_layouts(model, jnp.asarray(IDS)))
    adapted = randomize_adapters(adapted, jax.random.key(1), scale=0.3)
    ours = np.asarray(lj.lora_apply(model.apply, config)(adapted, jnp.asarray(IDS)))
    with pytest.warns(UserWarning, match="vLLM does not serve DoRA"):
        lj.save_adapter(
            tmp_path / "ours", lj.split(adapted, config)[0], config, hf_config=hf_config
        )
    peer = PEERS["llama"][1].from_pretrained(directory).eval()
    theirs = peer_logits(peft.PeftModel.from_pretrained(peer, tmp_path / "ours").eval(), IDS)
    scale = np.abs(theirs).max()
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * scale)
    assert np.abs(ours - np.asarray(model.apply(params, jnp.asarray(IDS)))).max() > 1e-3 * scale

    # And the other way: a DoRA + rsLoRA adapter made by peft loads here with equal logits.
    torch.manual_seed(2)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "up_proj"],
                          use_dora=True, use_rslora=True, init_lora_weights=False)  # fmt: skip
    peer = peft.get_peft_model(PEERS["llama"][1].from_pretrained(directory), cfg).eval()
    peer.save_pretrained(tmp_path / "theirs")
    adapter, loaded = lj.load_adapter(tmp_path / "theirs", params)
    assert loaded.use_dora and loaded.use_rslora
    ours = lj.lora_apply(model.apply, loaded)(lj.combine(adapter, params), jnp.asarray(IDS))
    theirs = peer_logits(peer, IDS)
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4 * np.abs(theirs).max())


@pytest.mark.parametrize("kind", ["pissa", "olora"])
def test_principal_inits_match_numpy_svd_and_qr(kind):
    layer, x = nn.Dense(6, use_bias=False), jax.random.normal(jax.random.key(0), (4, 8))
    variables = layer.init(jax.random.key(1), x)
    config = lj.LoraConfig(rank=3, alpha=6.0, targets=(".*",), init=kind)
    params = lj.init(jax.random.key(2), variables, config)
    w0 = np.asarray(variables["params"]["kernel"], np.float64)
    p = f64(params)
    taken = 2.0 * p["lora_a"] @ p["lora_b"]  # s·A·B, s = 6/3
    if kind == "pissa":  # the top-3 singular directions of W0
        u, s, vt = np.linalg.svd(w0, full_matrices=False)
        expected = (u[:, :3] * s[:3]) @ vt[:3]
    else:  # peft's OLoRA: QR of the (out, in) weight, s·Q_r·R_r
        q, r = np.linalg.qr(w0.T)
        expected = 2.0 * (q[:, :3] @ r[:3]).T
    np.testing.assert_allclose(taken, expected, atol=1e-5)
    np.testing.assert_allclose(p["kernel"], w0 - expected, atol=1e-5)  # the residual base
    np.testing.assert_allclose(lj.lora_apply(layer.apply, config)(params, x),
                               layer.apply(variables, x), atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("kind", ["pissa", "olora"])
def test_principal_inits_keep_the_output_and_merge_to_the_original_plus_update(kind):
    model, make_input = CASES["scan"]
    x = make_input(jax.random.key(0))
    variables = model.init(jax.random.key(1), x)
    config = lj.LoraConfig(rank=2, alpha=4.0, targets=("all-linear",), init=kind)
    params = lj.init(jax.random.key(2), variables, config, lj.kernel_layouts(model, x))
    base = jax.jit(model.apply)(variables, x)
    got = jax.jit(lj.lora_apply(model.apply, config))(params, x)
    np.testing.assert_allclose(got, base, atol=1e-5 * np.abs(base).max())  # float32 rounding
    first = params["params"]["layers"]["up_proj"]
    trained = randomize_adapters(params, jax.random.key(3), scale=0.2)
    now = trained["params"]["layers"]["up_proj"]
    update = (np.einsum("lir,lro->lio", now["lora_a"], now["lora_b"])
              - np.einsum("lir,lro->lio", first["lora_a"], first["lora_b"]))  # fmt: skip
    expected = np.asarray(variables["params"]["layers"]["up_proj"]["kernel"]) + 2.0 * update
    merged = lj.merge(trained, config)["params"]["layers"]["up_proj"]["kernel"]
    np.testing.assert_allclose(merged, expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["pissa", "olora"])
def test_principal_init_adapters_convert_for_peft(checkpoints, tmp_path, kind):
    directory = checkpoints / "llama"
    model, params, hf_config = models.from_pretrained(directory)
    config = lj.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "up_proj"),
                           init=kind, rank_pattern={"v_proj": 2})  # fmt: skip
    start = lj.init(jax.random.key(0), params, config, lj.kernel_layouts(model, jnp.asarray(IDS)))
    trained = randomize_adapters(start, jax.random.key(1), scale=0.1)  # stands in for training
    ours = np.asarray(lj.lora_apply(model.apply, config)(trained, jnp.asarray(IDS)))
    with pytest.warns(UserWarning, match="fits only that residual base"):
        lj.save_adapter(tmp_path / "raw", lj.split(trained, config)[0], config, hf_config=hf_config)
    lj.save_adapter(tmp_path / "converted", lj.split(trained, config)[0], config,
                    hf_config=hf_config, initial_adapter=lj.split(start, config)[0])  # fmt: skip
    # peft loads the converted (rank 2r) adapter onto the ORIGINAL checkpoint.
    peer = PEERS["llama"][1].from_pretrained(directory).eval()
    theirs = peer_logits(peft.PeftModel.from_pretrained(peer, tmp_path / "converted").eval(), IDS)
    scale = np.abs(theirs).max()
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * scale)
    assert np.abs(ours - np.asarray(model.apply(params, jnp.asarray(IDS)))).max() > 1e-3 * scale
