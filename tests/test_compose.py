"""Adapter composition against numpy float64 references on the full update matrices, and
against peft's add_weighted_adapter (PyTorch peer) for the deterministic methods."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from small_models import CASES, randomize_adapters

import lora_jax as lj
from lora_jax import compose, models
from lora_jax.tree import _adapted, _flatten, path_str

MODEL, MAKE_INPUT = CASES["scan"]  # scanned layers; DenseGeneral and Einsum kernels
X = MAKE_INPUT(jax.random.key(0))
BASE = MODEL.init(jax.random.key(1), X)
LAYOUTS = lj.kernel_layouts(MODEL, X)


def adapter(config, seed):
    params = lj.init(jax.random.key(seed), BASE, config, LAYOUTS)
    return lj.split(randomize_adapters(params, jax.random.key(seed + 100), 0.3), config)[0]


def updates(adapter, config):
    """{path: per-layer (fan_in, fan_out) float64 update s·A·B}, in numpy."""
    out = {}
    for keys, leaves in _adapted(_flatten(adapter)).items():
        a, b = (np.asarray(leaves[n], np.float64) for n in ("lora_a", "lora_b"))
        rank = a.shape[-1]
        s = config.scale_for(path_str(keys), rank)
        out[path_str(keys)] = s * a.reshape(3, -1, rank) @ b.reshape(3, rank, -1)
    return out


TWO = [lj.LoraConfig(rank=2, alpha=4.0, targets=("all-linear",)),
       lj.LoraConfig(rank=3, alpha=5.0, targets=("all-linear",), use_rslora=True)]  # fmt: skip
SAME = [lj.LoraConfig(rank=2, alpha=4.0, targets=("all-linear",)),
        lj.LoraConfig(rank=2, alpha=1.0, targets=("attention",))]  # fmt: skip
WEIGHTS = [0.7, -1.3]


def test_cat_is_the_exact_weighted_sum_and_runs_under_jit():
    adapters = [adapter(c, i) for i, c in enumerate(TWO)]
    got, config = compose.cat(adapters, TWO, WEIGHTS, base=BASE)
    assert config.rank == config.alpha == 5 and not config.use_rslora
    want = [updates(a, c) for a, c in zip(adapters, TWO, strict=True)]
    for path, delta in updates(got, config).items():
        np.testing.assert_allclose(delta, WEIGHTS[0] * want[0][path] + WEIGHTS[1] * want[1][path],
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
    jitted = jax.jit(lambda ads: compose.cat(ads, TWO, WEIGHTS, base=BASE)[0])(adapters)
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.allclose(x, y)), jitted, got))
    # The composed adapter runs like any other: factored forward equals the merged model.
    params = lj.combine(got, BASE)
    factored = lj.lora_apply(MODEL.apply, config)(params, X)
    np.testing.assert_allclose(factored, MODEL.apply(lj.merge(params, config), X), rtol=1e-4,
                               atol=1e-4)  # fmt: skip


def test_svd_is_the_best_rank_r_approximation_and_reports_discarded_energy():
    adapters = [adapter(c, i) for i, c in enumerate(TWO)]
    got, config, discarded = compose.svd(adapters, TWO, WEIGHTS, rank=2, base=BASE)
    want = [updates(a, c) for a, c in zip(adapters, TWO, strict=True)]
    for path, delta in updates(got, config).items():
        total = WEIGHTS[0] * want[0][path] + WEIGHTS[1] * want[1][path]
        u, s, vt = np.linalg.svd(total, full_matrices=False)
        np.testing.assert_allclose(delta, (u[..., :2] * s[..., None, :2]) @ vt[..., :2, :],
                                   rtol=1e-4, atol=1e-5)  # fmt: skip
        energy = s**2
        np.testing.assert_allclose(discarded[path], energy[:, 2:].sum(-1) / energy.sum(-1),
                                   rtol=1e-4, atol=1e-6)  # fmt: skip
    assert max(float(d.max()) for d in discarded.values()) > 0.01  # rank 5 -> 2 loses some
    _, _, none_lost = compose.svd(adapters, TWO, WEIGHTS, rank=5, base=BASE)
    assert max(float(d.max()) for d in none_lost.values()) < 1e-6


def prune_top(x, density):
    """numpy: keep the int(density * size) largest magnitudes of one layer's factor."""
    k = int(density * x.size)
    kept = np.zeros(x.size, bool)
    kept[np.argsort(-np.abs(x).ravel(), kind="stable")[:k]] = True
    return np.where(kept.reshape(x.shape), x, 0)


def reference_factor(method, factors, weights, density):
    """peft's merge of one factor (A or B), per layer, in float64 numpy."""
    layers = []
    for layer in range(factors[0].shape[0]):
        xs = [f[layer] for f in factors]
        if method in ("ties", "magnitude_prune"):
            xs = [prune_top(x, density) for x in xs]
        stacked = np.stack(xs)
        weighted = stacked * weights.reshape(-1, *(1,) * (stacked.ndim - 1))
        if method == "ties":
            agree = np.sign(stacked) == np.where(stacked.sum(0) >= 0, 1, -1)
            layers.append((weighted * agree).sum(0) / np.maximum(agree.sum(0), 1))
        else:
            layers.append(weighted.sum(0))
    return np.stack(layers)


@pytest.mark.parametrize("method", ["linear", "ties", "magnitude_prune"])
def test_factorwise_methods_match_numpy(method):
    adapters = [adapter(c, i) for i, c in enumerate(SAME)]
    kwargs = {} if method == "linear" else {"density": 0.5}
    got, _ = getattr(compose, method)(adapters, SAME, WEIGHTS, **kwargs, base=BASE)
    flat = [_adapted(_flatten(a)) for a in adapters]
    for keys, leaves in _adapted(_flatten(got)).items():
        parts = [(f[keys], c, w) for f, c, w in zip(flat, SAME, WEIGHTS, strict=True) if keys in f]
        scaled = np.array([w * c.scale_for(path_str(keys), 2) for _, c, w in parts])
        for name, weights in (("lora_a", np.sqrt(np.abs(scaled)) * np.sign(scaled)),
                              ("lora_b", np.sqrt(np.abs(scaled)))):  # fmt: skip
            factors = [np.asarray(p[name], np.float64) for p, _, _ in parts]
            want = reference_factor(method, factors, weights, kwargs.get("density", 1.0))
            np.testing.assert_allclose(leaves[name], want, rtol=1e-5, atol=1e-6)
    # attention modules hold both adapters, the MLP only the first: it passes through scaled
    mlp = _adapted(_flatten(got))[("params", "layers", "up_proj")]
    assert mlp["lora_a"].shape == (3, 16, 2)


def test_dare_drops_at_random_and_rescales():
    adapters = [adapter(SAME[0], 0)]
    key = jax.random.key(7)
    got, _ = compose.dare_linear(key, adapters, SAME[:1], [1.0], density=0.25, base=BASE)
    again, _ = compose.dare_linear(key, adapters, SAME[:1], [1.0], density=0.25, base=BASE)
    other, _ = compose.dare_linear(
        jax.random.key(8), adapters, SAME[:1], [1.0], density=0.25, base=BASE
    )
    full, _ = compose.linear(adapters, SAME[:1], [1.0], base=BASE)
    kept = fraction = 0.0
    for keys, leaves in _adapted(_flatten(got)).items():
        for name in ("lora_a", "lora_b"):
            x, ref = np.asarray(leaves[name]), np.asarray(_adapted(_flatten(full))[keys][name])
            nonzero = x != 0
            # every kept entry is the linear merge's divided by the keep probability
            np.testing.assert_allclose(x[nonzero], ref[nonzero] / 0.25, rtol=1e-5)
            kept, fraction = kept + nonzero.sum(), fraction + x.size
    assert 0.2 < kept / fraction < 0.3  # ~1,600 entries, keep probability 0.25
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), got, again))
    assert not jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), got, other))
    dense, _ = compose.dare_ties(key, adapters, SAME[:1], [1.0], density=1.0, base=BASE)
    ties, _ = compose.ties(adapters, SAME[:1], [1.0], density=1.0, base=BASE)
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.allclose(x, y)), dense, ties))


def test_scale_and_negate_are_task_arithmetic():
    a = adapter(TWO[0], 0)
    cancelled, config = compose.cat([a, compose.negate(a)], [TWO[0]] * 2, [1.0, 1.0], base=BASE)
    assert all(np.abs(d).max() < 1e-6 for d in updates(cancelled, config).values())
    for path, delta in updates(compose.scale(a, 2.5), TWO[0]).items():
        np.testing.assert_allclose(delta, 2.5 * updates(a, TWO[0])[path], rtol=1e-5, atol=1e-6)


def test_bad_compositions_are_refused():
    a, b = adapter(TWO[0], 0), adapter(TWO[1], 1)
    with pytest.raises(ValueError, match="same rank; got ranks \\[2, 3\\]"):
        compose.linear([a, b], TWO, WEIGHTS, base=BASE)
    with pytest.raises(ValueError, match="one weight per adapter"):
        compose.cat([a, b], TWO, [1.0], base=BASE)
    with pytest.raises(ValueError, match="pass a PRNG key"):
        compose.dare_linear(None, [a], TWO[:1], [1.0], 0.5, base=BASE)
    with pytest.raises(ValueError, match=r"density is 1\.5"):
        compose.ties([a], TWO[:1], [1.0], density=1.5, base=BASE)
    dora = lj.LoraConfig(rank=2, targets=("all-linear",), use_dora=True)
    with pytest.raises(ValueError, match="DoRA adapters cannot be composed"):
        compose.cat([adapter(dora, 2)], [dora], [1.0], base=BASE)


PEFT_METHODS = {
    "cat": ({}, {}),
    "svd": ({"rank": 3}, {"svd_rank": 3}),
    "linear": ({}, {}),
    "ties": ({"density": 0.6}, {"density": 0.6}),
    "magnitude_prune": ({"density": 0.6}, {"density": 0.6}),
}


@pytest.fixture(scope="module")
def peft_pair(checkpoints, tmp_path_factory):
    """Two peft adapters (random A and B) on the tiny Llama, saved by peft."""
    root = tmp_path_factory.mktemp("pair")
    targets = [["q_proj", "v_proj", "up_proj"], ["q_proj", "v_proj", "down_proj"]]
    for i, (alpha, modules) in enumerate(zip((8, 4), targets, strict=True)):
        torch.manual_seed(i)
        base = peft_base(checkpoints)
        cfg = peft.LoraConfig(r=4, lora_alpha=alpha, target_modules=modules,
                              init_lora_weights=False, task_type="CAUSAL_LM")  # fmt: skip
        model = peft.get_peft_model(base, cfg)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.mul_(10.0)
        model.save_pretrained(root / f"a{i}")
    return root


def peft_base(checkpoints):
    from hf_peer import PEERS

    return PEERS["llama"][1].from_pretrained(checkpoints / "llama").eval()


@pytest.mark.parametrize("method", sorted(PEFT_METHODS))
def test_composition_matches_peft_add_weighted_adapter(checkpoints, peft_pair, method):
    ids = np.random.RandomState(0).randint(3, 96, (2, 7))
    model, params, _ = models.from_pretrained(checkpoints / "llama")
    loaded = [lj.load_adapter(peft_pair / f"a{i}", params) for i in range(2)]
    ours_kwargs, peft_kwargs = PEFT_METHODS[method]
    result = getattr(compose, method)(
        [a for a, _ in loaded], [c for _, c in loaded], WEIGHTS, **ours_kwargs, base=params
    )
    composed, config = result[0], result[1]
    ours = np.asarray(lj.lora_apply(model.apply, config)(lj.combine(composed, params), ids))
    peer = peft.PeftModel.from_pretrained(peft_base(checkpoints), peft_pair / "a0",
                                          adapter_name="a0")  # fmt: skip
    peer.load_adapter(peft_pair / "a1", adapter_name="a1")
    peer.add_weighted_adapter(["a0", "a1"], WEIGHTS, "mix", combination_type=method,
                              **peft_kwargs)  # fmt: skip
    peer.set_adapter("mix")
    with torch.no_grad():
        theirs = peer(input_ids=torch.tensor(ids)).logits.numpy()
    scale = np.abs(theirs).max()
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * scale)
    base = np.asarray(model.apply(params, ids))
    assert np.abs(ours - base).max() > 10 * 1e-4 * scale  # the composition is not a no-op


class TwoInputAxes(nn.Module):
    """A kernel (2, 5, 2) with two input axes: rank-2 factors A (2, 5, 2), B (2, 2) also read
    as one stacked layer of a (5 -> 2) kernel, so only the base says which layout is meant."""

    @nn.compact
    def __call__(self, x):
        return nn.DenseGeneral(2, axis=(-2, -1), name="proj")(x)


def test_layout_comes_from_the_base_where_factor_shapes_read_two_ways():
    model, x = TwoInputAxes(), jax.random.normal(jax.random.key(0), (3, 2, 5))
    base = model.init(jax.random.key(1), x)
    config = lj.LoraConfig(rank=2, alpha=2.0, targets=("proj",))
    layouts = lj.kernel_layouts(model, x)
    adapters = [
        lj.split(randomize_adapters(lj.init(jax.random.key(i), base, config, layouts),
                                    jax.random.key(5 + i), 0.5), config)[0]
        for i in range(2)
    ]  # fmt: skip
    got, cat_config = compose.cat(adapters, [config] * 2, [1.0, -0.5], base=base)
    assert got["params"]["proj"]["lora_b"].shape == (4, 2)  # ranks joined on B's first axis
    want = sum(
        w * np.einsum("ijr,ro->ijo", *(np.asarray(a["params"]["proj"][n], np.float64)
                                       for n in ("lora_a", "lora_b")))
        for w, a in zip([1.0, -0.5], adapters, strict=True)
    )  # fmt: skip
    p = got["params"]["proj"]
    np.testing.assert_allclose(np.einsum("ijr,ro->ijo", p["lora_a"], p["lora_b"]), want,
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    params = lj.combine(got, base)
    np.testing.assert_allclose(lj.lora_apply(model.apply, cat_config)(params, x),
                               model.apply(lj.merge(params, cat_config), x), rtol=1e-5,
                               atol=1e-5)  # fmt: skip
