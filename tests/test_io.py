"""Adapter files against the real peer: peft + transformers (PyTorch CPU) load ours, we load
theirs, and merged exports match peft's merge_and_unload."""

import json
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
from hf_peer import PEERS, peer_logits
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from small_models import randomize_adapters

import lora_jax as lj
from lora_jax import cli, models

IDS = np.random.RandomState(0).randint(3, 96, (2, 7))
LABELS = np.array([0, 2])

# name -> (LoraConfig for our side, peft LoraConfig kwargs for theirs). Together they cover
# rank/alpha patterns, a regex target (GPT-2's attn/c_proj but not mlp/c_proj, with
# fan_in_fan_out), fused projections (Phi-3), experts (peft's target_parameters: both of
# Mixtral's, nested, and one of Qwen3-MoE's) and a classification head trained in full.
CASES = {
    "llama": (
        lj.LoraConfig(rank=4, alpha=8.0, targets=("all-linear",), rank_pattern={"v_proj": 2},
                      alpha_pattern={"o_proj": 4.0}),
        dict(target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2},
             alpha_pattern={"down_proj": 2.0}),
    ),
    "gpt2": (
        lj.LoraConfig(rank=4, alpha=8.0, targets=("c_attn", "attn/c_proj")),
        dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
    ),
    "qwen3": (
        lj.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "k_proj", "o_proj")),
        dict(target_modules=["q_proj", "k_proj", "down_proj"]),
    ),
    "gemma": (
        lj.LoraConfig(rank=4, alpha=8.0, targets=("all-linear",), rank_pattern={"up_proj": 2}),
        dict(target_modules=["q_proj", "o_proj", "up_proj"], rank_pattern={"o_proj": 2}),
    ),
    "gemma2": (
        lj.LoraConfig(rank=4, alpha=8.0, targets=("v_proj", "gate_proj", "down_proj")),
        dict(target_modules=["q_proj", "v_proj", "gate_proj"]),
    ),
    "gemma3": (
        lj.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "k_proj", "v_proj", "down_proj")),
        dict(target_modules=["q_proj", "k_proj", "v_proj", "down_proj"]),
    ),
    "phi3": (
        lj.LoraConfig(rank=4, alpha=8.0, targets=("qkv_proj", "gate_up_proj")),
        dict(target_modules=["qkv_proj", "gate_up_proj", "o_proj"]),
    ),
    "mixtral": (
        lj.LoraConfig(rank=4, alpha=8.0, targets=("attention", "experts"),
                      rank_pattern={"experts/down_proj": 2}, alpha_pattern={"gate_up_proj": 4.0}),
        dict(target_modules=["q_proj", "v_proj"],
             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
             rank_pattern={"mlp.experts.down_proj": 2}, alpha_pattern={"gate_up_proj": 4}),
    ),
    "qwen3_moe": (
        lj.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "experts/down_proj")),
        dict(target_modules=["k_proj"], target_parameters=["mlp.experts.down_proj"]),
    ),
    "roberta": (
        lj.LoraConfig(rank=8, alpha=16.0, targets=("query", "value"),
                      modules_to_save=("classifier",)),
        dict(target_modules=["query", "key"], modules_to_save=["classifier"]),
    ),
}  # fmt: skip


def peer_model(name, directory):
    return PEERS[name][1].from_pretrained(directory).eval()


# peft's side for the families test_trained_adapter... does not train: they load peft's files.
LOAD_ONLY = {
    "mistral": dict(target_modules=["q_proj", "k_proj", "gate_proj"], rank_pattern={"k_proj": 2}),
    "qwen2": dict(target_modules=["q_proj", "v_proj", "o_proj"], alpha_pattern={"o_proj": 2.0}),
    "bert": dict(target_modules=["query", "value", "dense"]),
    "bert_cls": dict(target_modules=["query", "value"], modules_to_save=["classifier"]),
}


def loss_fn(name, apply, base):
    def loss(adapter):
        logits = apply(lj.combine(adapter, base), jnp.asarray(IDS))
        if name == "roberta":
            return optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean()
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], IDS[:, 1:]).mean()

    return loss


def train(name, model, params, config, steps=3):
    """A few Adam steps on the adapter alone, as a user would."""
    params = lj.init(jax.random.key(0), params, config, lj.kernel_layouts(model, jnp.asarray(IDS)))
    adapter, base = lj.split(params, config)
    apply = lj.lora_apply(model.apply, config)
    tx = optax.adam(1e-2)
    state, grad = tx.init(adapter), jax.jit(jax.grad(loss_fn(name, apply, base)))
    for _ in range(steps):
        updates, state = tx.update(grad(adapter), state)
        adapter = optax.apply_updates(adapter, updates)
    return adapter, base, apply


@pytest.mark.parametrize("name", sorted(CASES))
def test_trained_adapter_loads_in_peft_with_equal_logits(checkpoints, name, tmp_path):
    model, params, hf_config = models.from_pretrained(checkpoints / name)
    config = CASES[name][0]
    adapter, base, apply = train(name, model, params, config)
    assert all(np.abs(b).max() > 0 for b in jax.tree.leaves(adapter))  # B moved off zero
    ours = np.asarray(apply(lj.combine(adapter, base), jnp.asarray(IDS)))
    with pytest.warns(UserWarning, match="vLLM") if name != "roberta" else _no_vllm_warning():
        lj.save_adapter(tmp_path, adapter, config, hf_config=hf_config,
                        base_model_id=str(checkpoints / name))  # fmt: skip
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["r"] == config.rank
    theirs = peer_logits(peft.PeftModel.from_pretrained(peer_model(name, checkpoints / name),
                                                        tmp_path), IDS)  # fmt: skip
    scale = np.abs(theirs).max()  # float32 on both sides; compared relative to output scale
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * scale)
    base = np.asarray(model.apply(params, jnp.asarray(IDS)))
    assert np.abs(ours - base).max() > 10 * 1e-4 * scale  # training moved the output


class _no_vllm_warning:
    """A sequence classifier is not what vLLM serves: its adapter draws no vLLM warning,
    although its trained head would (modules_to_save)."""

    def __enter__(self):
        self.ctx = warnings.catch_warnings(record=True)
        self.caught = self.ctx.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)
        assert not any("vLLM" in str(w.message) for w in self.caught)


@pytest.fixture
def peft_adapter(checkpoints, tmp_path):
    """An adapter made by peft with random non-zero A and B, saved by peft."""

    def make(name):
        torch.manual_seed(1)
        tasks = {"roberta": "SEQ_CLS", "bert_cls": "SEQ_CLS", "bert": "FEATURE_EXTRACTION"}
        task = tasks.get(name, "CAUSAL_LM")
        kwargs = LOAD_ONLY[name] if name in LOAD_ONLY else CASES[name][1]
        cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, task_type=task, **kwargs)
        model = peft.get_peft_model(peer_model(name, checkpoints / name), cfg).eval()
        with torch.no_grad():  # a B large enough that the adapter's effect dwarfs float32 noise
            for param_name, param in model.named_parameters():
                if "lora_B" in param_name:
                    param.mul_(10.0)
        model.save_pretrained(tmp_path / f"peft_{name}")
        return model, tmp_path / f"peft_{name}"

    return make


@pytest.mark.parametrize("name", sorted(PEERS))
def test_peft_adapter_loads_with_equal_logits(checkpoints, peft_adapter, name):
    peer, directory = peft_adapter(name)
    model, params, _ = models.from_pretrained(checkpoints / name)
    adapter, config = lj.load_adapter(directory, params)
    ours = lj.lora_apply(model.apply, config)(lj.combine(adapter, params), jnp.asarray(IDS))
    ours = np.asarray(ours[0] if isinstance(ours, tuple) else ours)  # BertModel: (hidden, pooled)
    theirs = peer_logits(peer, IDS)
    scale = np.abs(theirs).max()  # RoBERTa's head outputs ~0.02, LMs' ~1: compare relatively
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * scale)
    base = model.apply(params, jnp.asarray(IDS))
    base = np.asarray(base[0] if isinstance(base, tuple) else base)
    # The adapter moves the output by over 10x the tolerance, so the comparison discriminates.
    assert np.abs(ours - base).max() > 10 * 1e-4 * scale


@pytest.mark.parametrize(
    "name", ["llama", "gpt2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "mixtral", "qwen3_moe"]
)
def test_cli_merge_matches_peft_merge_and_unload(checkpoints, peft_adapter, name, tmp_path):
    peer, directory = peft_adapter(name)
    out = tmp_path / "merged"
    assert cli.main(["merge", "--base", str(checkpoints / name), "--adapter", str(directory),
                     "--out", str(out)]) == 0  # fmt: skip
    merged = peer_logits(peer_model(name, out), IDS)
    np.testing.assert_allclose(merged, peer_logits(peer.merge_and_unload(), IDS), atol=1e-4)


def snapshot(params):
    return [np.asarray(v).copy() for v in jax.tree.leaves(params)]


def test_pickle_adapter_is_refused_and_base_untouched(checkpoints, tmp_path):
    _, params, _ = models.from_pretrained(checkpoints / "llama")
    before = snapshot(params)
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(ValueError, match=r"pickle file, and unpickling can run arbitrary code"):
        lj.load_adapter(tmp_path, params)
    assert all(np.array_equal(a, b) for a, b in zip(before, snapshot(params), strict=True))


def test_shape_mismatch_names_path_and_shapes(checkpoints, peft_adapter):
    _, directory = peft_adapter("llama")
    tensors = load_file(directory / "adapter_model.safetensors")
    name = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    tensors[name] = np.zeros((4, 31), np.float32)
    save_file(tensors, directory / "adapter_model.safetensors")
    _, params, _ = models.from_pretrained(checkpoints / "llama")
    before = snapshot(params)
    with pytest.raises(
        ValueError,
        match=r"layers.1.self_attn.q_proj.lora_A.weight \(model/layers/"
        r"self_attn/q_proj/lora_a\): shape \(31, 4\) does not fit the base kernel "
        r"\(32, 32\)",
    ):
        lj.load_adapter(directory, params)
    tensors[name] = np.zeros((4, 32), np.float32)
    # A and B disagree on the rank (each fits the kernel): caught when checked as a pair.
    for layer in (0, 1):
        tensors[f"base_model.model.model.layers.{layer}.self_attn.v_proj.lora_B.weight"] = (
            np.zeros((16, 3), np.float32))  # fmt: skip
    save_file(tensors, directory / "adapter_model.safetensors")
    with pytest.raises(
        ValueError,
        match=r"model/layers/self_attn/v_proj: lora_a \(2, 32, 2\) "
        r"and lora_b \(2, 3, 16\) do not fit kernel \(2, 32, 16\)",
    ):
        lj.load_adapter(directory, params)
    assert all(np.array_equal(a, b) for a, b in zip(before, snapshot(params), strict=True))


def test_vllm_friendly_adapter_saves_without_warnings(checkpoints, tmp_path, recwarn):
    model, params, hf_config = models.from_pretrained(checkpoints / "llama")
    config = lj.LoraConfig(rank=8, targets=("q_proj", "v_proj"))
    adapted = lj.init(jax.random.key(0), params, config, lj.kernel_layouts(model, jnp.asarray(IDS)))
    lj.save_adapter(tmp_path, lj.split(adapted, config)[0], config, hf_config=hf_config)
    assert not [w for w in recwarn if "vLLM" in str(w.message)]
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["target_modules"] == ["q_proj", "v_proj"] and written["rank_pattern"] == {}


def test_cli_merge_reports_bad_input(tmp_path, capsys):
    assert cli.main(["merge", "--base", str(tmp_path), "--adapter", str(tmp_path),
                     "--out", str(tmp_path / "o")]) == 2  # fmt: skip
    assert "lora-jax merge:" in capsys.readouterr().err


# A Linen model outside the zoo and its torch twin with the same module names: the naming
# map (models.Naming) is all save_adapter / load_adapter need to exchange peft files with it.
class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(8, name="down")(nn.relu(nn.Dense(16, name="up")(x))), None


class Custom(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8, name="proj_in")(x)
        stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
        x, _ = stack(name="layers")(x, None)
        return nn.Dense(3, name="head")(x)


class TorchBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class TorchCustom(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_in, self.head = torch.nn.Linear(6, 8), torch.nn.Linear(8, 3)
        self.layers = torch.nn.ModuleList([TorchBlock(), TorchBlock()])

    def forward(self, x):
        x = self.proj_in(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def custom_pair():
    """(Linen model, its params, the torch twin holding the same weights, input, naming)."""
    model, x = Custom(), np.random.RandomState(1).randn(5, 6).astype(np.float32)
    params = model.init(jax.random.key(0), x)
    naming = models.Naming(layers="layers")
    twin = TorchCustom().eval()
    twin.load_state_dict(
        {n: torch.tensor(np.asarray(t)) for n, t in naming.tensors(params["params"])}
    )
    return model, params, twin, x, naming


def test_custom_linen_model_saves_a_peft_adapter_peft_loads(tmp_path):
    model, params, twin, x, naming = custom_pair()
    config = lj.LoraConfig(rank=2, alpha=4.0, targets=("up", "down", "proj_in"))
    layouts = lj.kernel_layouts(model, x)
    adapted = lj.init(jax.random.key(1), params, config, layouts)
    adapted = randomize_adapters(adapted, jax.random.key(2), 0.5)
    lj.save_adapter(tmp_path, lj.split(adapted, config)[0], config, naming=naming, base=params)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(written["target_modules"]) == ["down", "proj_in", "up"]
    peer = peft.PeftModel.from_pretrained(twin, tmp_path).eval()
    with torch.no_grad():
        theirs = peer(torch.tensor(x)).numpy()
    ours = np.asarray(lj.lora_apply(model.apply, config)(adapted, x))
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert np.abs(ours - np.asarray(model.apply(params, x))).max() > 1e-2  # not a no-op
    with pytest.raises(ValueError, match="naming= and base="):
        lj.save_adapter(tmp_path, lj.split(adapted, config)[0], config, naming=naming)


def test_custom_linen_model_loads_a_peft_adapter(tmp_path):
    model, params, twin, x, naming = custom_pair()
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["up", "down"],
                          init_lora_weights=False)  # fmt: skip
    peer = peft.get_peft_model(twin, cfg).eval()
    peer.save_pretrained(tmp_path)
    with torch.no_grad():
        theirs = peer(torch.tensor(x)).numpy()
    adapter, config = lj.load_adapter(tmp_path, params, naming=naming)
    ours = np.asarray(lj.lora_apply(model.apply, config)(lj.combine(adapter, params), x))
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert np.abs(ours - np.asarray(model.apply(params, x))).max() > 1e-2
    implied, _ = lj.load_adapter(tmp_path, params)  # without one: the names' own numbering
    jax.tree.map(np.testing.assert_array_equal, implied, adapter)
    # A naming that stores kernels (in, out) does not describe this file: refused, named.
    with pytest.raises(ValueError, match=r"adapter_config\.json: fan_in_fan_out is False"):
        lj.load_adapter(tmp_path, params, naming=models.Naming("layers", fan_in_fan_out=True))


def test_one_naming_round_trips_a_custom_models_adapter_through_peft(tmp_path):
    # ours -> peft -> ours and peft -> ours -> peft, names read and written by one Naming.
    model, params, twin, x, naming = custom_pair()
    config = lj.LoraConfig(rank=2, alpha=4.0, targets=("up", "down", "proj_in"))
    adapted = lj.init(jax.random.key(1), params, config, lj.kernel_layouts(model, x))
    adapter = lj.split(randomize_adapters(adapted, jax.random.key(2), 0.5), config)[0]
    lj.save_adapter(tmp_path / "ours", adapter, config, naming=naming, base=params)
    peer = peft.PeftModel.from_pretrained(twin, tmp_path / "ours")
    peer.save_pretrained(tmp_path / "via_peft")
    back, back_config = lj.load_adapter(tmp_path / "via_peft", params, naming=naming)
    jax.tree.map(np.testing.assert_array_equal, back, adapter)  # exactly the factors saved
    assert (back_config.rank, back_config.alpha) == (2, 4.0)
    lj.save_adapter(tmp_path / "again", back, back_config, naming=naming, base=params)
    again = peft.PeftModel.from_pretrained(custom_pair()[2], tmp_path / "again").eval()
    with torch.no_grad():
        theirs = again(torch.tensor(x)).numpy()
    ours = np.asarray(lj.lora_apply(model.apply, config)(lj.combine(adapter, params), x))
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    assert np.abs(ours - np.asarray(model.apply(params, x))).max() > 1e-2  # not a no-op


def test_cli_merge_of_a_sharded_base_writes_shards_transformers_loads(
    checkpoints, peft_adapter, tmp_path, capsys
):
    """A base in several files (transformers' sharded layout) merges tensor by tensor into
    files no larger than its largest (bar a tensor larger alone), with the index transformers
    reads; the model is peft's merge_and_unload of the same adapter, in bfloat16 its weights
    rounded once."""
    peer, directory = peft_adapter("mixtral")
    base = tmp_path / "base"
    peer_model("mixtral", checkpoints / "mixtral").save_pretrained(base, max_shard_size="60KB")
    base_files = sorted(base.glob("*.safetensors"))
    assert len(base_files) > 2
    peft_merged = peer.merge_and_unload()
    expected = peer_logits(peft_merged, IDS)
    assert np.abs(expected - peer_logits(peer_model("mixtral", base), IDS)).max() > 5e-4
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        assert cli.main(["merge", "--base", str(base), "--adapter", str(directory), "--out",
                         str(out), "--dtype", dtype]) == 0  # fmt: skip
        assert f"into MixtralForCausalLM from {base}: wrote {out}" in capsys.readouterr().out
        index = json.loads((out / "model.safetensors.index.json").read_text())
        files = sorted(out.glob("*.safetensors"))
        assert len(files) > 1 and set(index["weight_map"].values()) == {f.name for f in files}
        names = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
        assert set(index["weight_map"]) == set(names)  # every tensor, named as the base names it
        largest = max(f.stat().st_size for f in base_files)
        for file in files:
            with safe_open(file, "numpy") as f:
                sizes = [f.get_slice(n).get_shape() for n in f.keys()]  # noqa: SIM118
            data = sum(np.prod(s) * (4 if dtype == "float32" else 2) for s in sizes)
            assert data <= largest or len(sizes) == 1, file
        merged = peft_load_merged("mixtral", out)
        if dtype == "float32":
            np.testing.assert_allclose(peer_logits(merged, IDS), expected, atol=1e-4)
        else:  # compared weight by weight: top-2 routing turns a rounding into a jump in logits
            theirs = peft_merged.state_dict()
            for name, tensor in merged.state_dict().items():
                # Within one bfloat16 step (2^-7 relative) of peft's float32 merge.
                np.testing.assert_allclose(tensor.numpy(), theirs[name].numpy(), rtol=2**-7,
                                           atol=1e-30, err_msg=name)  # fmt: skip


def peft_load_merged(name, directory):
    """A merged checkpoint as transformers loads it, in float32 whatever its dtype."""
    return PEERS[name][1].from_pretrained(directory, dtype=torch.float32).eval()
