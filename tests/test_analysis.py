"""lora_jax.analysis against numpy float64 references and constructed cases with known answers,
and `lora-jax inspect` on adapters saved by peft and by lora_jax (scanned Llama)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from hf_peer import PEERS
from matplotlib.image import imread
from small_models import CASES, randomize_adapters

import lora_jax as lj
from lora_jax import analysis, cli, inspection, models
from lora_jax.io import read_adapter

RTOL = 1e-5  # the bound; both sides compute in float64, so agreement is far closer


def adapted(case, rank, key, targets=("all-linear",)):
    """A small model's params with a random non-zero adapter of this rank on every kernel."""
    model, make_input = CASES[case]
    x = make_input(jax.random.key(0))
    params = model.init(jax.random.key(1), x)
    config = lj.LoraConfig(rank=rank, alpha=2.0 * rank + 1, targets=targets)
    params = lj.init(jax.random.key(2), params, config, lj.kernel_layouts(model, x))
    return randomize_adapters(params, jax.random.key(key), scale=0.5), config


def per_layer(site):
    """float64 (layers, in, r), (layers, r, out), (layers, in, out), reshaped independently."""
    lead, n_in = site.lead, site.n_in
    layers = int(np.prod(site.kernel.shape[:lead]))
    fan_in = int(np.prod(site.kernel.shape[lead : lead + n_in]))
    as64 = lambda x, rows: np.asarray(x, np.float64).reshape(layers, rows, -1)  # noqa: E731
    return as64(site.lora_a, fan_in), as64(site.lora_b, site.rank), as64(site.kernel, fan_in)


@pytest.mark.parametrize("case", ["dense", "dense_general_and_einsum", "scan"])
def test_spectrum_and_amplification_equal_the_dense_reference(case):
    params, config = adapted(case, rank=3, key=5)
    spectra, amp = analysis.spectrum(params, config), analysis.amplification(params, config)
    assert set(spectra) == set(amp) == {s.path for s in lj.sites(params)}
    for site in lj.sites(params):
        s = config.scale_for(site.path, site.rank)
        for layer, (a, b, w) in enumerate(zip(*per_layer(site), strict=True)):
            delta = s * a @ b  # the (in, out) update, formed here only
            u, sigma, vt = np.linalg.svd(delta)
            np.testing.assert_allclose(spectra[site.path][layer], sigma[:3], rtol=RTOL)
            w_sigma = np.linalg.svd(w, compute_uv=False)
            got = amp[site.path]
            np.testing.assert_allclose(got.delta_norm[layer], np.linalg.norm(delta), rtol=RTOL)
            np.testing.assert_allclose(got.w_norm[layer], np.linalg.norm(w), rtol=RTOL)
            on_delta = np.linalg.norm(u[:, :3].T @ w @ vt[:3].T)
            np.testing.assert_allclose(got.on_delta[layer], on_delta, rtol=RTOL)
            np.testing.assert_allclose(got.on_w[layer], np.linalg.norm(w_sigma[:3]), rtol=RTOL)
            # W's own top directions maximise ‖UᵀWV‖_F over k-dimensional U, V.
            assert got.on_random[layer] <= got.on_w[layer] + 1e-12
            assert got.on_delta[layer] <= got.on_w[layer] + 1e-12
            energy = np.cumsum(sigma**2) / np.sum(sigma**2)
            np.testing.assert_allclose(analysis.energy(sigma[:3], 2), energy[1], rtol=RTOL)


@pytest.mark.parametrize("of", ["a", "delta"])
def test_subspace_similarity_equals_the_direct_formula(of):
    first, _ = adapted("scan", rank=4, key=6)
    second, _ = adapted("scan", rank=2, key=7)
    phi = analysis.subspace_similarity(first, second, of=of)
    sites2 = {s.path: s for s in lj.sites(second)}
    for site in lj.sites(first):
        (a1, b1, _), (a2, b2, _) = per_layer(site), per_layer(sites2[site.path])
        for layer in range(a1.shape[0]):
            if of == "a":  # the paper's right-singular vectors of its (r, in) A
                u1, u2 = np.linalg.svd(a1[layer])[0], np.linalg.svd(a2[layer])[0]
            else:  # the paper's left-singular vectors of its (out, in) ΔW = BA
                u1 = np.linalg.svd(a1[layer] @ b1[layer])[2].T
                u2 = np.linalg.svd(a2[layer] @ b2[layer])[2].T
            want = [[np.linalg.norm(u1[:, :i].T @ u2[:, :j]) ** 2 / min(i, j) for j in (1, 2)]
                    for i in (1, 2, 3, 4)]  # fmt: skip
            np.testing.assert_allclose(phi[site.path][layer], want, rtol=RTOL, atol=1e-12)


def stacked(a, b, d_out=None):
    """A one-module tree with the given (layers, in, r) A and (layers, r, out) B."""
    kernel = jax.ShapeDtypeStruct((*a.shape[:-1], b.shape[-1]), jnp.float32)
    return {"proj": {"kernel": kernel, "lora_a": a, "lora_b": b}}


def test_same_subspace_in_another_basis_gives_phi_one():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 40, 6))
    mix = rng.standard_normal((3, 6, 6))  # invertible with probability one
    b = rng.standard_normal((3, 6, 5))
    phi = analysis.subspace_similarity(stacked(a, b), stacked(a @ mix, b), of="a")["proj"]
    # Every top-i subspace of the first lies inside the whole span of the second.
    np.testing.assert_allclose(phi[:, :, -1], 1.0, rtol=1e-9)
    assert phi[:, 0, 0].max() < 0.999  # the bases differ, so the top directions do


def test_independent_random_subspaces_average_max_i_j_over_d():
    """E‖U1ᵀU2‖²_F = i·j/d for independent uniform subspaces, so E φ(i, j) = max(i, j)/d.
    (The issue wrote min(i, j)/d; the two agree on the diagonal i = j.) Each entry of U1ᵀU2
    has variance ≈ 1/d and its square variance ≈ 2/d², so over L layers the mean of φ(i, j)
    has standard deviation ≈ √(2ij)/(d·min(i, j)·√L); the test allows 6 of them."""
    d, r, layers = 128, 6, 200
    rng = np.random.default_rng(1)
    a1, a2 = rng.standard_normal((2, layers, d, r))
    b = rng.standard_normal((layers, r, 4))
    mean = analysis.subspace_similarity(stacked(a1, b), stacked(a2, b))["proj"].mean(axis=0)
    i, j = np.meshgrid(np.arange(1, r + 1), np.arange(1, r + 1), indexing="ij")
    sd = np.sqrt(2 * i * j) / (d * np.minimum(i, j) * np.sqrt(layers))
    assert np.all(np.abs(mean - np.maximum(i, j) / d) < 6 * sd)


def test_amplification_inside_and_outside_w_top_directions():
    """W = U·diag(σ)·Vᵀ with σ known; ΔW built on W's top-2 directions projects onto exactly
    those σ (factor small), ΔW built on its bottom-2 onto those (factor large)."""
    rng = np.random.default_rng(2)
    u, _ = np.linalg.qr(rng.standard_normal((24, 24)))
    v, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    sigma = np.geomspace(50.0, 0.05, 16)
    w = (u[:, :16] * sigma) @ v.T
    config = lj.LoraConfig(rank=2, alpha=2.0, targets=("proj",))  # scale 1
    results = {}
    for name, dirs in (("inside", [0, 1]), ("outside", [14, 15])):
        a, b = u[:, dirs] * [3.0, 2.0], v[:, dirs].T  # ΔW = Σ c_k u_k v_kᵀ, ‖ΔW‖ = √13
        tree = {"proj": {"kernel": w, "lora_a": a, "lora_b": b}}
        got = analysis.amplification(tree, config)["proj"]
        np.testing.assert_allclose(got.delta_norm, [np.sqrt(13.0)], rtol=1e-9)
        np.testing.assert_allclose(got.on_delta, [np.linalg.norm(sigma[dirs])], rtol=1e-9)
        np.testing.assert_allclose(got.on_w, [np.linalg.norm(sigma[:2])], rtol=1e-9)
        results[name] = got.factor[0]
    assert results["inside"] < 0.1 < 10 < results["outside"]


def test_bad_input_is_one_error_naming_it():
    params, config = adapted("dense", rank=2, key=3, targets=("up_proj",))
    other, _ = adapted("dense", rank=2, key=4, targets=("down_proj",))
    with pytest.raises(ValueError, match=r"share no adapted module.*up_proj.*down_proj"):
        analysis.subspace_similarity(params, other)
    with pytest.raises(ValueError, match="of='b'"):
        analysis.subspace_similarity(params, params, of="b")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    with pytest.raises(ValueError, match="up_proj: amplification needs the base kernel"):
        analysis.amplification(abstract, config)
    with pytest.raises(ValueError, match="k is 0"):
        analysis.energy(np.ones(3), 0)


# ----------------------------------------------------------------------------- lora-jax inspect


@pytest.fixture
def adapters(checkpoints, tmp_path):
    """A Llama adapter made and saved by peft (r=4, q/v) and one trained-looking adapter made
    by lora_jax on the scanned zoo Llama (r=2, q/v/gate), with peft's own ΔW per layer."""
    torch.manual_seed(1)
    base = PEERS["llama"][1].from_pretrained(checkpoints / "llama")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM",
                          target_modules=["q_proj", "v_proj"])  # fmt: skip
    model = peft.get_peft_model(base, cfg).eval()
    model.save_pretrained(tmp_path / "peft")
    deltas = {}  # (module type, layer) -> (ΔW as torch computes it (out, in), W (out, in))
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.Linear):
            layer, kind = int(name.split(".layers.")[1].split(".")[0]), name.rsplit(".", 1)[-1]
            with torch.no_grad():
                delta = module.get_delta_weight("default").double().numpy()
                deltas[(kind, layer)] = (delta, module.base_layer.weight.double().numpy())

    flax_model, params, hf_config = models.from_pretrained(checkpoints / "llama")
    config = lj.LoraConfig(rank=2, alpha=4.0, targets=("q_proj", "v_proj", "gate_proj"))
    ids = jnp.ones((1, 4), jnp.int32)
    params = lj.init(jax.random.key(0), params, config, lj.kernel_layouts(flax_model, ids))
    params = randomize_adapters(params, jax.random.key(3))
    with pytest.warns(UserWarning, match="vLLM"):  # rank 2 is not one vLLM serves
        lj.save_adapter(tmp_path / "ours", lj.split(params, config)[0], config, hf_config=hf_config)
    return tmp_path / "peft", tmp_path / "ours", deltas


def run_cli(capsys, *argv):
    code = cli.main(["inspect", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_peft_adapter_against_peft_delta_weights(checkpoints, adapters, capsys, tmp_path):
    peft_dir, ours_dir, deltas = adapters
    code, out, err = run_cli(capsys, peft_dir, "--base", checkpoints / "llama", "--against",
                             ours_dir, "--json", "--out", tmp_path / "figs")  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    rows = {(r["module"].rsplit("/", 1)[-1], r["layer"]): r for r in report["rows"]}
    assert set(rows) == set(deltas)  # 2 module types x 2 layers of the scanned model
    for key, (delta, w) in deltas.items():
        row, sigma = rows[key], np.linalg.svd(delta, compute_uv=False)
        np.testing.assert_allclose(row["delta_norm"], np.linalg.norm(delta), rtol=1e-5)
        np.testing.assert_allclose(row["sigma"], sigma[:4], rtol=1e-5, atol=1e-9 * sigma[0])
        np.testing.assert_allclose(row["w_norm"], np.linalg.norm(w), rtol=1e-5)
        u, _, vt = np.linalg.svd(delta)  # torch's (out, in): U is output-side, V input-side
        np.testing.assert_allclose(row["on_delta"], np.linalg.norm(u[:, :4].T @ w @ vt[:4].T),
                                   rtol=1e-5)  # fmt: skip
        assert row["factor"] == pytest.approx(row["delta_norm"] / row["on_delta"])
        assert 0 <= row["phi_1"] <= 1 and 0 <= row["phi_r"] <= 1
    names = sorted(p.rsplit("/", 1)[-1] for p in report["pngs"])
    assert names == ["amplification.png", "norms.png", "spectrum.png", "subspace.png"]
    for png in report["pngs"]:
        image = imread(png)  # decodes
        assert image.ndim == 3 and image.shape[0] > 100 and image[..., :3].std() > 0.01


def test_inspect_lora_jax_scanned_adapter_table_and_panels(adapters, capsys, tmp_path):
    _, ours_dir, _ = adapters
    code, out, err = run_cli(capsys, ours_dir)  # no base: spectrum and norms only
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:7] == ["module", "layer", "r", "|dW|", "top1", "top4", "k90"]
    assert "|W|" not in lines[0] and "phi" not in lines[0]
    body = [line.split() for line in lines[1:-1]]
    assert {(b[0], b[1]) for b in body} == {
        (f"model/layers/{m}", str(layer))
        for m in ("self_attn/q_proj", "self_attn/v_proj", "mlp/gate_proj")
        for layer in (0, 1)
    }
    assert lines[-1].startswith("figures: ")
    params, config = read_adapter(ours_dir)
    figs = inspection.figures(inspection.rows(params, config))
    assert sorted(figs) == ["norms.png", "spectrum.png"]
    for fig in figs.values():  # one panel per module type
        assert len(fig.axes) == 3
    for name in figs:
        assert imread(ours_dir / name).shape[2] in (3, 4)


def test_inspect_bad_input_is_one_line(checkpoints, adapters, capsys, tmp_path):
    peft_dir, ours_dir, _ = adapters
    code, _, err = run_cli(capsys, peft_dir, "--base", checkpoints / "gpt2")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{peft_dir} does not fit the base {checkpoints / 'gpt2'}" in err
    params, config = read_adapter(ours_dir)
    gate = params["model"]["layers"]["mlp"]["gate_proj"]
    gate_only = {
        "model": {"layers": {"mlp": {"gate_proj": {k: gate[k] for k in ("lora_a", "lora_b")}}}}
    }
    hf_config = json.loads((checkpoints / "llama" / "config.json").read_text())
    with pytest.warns(UserWarning, match="vLLM"):
        lj.save_adapter(tmp_path / "gate", gate_only, config, hf_config=hf_config)
    code, _, err = run_cli(capsys, peft_dir, "--against", tmp_path / "gate")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{peft_dir} against {tmp_path / 'gate'}" in err and "share no adapted module" in err
    code, _, err = run_cli(capsys, tmp_path / "missing")
    assert code == 2 and "no adapter_model.safetensors" in err
    code, _, err = run_cli(capsys, ours_dir, "--out", ours_dir / "adapter_config.json")
    assert code == 2 and "adapter_config.json: the PNGs go into a directory" in err
    (tmp_path / "gate" / "adapter_config.json").write_text("{")
    code, _, err = run_cli(capsys, tmp_path / "gate")
    assert code == 2 and f"{tmp_path / 'gate' / 'adapter_config.json'}: not valid JSON" in err
