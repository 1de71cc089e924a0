"""AdaLoRA: the SVD-shaped update, peft's RankAllocator as an optax transformation, the
orthogonality penalty, and peft's ADALORA files both ways (references: peft and numpy)."""

import dataclasses
import json

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
from hf_peer import PEERS, peer_logits
from small_models import CASES, randomize_adapters

import lora_jax as lj
from lora_jax import compose, models
from lora_jax.cli import main as cli_main
from lora_jax.step import make_step

IDS = np.array([[1, 5, 9, 3, 7, 2], [4, 4, 8, 6, 1, 0]])
SCHEDULE = dict(target_r=2, init_r=6, tinit=2, tfinal=3, deltaT=2, total_step=14)


def ada_config(rank=6, targets=(".*",), **schedule):
    spec = dict(target_rank=2, total_steps=14, tinit=2, tfinal=3, delta_t=2) | schedule
    return lj.LoraConfig(rank=rank, alpha=8.0, targets=targets, adalora=lj.AdaLora(**spec))


def with_singular_values(params, key, zero_every=3):
    """Random A, B and E (every `zero_every`-th entry of E zero: a pruned rank)."""
    params = randomize_adapters(params, key, scale=0.3)

    def leaf(path, x):
        if path[-1].key != "lora_e":
            return x
        e = jax.random.normal(jax.random.fold_in(key, x.size), x.shape)
        return jnp.where(jnp.arange(x.shape[-1]) % zero_every == 0, 0.0, e)

    return jax.tree_util.tree_map_with_path(leaf, params)


# ----------------------------------------------------------------------------- the update


@pytest.mark.parametrize("name", sorted(CASES))
def test_factored_equals_merged_and_merge_is_the_svd_form(name):
    model, make = CASES[name]
    x = make(jax.random.key(0))
    config = ada_config(rank=2, targets=("all-linear",), target_rank=1)
    params = model.init(jax.random.key(1), x)
    layouts = lj.kernel_layouts(model, x)
    adapted = with_singular_values(lj.init(jax.random.key(2), params, config, layouts),
                                   jax.random.key(3))  # fmt: skip
    factored = lj.lora_apply(model.apply, config)(adapted, x)
    merged = lj.merge(adapted, config)
    np.testing.assert_allclose(factored, model.apply(merged, x), atol=1e-5, rtol=1e-5)
    kernels = {lj.tree.path_str(k[:-1]): v for k, v in
               flax.traverse_util.flatten_dict(merged).items() if k[-1] == "kernel"}  # fmt: skip
    for site in lj.sites(adapted, config):  # W0 + α/(r + 1e-5)·A·diag(E)·B, in float64
        layers = int(np.prod(site.kernel.shape[: site.lead]))
        a = np.asarray(site.lora_a, np.float64).reshape(layers, -1, site.rank)
        b = np.asarray(site.lora_b, np.float64).reshape(layers, site.rank, -1)
        e = np.asarray(site.singular, np.float64).reshape(layers, 1, site.rank)
        want = np.asarray(site.kernel, np.float64).reshape(layers, a.shape[1], -1)
        want = want + 8.0 / (2 + 1e-5) * (a * e) @ b
        got = np.asarray(kernels[site.path], np.float64).reshape(want.shape)
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_composition_reads_the_update_with_its_singular_values(method):
    """compose sees s·A·diag(E)·B: cat of one AdaLoRA adapter, or its SVD at full rank, is a
    plain LoRA adapter with the same merged model."""
    model, make = CASES["scan"]
    x = make(jax.random.key(0))
    config = ada_config(rank=2, targets=("all-linear",), target_rank=1)
    params = model.init(jax.random.key(1), x)
    adapted = with_singular_values(
        lj.init(jax.random.key(2), params, config, lj.kernel_layouts(model, x)), jax.random.key(3)
    )
    adapter, base = lj.split(adapted, config)
    composed, plain, *_ = getattr(compose, method)([adapter], [config], [1.0], base=base)
    assert plain.adalora is None and not any(
        k[-1] == "lora_e" for k in flax.traverse_util.flatten_dict(composed)
    )
    want = model.apply(lj.merge(adapted, config), x)
    got = model.apply(lj.merge(lj.combine(composed, base), plain), x)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_init_starts_as_peft_and_the_base_output_is_unchanged():
    config = ada_config()
    layer, x = nn.Dense(16), jax.random.normal(jax.random.key(0), (4, 12))
    params = layer.init(jax.random.key(1), x)
    adapted = lj.init(jax.random.key(2), params, config)["params"]
    assert adapted["lora_e"].shape == (6,) and not adapted["lora_e"].any()
    for leaf in ("lora_a", "lora_b"):  # N(0, 0.02), as peft's reset_lora_parameters
        assert abs(float(jnp.std(adapted[leaf])) - 0.02) < 0.006
    y = lj.lora_apply(layer.apply, config)({"params": adapted}, x)
    np.testing.assert_array_equal(y, layer.apply(params, x))


# ----------------------------------------------------------------------------- the allocator


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.v = torch.nn.Linear(8, 6), torch.nn.Linear(8, 8)


class Net(torch.nn.Module):
    """Two stacked blocks and an output layer: our tree holds the blocks stacked (a lead
    axis) and `out` alone, so the allocator's budget spans both layouts."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([Block(), Block()])
        self.out = torch.nn.Linear(8, 4)


def ours_from_torch(net, grads=False):
    """Our adapter tree of the peft model's factors (or their gradients): A (in, r),
    B (r, out), E (r,)."""

    def factors(module):
        get = {n: getattr(module, n)["default"] for n in ("lora_A", "lora_B", "lora_E")}
        get = {n: (p.grad if grads else p).detach().numpy() for n, p in get.items()}
        return {"lora_a": get["lora_A"].T, "lora_b": get["lora_B"].T,
                "lora_e": get["lora_E"][:, 0]}  # fmt: skip

    stacked = {
        name: jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)),
                           *[factors(getattr(b, name)) for b in net.layers])
        for name in ("q", "v")
    }  # fmt: skip
    return {"layers": stacked, "out": jax.tree.map(jnp.asarray, factors(net.out))}


def test_the_allocator_fed_peft_s_gradients_keeps_peft_s_entries():
    """peft's loop (SGD step, then update_and_allocate) and ours (optax.sgd wrapped by
    lj.adalora_allocator) on the same fixed random gradients for 18 steps, through warm-up,
    the cubic budget, the final mask at step 11 and the final phase: the same entries of E
    are zero after every step, and the factors agree to 1e-5."""
    torch.manual_seed(0)
    cfg = peft.AdaLoraConfig(**SCHEDULE, lora_alpha=8, target_modules=["q", "v", "out"])
    net = peft.get_peft_model(Net(), cfg)
    inner = net.base_model.model
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    config = ada_config()
    adapter = ours_from_torch(inner)
    tx = lj.adalora_allocator(optax.sgd(0.5), config)
    state, update = tx.init(adapter), jax.jit(tx.update)
    rng = np.random.default_rng(0)
    named = [(n, p) for n, p in inner.named_parameters() if "lora_" in n]
    kept_per_step = []
    for step in range(18):
        for _, p in named:
            p.grad = torch.tensor(rng.normal(size=tuple(p.shape)).astype(np.float32))
        grads = ours_from_torch(inner, grads=True)
        opt.step()
        net.base_model.update_and_allocate(step)
        updates, state = update(grads, state, adapter)
        adapter = optax.apply_updates(adapter, updates)
        theirs = ours_from_torch(inner)
        for got, want in zip(jax.tree.leaves(adapter), jax.tree.leaves(theirs), strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
        ranks = lj.adalora_ranks(adapter)
        assert {k: v.tolist() for k, v in ranks.items()} == {
            k: v.tolist() for k, v in lj.adalora_ranks(theirs).items()
        }, step
        kept_per_step.append(sum(int(r.sum()) for r in ranks.values()))
    # 5 module layers of rank 6: 30 until tinit, then falling to the target 2 each from step 11.
    assert kept_per_step[:3] == [30, 30, 30] and kept_per_step[11:] == [10] * 7
    assert 10 < kept_per_step[6] < 30


def test_the_penalty_is_peft_s_orthogonal_regulariser(checkpoints):
    """peft adds orth_reg_weight · mean(||AAᵀ − I||, ||BᵀB − I||) to the loss when labels are
    given; the difference between that loss and the model's own is our penalty, to 1e-5."""
    directory = checkpoints / "llama"
    torch.manual_seed(1)
    cfg = peft.AdaLoraConfig(**SCHEDULE, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                             orth_reg_weight=0.3, task_type="CAUSAL_LM")  # fmt: skip
    peer = peft.get_peft_model(PEERS["llama"][1].from_pretrained(directory), cfg).eval()
    ids = torch.tensor(IDS)
    with torch.no_grad():
        total = peer(input_ids=ids, labels=ids).loss.item()
        plain = peer.base_model.model(input_ids=ids, labels=ids).loss.item()
    peer.save_pretrained(directory.parent / "penalty")
    _, params, _ = models.from_pretrained(directory)
    adapter, config = lj.load_adapter(directory.parent / "penalty", params)
    assert config.adalora.orth_reg_weight == 0.3
    ours = float(lj.adalora_penalty(config)(adapter))
    assert ours > 0.1
    np.testing.assert_allclose(ours, total - plain, rtol=1e-5)


def test_make_step_adds_the_penalty_s_gradient_once():
    config = ada_config(rank=4)
    layer, x = nn.Dense(6), jax.random.normal(jax.random.key(0), (8, 5))
    params = with_singular_values(lj.init(jax.random.key(1), layer.init(jax.random.key(2), x),
                                          config), jax.random.key(3))  # fmt: skip
    adapter, base = lj.split(params, config)
    apply = lj.lora_apply(layer.apply, config)

    def loss(p, batch, rngs):
        return jnp.sum(apply(p, batch["x"]) ** 2), jnp.float32(batch["x"].shape[0])

    # The allocator's first step (before tinit) is plain SGD's; its fresh state is donated.
    penalty, tx = lj.adalora_penalty(config), lj.adalora_allocator(optax.sgd(1.0), config)
    step = make_step(loss, tx, accum=2, penalty=penalty)
    copy = jax.tree.map(jnp.copy, adapter)  # the step donates its adapter
    new, _, metrics = step(copy, tx.init(copy), base, {"x": x}, 0)

    def total(a):
        return loss(lj.combine(a, base), {"x": x}, None)[0] / 8 + penalty(a)

    want = jax.tree.map(lambda p, g: p - g, adapter, jax.grad(total)(adapter))
    for got, expected in zip(jax.tree.leaves(new), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(metrics["penalty"], penalty(adapter), rtol=1e-6)


def random_like(tree, seed):
    leaves, structure = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noise = [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    return structure.unflatten(noise)


def test_the_allocator_state_checkpoints_and_a_resumed_run_is_the_same(tmp_path):
    """Stopped after 4 of 12 steps (mid-schedule: EMAs warm, some ranks pruned), saved as a
    run saves (orbax, with the adapter) and restored: the rest gives the uninterrupted run's
    adapter bit for bit, final pattern included."""
    from lora_jax.checkpoint import Checkpoints

    config = ada_config(rank=5, total_steps=12, tinit=1, tfinal=2, delta_t=1)
    layer, x = nn.Dense(6), jnp.zeros((1, 5))
    adapter, _ = lj.split(lj.init(jax.random.key(0), layer.init(jax.random.key(1), x), config),
                          config)  # fmt: skip
    tx = lj.adalora_allocator(optax.adam(0.1), config)
    update = jax.jit(tx.update)

    def run(adapter, state, steps):
        for step in steps:
            updates, state = update(random_like(adapter, step), state, adapter)
            adapter = optax.apply_updates(adapter, updates)
        return adapter, state

    straight, _ = run(adapter, tx.init(adapter), range(12))
    half = run(adapter, tx.init(adapter), range(4))
    assert 2 < sum(int(r.sum()) for r in lj.adalora_ranks(half[0]).values()) < 5
    checkpoints = Checkpoints(tmp_path, every=4, keep=1)
    checkpoints.save(4, half, {})
    checkpoints.close()
    step, restored, _ = Checkpoints(tmp_path, every=4, keep=1).restore_latest(half)
    assert step == 4
    resumed, _ = run(*restored, range(4, 12))
    for got, want in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight), strict=True):
        np.testing.assert_array_equal(got, want)
    assert sum(int(r.sum()) for r in lj.adalora_ranks(resumed).values()) == 2


# ----------------------------------------------------------------------------- files


def test_a_peft_trained_adalora_adapter_loads_with_peft_s_logits(checkpoints, tmp_path, capsys):
    """Trained by peft's own loop past its final allocation (budget 2 of 6 ranks a module),
    saved by peft (pruned ranks sliced off, rank_pattern listed): the same logits here."""
    directory = checkpoints / "llama"
    torch.manual_seed(3)
    cfg = peft.AdaLoraConfig(target_r=2, init_r=6, tfinal=2, total_step=8, lora_alpha=8,
                             target_modules=["q_proj", "v_proj", "down_proj"],
                             task_type="CAUSAL_LM")  # fmt: skip
    peer = peft.get_peft_model(PEERS["llama"][1].from_pretrained(directory), cfg)
    opt = torch.optim.AdamW([p for p in peer.parameters() if p.requires_grad], lr=0.02)
    ids = torch.tensor(IDS)
    for step in range(8):
        peer(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        peer.base_model.update_and_allocate(step)
        opt.zero_grad()
    peer.eval().save_pretrained(tmp_path / "theirs")
    saved = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    kept = [sum(k) for k in saved["rank_pattern"].values()]
    assert len(kept) == 6 and sum(kept) == 12 and min(kept) < 6  # pruned, budget met

    model, params, _ = models.from_pretrained(directory)
    adapter, config = lj.load_adapter(tmp_path / "theirs", params)
    assert config.rank == 6 and config.adalora.target_rank == 2
    ours = lj.lora_apply(model.apply, config)(lj.combine(adapter, params), jnp.asarray(IDS))
    theirs = peer_logits(peer, IDS)
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4 * np.abs(theirs).max())
    with peer.disable_adapter():
        assert np.abs(theirs - peer_logits(peer, IDS)).max() > 1e-3  # it moved
    ranks = lj.adalora_ranks(adapter)
    assert sorted(int(k) for r in ranks.values() for k in r) == sorted(kept)
    # `lora-jax inspect` reports each layer's kept ranks as its r.
    assert cli_main(["inspect", str(tmp_path / "theirs"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert sorted(row["rank"] for row in rows) == sorted(kept)


def test_ours_load_in_peft_and_come_back_bit_for_bit(checkpoints, tmp_path):
    directory = checkpoints / "llama"
    model, params, hf_config = models.from_pretrained(directory)
    config = ada_config(targets=("q_proj", "v_proj", "up_proj"))
    adapted = lj.init(jax.random.key(0), params, config, lj.kernel_layouts(model, jnp.asarray(IDS)))
    adapted = with_singular_values(adapted, jax.random.key(1))
    adapter = lj.split(adapted, config)[0]
    with pytest.warns(UserWarning, match="vLLM does not serve AdaLoRA"):
        lj.save_adapter(tmp_path / "ours", adapter, config, hf_config=hf_config)
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["init_r"] == 6
    assert all(sum(k) == 4 for k in saved["rank_pattern"].values())  # 2 of 6 pruned
    peer = PEERS["llama"][1].from_pretrained(directory).eval()
    peer = peft.PeftModel.from_pretrained(peer, tmp_path / "ours").eval()
    theirs = peer_logits(peer, IDS)
    ours = np.asarray(lj.lora_apply(model.apply, config)(adapted, jnp.asarray(IDS)))
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * np.abs(theirs).max())
    assert np.abs(ours - np.asarray(model.apply(params, jnp.asarray(IDS)))).max() > 1e-3

    # Read back: the kept ranks bit for bit, the pruned ones (E = 0, not in the file) zeros.
    back, loaded = lj.load_adapter(tmp_path / "ours", params)
    assert dataclasses.replace(loaded, targets=config.targets) == config
    flat = flax.traverse_util.flatten_dict(adapter)
    for keys, got in flax.traverse_util.flatten_dict(back).items():
        kept = flat[(*keys[:-1], "lora_e")] != 0  # lead + (r,)
        kept = kept[:, :, None] if keys[-1] == "lora_b" else kept[:, None, :]
        want = flat[keys] * (kept if keys[-1] != "lora_e" else 1)
        np.testing.assert_array_equal(got, want)


def test_bad_configs_are_refused_with_the_reason():
    spec = lj.AdaLora(target_rank=2, total_steps=10)
    for kwargs, match in (
        (dict(use_dora=True), "with use_dora"),
        (dict(use_rslora=True), "with use_rslora"),
        (dict(init="pissa"), "with init"),
        (dict(rank_pattern={"q": 2}), "with rank_pattern"),
        (dict(rank=1), "target_rank 2 exceeds the initial rank 1"),
    ):
        with pytest.raises(ValueError, match=match):
            lj.LoraConfig(**({"rank": 4, "adalora": spec} | kwargs))
    with pytest.raises(ValueError, match="leaves no steps to reduce"):
        lj.AdaLora(total_steps=10, tinit=5, tfinal=5)
    with pytest.raises(ValueError, match=r"beta1 is 1\.0"):
        lj.AdaLora(beta1=1.0)
    with pytest.raises(ValueError, match="total_steps"):
        lj.adalora_allocator(optax.sgd(0.1), lj.LoraConfig(adalora=lj.AdaLora()))


# ----------------------------------------------------------------------------- lora-jax train


def test_a_train_run_ends_at_the_target_budget_and_saves_for_peft(sft, tmp_path, capsys):
    """lora.adalora in `lora-jax train`: the allocator and penalty run in the jitted step
    (total_steps defaults to train.steps), a checkpoint holds the allocator's state, the
    saved adapter keeps 2 ranks a module layer on average (target_rank) and gives peft's
    logits, and `lora-jax eval` reproduces the run's final eval. A schedule whose final
    pattern would come after the last step, or a setting that is not one, is refused in one
    line, before anything runs."""
    from sft_runs import LLAMA_SFT, as_args, overrides
    from test_train import eval_reproduces_the_run

    ada = {"lora.rank": 4, "lora.alpha": 8.0, "train.steps": 6, "checkpoint.every": 3,
           "lora.adalora": {"target_rank": 2, "tinit": 1, "tfinal": 2}}  # fmt: skip
    sets = overrides(sft, tmp_path, **ada)
    assert cli_main(["train", "--config", LLAMA_SFT, *as_args(sets)]) == 0
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    layers = len(saved["rank_pattern"])  # 7 projections x 2 layers
    assert saved["peft_type"] == "ADALORA" and layers == 14 and saved["total_step"] == 6
    assert sum(sum(k) for k in saved["rank_pattern"].values()) == 2 * layers
    assert f"AdaLoRA: {2 * layers} ranks kept of {4 * layers}" in out
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert all(m["penalty"] > 0 for m in metrics)
    eval_reproduces_the_run(sets, tmp_path, capsys)

    model, params, _ = models.from_pretrained(sft / "llama")
    adapter, config = lj.load_adapter(tmp_path / "adapter", params)
    ours = lj.lora_apply(model.apply, config)(lj.combine(adapter, params), jnp.asarray(IDS))
    peer = PEERS["llama"][1].from_pretrained(sft / "llama").eval()
    theirs = peer_logits(peft.PeftModel.from_pretrained(peer, tmp_path / "adapter").eval(), IDS)
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4 * np.abs(theirs).max())

    capsys.readouterr()
    for bad, says in (
        ({"target_rank": 2}, "tfinal >= 1"),
        (3, "lora.adalora is 3; expected a dict of its settings"),
        ({"target": 2}, "config key 'lora.adalora.target' does not exist"),
    ):
        late = overrides(sft, tmp_path / "late", **(ada | {"lora.adalora": bad}))
        assert cli_main(["train", "--config", LLAMA_SFT, *as_args(late)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "lora.adalora" in err[0] and says in err[0], err
        assert not (tmp_path / "late").exists()
