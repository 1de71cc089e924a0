"""Mixtures of experts (Mixtral, Qwen3-MoE) against transformers and peft: routing with
experts that get no token, both checkpoint layouts, experts' LoRA factored inside the grouped
matmuls (never E x in x out), sharded steps equal to one device's, and the refusals.

The generic zoo tests cover these families too (`hf_peer.PEERS`): logits with padding, merged
exports transformers loads, peft target_parameters adapters both ways and `lora-jax merge`
against merge_and_unload (test_models, test_io), greedy decoding (test_generate)."""

import dataclasses
import json
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
from flax import traverse_util
from hf_peer import PEERS, peer_logits, reference_output
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jaxpr_check import factored_like_merged, kernel_shapes, leaves_named, mapped_operands
from safetensors.numpy import load_file, save_file
from small_models import randomize_adapters

import lora_jax as lj
from lora_jax import compose, grouped, models, sharding
from lora_jax.models.hub import SHARDING_RULES, naming_of
from lora_jax.run import with_router_loss
from lora_jax.step import StepShardings, make_step, opt_state_shardings
from lora_jax.tasks import TASKS

IDS = np.random.RandomState(0).randint(3, 96, (4, 8))
CONFIG = lj.LoraConfig(rank=4, alpha=8.0, targets=("attention", "experts"))


def adapted(checkpoints, name="mixtral", config=CONFIG):
    model, params, hf_config = models.from_pretrained(checkpoints / name)
    tree = lj.init(jax.random.key(0), params, config, lj.kernel_layouts(model, jnp.asarray(IDS)))
    return model, params, randomize_adapters(tree, jax.random.key(1), scale=0.2), hf_config


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_experts_that_get_no_token_and_a_single_token(checkpoints, name):
    """Two tokens pick 4 (token, expert) pairs among 5 experts, so at least one expert's group
    is empty; one token leaves three empty."""
    model, params, _ = models.from_pretrained(checkpoints / name)
    for ids in (IDS[:1, :2], IDS[:1, :1]):
        mask = np.ones_like(ids)
        want = reference_output(name, checkpoints / name, ids, mask)
        got = np.asarray(model.apply(params, jnp.asarray(ids), jnp.asarray(mask)))
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_checkpoints_with_per_expert_or_fused_names_load_alike(checkpoints, tmp_path):
    """transformers writes each expert apart (block_sparse_moe.experts.{e}.w1); a checkpoint
    holding the fused run-time parameters (mlp.experts.gate_up_proj) loads to the same tree."""
    _, params, hf_config = models.from_pretrained(checkpoints / "mixtral")
    written = load_file(checkpoints / "mixtral" / "model.safetensors")
    assert "model.layers.1.block_sparse_moe.experts.4.w3.weight" in written
    assert not any(".mlp." in n for n in written)
    fused = {n: np.asarray(t) for n, t in naming_of(hf_config).tensors(params["params"])}
    assert fused["model.layers.0.mlp.experts.gate_up_proj"].shape == (5, 2 * 48, 32)
    save_file(fused, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    _, again, _ = models.from_pretrained(tmp_path)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
    # Ours written back: transformers' own names, which it loads with the same logits.
    models.save_pretrained(params, hf_config, tmp_path / "out")
    assert set(load_file(tmp_path / "out" / "model.safetensors")) == set(written)
    mask = np.ones_like(IDS)
    np.testing.assert_allclose(reference_output("mixtral", tmp_path / "out", IDS, mask),
                               reference_output("mixtral", checkpoints / "mixtral", IDS, mask),
                               atol=1e-6)  # fmt: skip


def test_expert_lora_is_factored_in_the_grouped_matmuls_forward_and_backward(checkpoints):
    """No (E, in, out) (nor per-expert (in, out)) product of A and B in the forward or the
    gradient; the merged formulation builds one, and both give the same gradients."""
    model, _, tree, _ = adapted(checkpoints)
    adapter, base = lj.split(tree, CONFIG)
    ids = jnp.asarray(IDS)
    factored = lambda a, x: lj.lora_apply(model.apply, CONFIG)(lj.combine(a, base), x)  # noqa: E731
    merged = lambda a, x: model.apply(lj.merge(lj.combine(a, base), CONFIG), x)  # noqa: E731
    experts = {k: v for k, v in traverse_util.flatten_dict(tree["params"]).items()
               if "experts" in k}  # fmt: skip
    shapes = kernel_shapes(traverse_util.unflatten_dict(experts))
    assert (5, 32, 96) in shapes and (32, 96) in shapes  # gate_up_proj, per layer and expert
    grads = factored_like_merged(factored, merged, (adapter, ids), leaves_named(adapter, "lora_a"),
                                 leaves_named(adapter, "lora_b"), [ids], shapes)  # fmt: skip
    expert_grads = grads["params"]["model"]["layers"]["mlp"]["experts"]
    # Each expert's factors get their own gradient; an expert no token reached would get none.
    per_expert = np.abs(np.asarray(expert_grads["down_proj"]["lora_b"])).sum(axis=(2, 3))
    assert per_expert.shape == (2, 5) and (per_expert > 0).all()


def _steps_on_mesh_and_one_device(model, tree, mesh, steps=4):
    """`steps` LoRA steps on `mesh` (params split by the zoo's rules) and on one device:
    (the mesh step's jaxpr, the one-device losses), their losses and the adapters they
    reach checked equal on the way."""
    apply = lj.lora_apply(model.apply, CONFIG)

    def loss(params, batch, rngs):
        logits = apply(params, batch["ids"])
        nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch["ids"][:, 1:])
        return nll.sum(), jnp.float32(nll.size)

    tx = optax.adam(1e-2)
    batch = {"ids": jnp.asarray(np.tile(IDS, (2, 1)))}  # 8 rows: 2 a device on (data 2 x 2)
    adapter, base = lj.split(tree, CONFIG)
    one = make_step(loss, tx)
    a1, s1 = jax.tree.map(jnp.copy, adapter), tx.init(adapter)
    adapter_s, base_s = lj.split(sharding.param_shardings(tree, mesh, SHARDING_RULES), CONFIG)
    scalar = sharding.replicated(mesh)
    shardings = StepShardings(adapter_s, opt_state_shardings(tx, adapter, adapter_s, scalar),
                              base_s, sharding.batch_sharding(mesh), scalar)  # fmt: skip
    many = make_step(loss, tx, shardings=shardings)
    # Copies: a device_put may share a whole shard's buffer with the caller's tree, and the
    # step donates its adapter.
    a8, s8 = jax.device_put(jax.tree.map(jnp.copy, adapter), adapter_s), tx.init(adapter)
    b8, batch8 = jax.device_put(base, base_s), jax.device_put(batch, shardings.batch)
    jaxpr = many.trace(a8, s8, b8, batch8, jnp.int32(0)).jaxpr
    losses = []
    for i in range(steps):
        a1, s1, m1 = one(a1, s1, base, batch, jnp.int32(i))
        a8, s8, m8 = many(a8, s8, b8, batch8, jnp.int32(i))
        np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
        losses.append(float(m1["loss"]))
    for x, y in zip(jax.tree.leaves(a8), jax.tree.leaves(a1), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
    assert isinstance(jax.tree.leaves(a8)[0].sharding, NamedSharding)
    return jaxpr, losses


def test_eight_devices_step_like_one_and_lower_the_loss(checkpoints):
    """The MoE LoRA step on a (data 2, fsdp 2, tensor 2) mesh, the experts' kernels and
    factors split by the zoo's rules, equals the one-device step; training lowers the loss."""
    model, _, tree, _ = adapted(checkpoints)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    specs = sharding.param_shardings(tree, mesh, SHARDING_RULES)
    kernel = specs["params"]["model"]["layers"]["mlp"]["experts"]["gate_up_proj"]["kernel"]
    assert kernel.spec == P(None, "expert", "fsdp", "tensor")  # each expert split
    _, losses = _steps_on_mesh_and_one_device(model, tree, mesh)
    assert losses[-1] < losses[0]


@pytest.fixture(scope="module")
def four_experts(checkpoints, tmp_path_factory):
    """The peer Mixtral cut to its first 4 experts (router columns and expert kernels), as a
    checkpoint: experts that split over 2 or 4 expert shards."""
    _, params, hf_config = models.from_pretrained(checkpoints / "mixtral")
    flat = traverse_util.flatten_dict(params)
    for keys, value in flat.items():
        if "experts" in keys:
            flat[keys] = value[:, :4]
        elif keys[-2:] == ("gate", "kernel"):
            flat[keys] = value[..., :4]
    directory = tmp_path_factory.mktemp("mixtral4")
    models.save_pretrained(traverse_util.unflatten_dict(flat),
                           {**hf_config, "num_local_experts": 4}, directory)  # fmt: skip
    return directory


@pytest.mark.parametrize("axes", [dict(data=2, expert=2, tensor=2), dict(fsdp=2, expert=4)])
def test_experts_split_over_an_expert_axis_step_like_one_device(four_experts, axes):
    """Experts split over the mesh's `expert` axis (E / n a device, its factors with it) and
    run in shard_map, each device its own experts' rows of the tokens along the axis (the
    ring of experts): step for step equal to one device, each device's experts computed
    with its own E / n experts' kernels and factors, never the whole stack."""
    model, params, _ = models.from_pretrained(four_experts)
    ids = jnp.asarray(IDS)
    tree = lj.init(jax.random.key(0), params, CONFIG, lj.kernel_layouts(model, ids))
    tree = randomize_adapters(tree, jax.random.key(1), scale=0.2)
    mesh = sharding.make_mesh(**{"data": 1, **axes})
    specs = sharding.param_shardings(tree, mesh, SHARDING_RULES)
    experts = specs["params"]["model"]["layers"]["mlp"]["experts"]
    assert experts["down_proj"]["kernel"].spec == P(None, "expert", "tensor", "fsdp")
    assert experts["down_proj"]["lora_a"].spec[1] == "expert"
    # Dense kernels split over the expert axis too, joined to fsdp where that has 2 devices.
    q_proj = specs["params"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q_proj.spec[1] == (("fsdp", "expert") if "fsdp" in axes else "expert")
    jaxpr, _ = _steps_on_mesh_and_one_device(model, tree, mesh, steps=3)
    operands, local = mapped_operands(jaxpr), 4 // axes["expert"]
    # A layer's gate_up_proj and down_proj kernels and factors, as each device holds them:
    # split over `expert`, and never passed in whole (replicated, P()).
    stacks = [(32, 96), (48, 32), (32, 4), (4, 96), (48, 4), (4, 32)]
    assert {((local, *s), "P('expert',)") for s in stacks} <= operands
    assert not {((4, *s), "P()") for s in stacks} & operands


def test_one_expert_parameter_and_peft_round_trip_bit_for_bit(checkpoints, tmp_path):
    """peft wraps only down_proj (no nesting: mlp.experts.lora_A); ours load in peft with our
    logits and peft's own save gives back the same tensors."""
    config = lj.LoraConfig(rank=4, alpha=8.0, targets=("experts/down_proj",))
    model, _, tree, hf_config = adapted(checkpoints, "qwen3_moe", config)
    adapter, _ = lj.split(tree, config)
    lj.save_adapter(tmp_path / "ours", adapter, config, hf_config=hf_config)
    with pytest.warns(UserWarning, match=r"peft refuses lora_dropout=0.1 on target_parameters"):
        lj.save_adapter(tmp_path / "dropout", adapter, dataclasses.replace(config, dropout=0.1),
                        hf_config=hf_config)  # fmt: skip
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["target_parameters"] == ["mlp.experts.down_proj"]
    assert written["target_modules"] == []
    tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    a_name = "base_model.model.model.layers.1.mlp.experts.lora_A.weight"
    assert tensors[a_name].shape == (5 * 4, 24)  # (E·r, in): peft's stacking
    peer = PEERS["qwen3_moe"][1].from_pretrained(checkpoints / "qwen3_moe").eval()
    peer = peft.PeftModel.from_pretrained(peer, tmp_path / "ours")
    ours = np.asarray(lj.lora_apply(model.apply, config)(tree, jnp.asarray(IDS)))
    np.testing.assert_allclose(peer_logits(peer, IDS), ours, atol=1e-4)
    peer.save_pretrained(tmp_path / "theirs")
    again = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert set(again) == set(tensors)
    assert all(np.array_equal(again[n], tensors[n]) for n in tensors)


def test_refusals(checkpoints, tmp_path):
    hf = PEERS["qwen3_moe"][0].to_dict()
    with pytest.raises(ValueError, match=r"mlp_only_layers=\[1\].*dense layers among"):
        models.build(dict(hf, mlp_only_layers=[1]))
    with pytest.raises(ValueError, match=r"num_experts_per_tok=6; a MoE needs 1 <= top-k"):
        models.build(dict(hf, num_experts_per_tok=6))
    mixtral = PEERS["mixtral"][0].to_dict()
    with pytest.raises(ValueError, match=r"mixtral: num_local_experts=0, num_experts_per_tok=2"):
        models.build(dict(mixtral, num_local_experts=0))
    model, params, _ = models.from_pretrained(checkpoints / "mixtral")
    layouts = lj.kernel_layouts(model, jnp.asarray(IDS))
    dora = lj.LoraConfig(rank=4, targets=("experts",), use_dora=True)
    tree = lj.init(jax.random.key(0), params, dora, layouts)
    with pytest.raises(ValueError, match=r"experts/gate_up_proj: DoRA on grouped"):
        lj.lora_apply(model.apply, dora)(tree, jnp.asarray(IDS))
    adapters = [lj.split(lj.init(jax.random.key(i), params, CONFIG, layouts), CONFIG)[0]
                for i in range(2)]  # fmt: skip
    bank, bank_config = compose.stack(adapters, [CONFIG] * 2, base=params)
    routed = lj.routed_apply(model.apply, bank_config)
    with pytest.raises(ValueError, match=r"routing needs nn.Dense/DenseGeneral; this one is "
                                         r"GroupedDense"):  # fmt: skip
        routed(lj.combine(bank, params), jnp.asarray(IDS), adapter_ids=jnp.zeros(4, int))
    # The router is left alone by all-linear, and adapted only by name.
    assert not any(p.endswith("mlp/gate") for p in lj.targets(params, lj.LoraConfig(
        targets=("all-linear",))))  # fmt: skip
    assert lj.targets(params, lj.LoraConfig(targets=("mlp/gate$",))) == ["model/layers/mlp/gate"]


def test_lora_on_the_router_moves_the_routing_and_loads_in_peft(checkpoints, tmp_path):
    """LoRA on the router (opt-in, by name) changes which experts tokens reach; factored
    equals merged, and peft loads it as a target parameter (transformers' router is a bare
    weight, mlp.gate.weight, not a Linear) with our logits."""
    config = lj.LoraConfig(rank=2, alpha=4.0, targets=("mlp/gate$", "experts/down_proj"))
    model, params, tree, hf_config = adapted(checkpoints, "mixtral", config)
    got = np.asarray(lj.lora_apply(model.apply, config)(tree, jnp.asarray(IDS)))
    base = np.asarray(model.apply(params, jnp.asarray(IDS)))
    assert np.abs(got - base).max() > 1e-3
    merged = np.asarray(model.apply(lj.merge(tree, config), jnp.asarray(IDS)))
    np.testing.assert_allclose(got, merged, atol=1e-5)
    lj.save_adapter(tmp_path, lj.split(tree, config)[0], config, hf_config=hf_config)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["target_parameters"] == ["mlp.experts.down_proj", "mlp.gate.weight"]
    peer = PEERS["mixtral"][1].from_pretrained(checkpoints / "mixtral").eval()
    peer = peft.PeftModel.from_pretrained(peer, tmp_path)
    np.testing.assert_allclose(peer_logits(peer, IDS), got, atol=1e-4)


def test_training_adds_transformers_router_loss_when_the_router_is_trained(checkpoints):
    """The step's loss with the router trained is transformers' MixtralForCausalLM loss with
    output_router_logits: token cross-entropy plus router_aux_loss_coef times the
    load-balancing loss over every layer's real tokens (padding left out)."""
    hf = PEERS["mixtral"][0].to_dict() | {"router_aux_loss_coef": 0.5}
    _, params, _ = models.from_pretrained(checkpoints / "mixtral")
    model = models.build(hf)
    assert model.config.router_aux_loss_coef == 0.5
    mask = np.ones_like(IDS)
    mask[1, 5:], mask[3, 2:] = 0, 0
    batch = {"input_ids": jnp.asarray(IDS), "segment_ids": jnp.asarray(mask),
             "loss_mask": jnp.asarray(mask)}  # fmt: skip
    run = types.SimpleNamespace(apply=model.apply, task=TASKS["sft"], model=model,
                                router_aux=0.5)  # fmt: skip
    total, count, _ = with_router_loss(run, params, batch, None)
    peer = PEERS["mixtral"][1].from_pretrained(checkpoints / "mixtral",
                                               router_aux_loss_coef=0.5).eval()  # fmt: skip
    labels = torch.tensor(np.where(mask == 1, IDS, -100))
    with torch.no_grad():
        out = peer(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(mask),
                   labels=labels, output_router_logits=True)  # fmt: skip
    assert float(out.aux_loss) > 1.9  # E·sum(picks share·mean prob): k (2) when even
    np.testing.assert_allclose(float(total / count), float(out.loss), rtol=1e-5)


def test_qlora_experts_factored_equal_the_dequantized_merge(checkpoints):
    """Expert kernels quantize like any kernel (NF4 blocks along the output axis); the
    factored forward on the quantized base equals merging into its dequantized kernels."""
    model, _, tree, _ = adapted(checkpoints)
    quantized = lj.quantize(tree, CONFIG, "nf4", 16)
    experts = quantized["params"]["model"]["layers"]["mlp"]["experts"]
    assert isinstance(experts["gate_up_proj"]["kernel"], lj.QuantizedKernel)
    got = lj.lora_apply(model.apply, CONFIG)(quantized, jnp.asarray(IDS))
    want = model.apply(lj.merge(lj.dequantize(quantized), CONFIG), jnp.asarray(IDS))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_train_run_on_mixtral_trains_attention_experts_and_router_for_peft(
    checkpoints, sft, tmp_path, capsys
):
    """`lora-jax train` on a Mixtral: attention, every expert and the router adapted (the
    router at its own rank), the load-balancing loss added because the router is trained;
    the saved adapter gives our logits in peft."""
    from sft_runs import LLAMA_SFT, as_args, overrides

    from lora_jax.cli import main as cli_main

    model_dir = tmp_path / "mixtral"
    shutil.copytree(checkpoints / "mixtral", model_dir)
    shutil.copy(sft / "llama" / "tokenizer.json", model_dir)
    sets = overrides(sft, tmp_path / "out", **{
        "model.path": model_dir, "lora.targets": ["attention", "experts", "mlp/gate$"],
        "lora.rank": 4, "lora.alpha": 8.0, "lora.rank_pattern": {"mlp/gate": 2}})  # fmt: skip
    assert cli_main(["train", "--config", LLAMA_SFT, *as_args(sets)]) == 0
    assert "load-balancing loss x 0.001" in capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert saved["target_parameters"] == [
        "mlp.experts.down_proj", "mlp.experts.gate_up_proj", "mlp.gate.weight"]  # fmt: skip
    # peft matches a target parameter's rank by its parameter name
    assert saved["rank_pattern"] == {"model\\.layers\\.\\d+\\.mlp\\.gate\\.weight": 2}
    model, params, _ = models.from_pretrained(model_dir)
    adapter, config = lj.load_adapter(tmp_path / "out" / "adapter", params)
    ours = lj.lora_apply(model.apply, config)(lj.combine(adapter, params), jnp.asarray(IDS))
    peer = PEERS["mixtral"][1].from_pretrained(model_dir).eval()
    peer = peft.PeftModel.from_pretrained(peer, tmp_path / "out" / "adapter")
    np.testing.assert_allclose(peer_logits(peer, IDS), np.asarray(ours), atol=1e-4)
    assert np.abs(np.asarray(ours) - np.asarray(model.apply(params, jnp.asarray(IDS)))).max() > 1e-3
    # `lora-jax inspect`: a row per layer and expert, the router's per layer.
    capsys.readouterr()
    assert cli_main(["inspect", str(tmp_path / "out" / "adapter"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    experts = [r for r in rows if r["module"] == "model/layers/mlp/experts/down_proj"]
    assert sorted((r["layer"], r["expert"]) for r in experts) == [
        (layer, e) for layer in range(2) for e in range(5)]  # fmt: skip
    router = [r for r in rows if r["module"] == "model/layers/mlp/gate"]
    assert [(r["layer"], r["rank"], "expert" in r) for r in router] == [
        (0, 2, False),
        (1, 2, False),
    ]


def test_a_train_run_over_an_expert_axis_and_its_refusal(
    checkpoints, four_experts, sft, tmp_path, capsys
):
    """`lora-jax train --set mesh.expert=2` on 4 devices (fsdp 2 x expert 2) gives the
    one-device run's losses; on a checkpoint of 5 experts it is refused in one line (exit 2)
    before anything is written."""
    from sft_runs import LLAMA_SFT, as_args, losses, overrides

    from lora_jax.cli import main as cli_main

    mesh = {"mesh.devices": 4, "mesh.fsdp": 2, "mesh.expert": 2}
    for name, source in (("five", checkpoints / "mixtral"), ("four", four_experts)):
        shutil.copytree(source, tmp_path / name)
        shutil.copy(sft / "llama" / "tokenizer.json", tmp_path / name)
    refused = overrides(sft, tmp_path / "refused", **mesh, **{"model.path": tmp_path / "five"})
    assert cli_main(["train", "--config", LLAMA_SFT, *as_args(refused)]) == 2
    error = capsys.readouterr().err.strip()
    assert "mesh.expert 2 must divide the model's experts (5: " in error
    assert len(error.splitlines()) == 1 and not (tmp_path / "refused").exists()
    for out, axes in (("one", {}), ("out", mesh)):
        sets = overrides(sft, tmp_path / out, **{"model.path": tmp_path / "four",
                                                  "lora.targets": ["experts"], **axes})  # fmt: skip
        assert cli_main(["train", "--config", LLAMA_SFT, *as_args(sets)]) == 0
    np.testing.assert_allclose(losses(tmp_path / "out"), losses(tmp_path / "one"), rtol=1e-4)
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_routed_apply_serves_attention_adapters_on_a_mixture(checkpoints):
    """One adapter per example (a bank of two attention adapters, -1 for the base) on a
    Mixtral: each row as its own adapter gives it, the experts shared."""
    config = lj.LoraConfig(rank=4, alpha=8.0, targets=("attention",))
    model, params, _ = models.from_pretrained(checkpoints / "mixtral")
    layouts = lj.kernel_layouts(model, jnp.asarray(IDS))
    adapters = [lj.split(randomize_adapters(lj.init(jax.random.key(i), params, config, layouts),
                                            jax.random.key(10 + i), scale=0.2), config)[0]
                for i in range(2)]  # fmt: skip
    bank, bank_config = compose.stack(adapters, [config] * 2, base=params)
    ids = jnp.array([1, -1, 0, 1])
    got = lj.routed_apply(model.apply, bank_config)(lj.combine(bank, params), jnp.asarray(IDS),
                                                    adapter_ids=ids)  # fmt: skip
    apply = lj.lora_apply(model.apply, config)
    each = [apply(lj.combine(a, params), jnp.asarray(IDS)) for a in adapters]
    each.append(model.apply(params, jnp.asarray(IDS)))
    for row, k in enumerate(ids.tolist()):
        np.testing.assert_allclose(got[row], each[k][row], atol=1e-5)


@pytest.mark.parametrize("groups, rows, empty", [(8, 300, (1, 6)), (5, 3, (0, 2, 4)), (3, 1, ())])
def test_grouped_rows_in_blocks_equal_ragged_dot_values_and_gradients(groups, rows, empty):
    """The CPU path (blocks of rows, each times its group's kernel) against ragged_dot's own
    dense lowering: empty groups, a group of one row, rows past the groups' total (zeros)."""
    rng = np.random.default_rng(groups)
    x = jnp.asarray(rng.normal(size=(rows, 16)), jnp.float32)
    kernels = jnp.asarray(rng.normal(size=(groups, 16, 12)), jnp.float32)
    weights = np.ones(groups)
    weights[list(empty)] = 0
    sizes = jnp.asarray(rng.multinomial(max(rows - 1, 1), weights / weights.sum()), jnp.int32)

    def loss(dot):
        return lambda x, k: jnp.sum(dot(x, k, sizes) ** 2)

    got = grouped._blocked_dot(x, kernels, sizes, None)
    want = jax.lax.ragged_dot(x, kernels, sizes)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert rows == 1 or np.all(np.asarray(got[int(sizes.sum()) :]) == 0)
    blocked = jax.grad(loss(lambda x, k, s: grouped._blocked_dot(x, k, s, None)), (0, 1))
    for g, w in zip(blocked(x, kernels), jax.grad(loss(jax.lax.ragged_dot), (0, 1))(x, kernels),
                    strict=True):  # fmt: skip
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)
    # The public entry picks this path on the CPU.
    np.testing.assert_array_equal(jax.jit(grouped.grouped_dot)(x, kernels, sizes), got)
