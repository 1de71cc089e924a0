"""Preference tuning (data.task "dpo") with the base as its own reference: the loss, TRL's
metrics and the adapter gradients against TRL's DPOTrainer with a peft LoRA model (the
oracle), every loss against its formula in float64, and `lora-jax train` on pairs."""

import contextlib
import json
import math
import os
import re
import shutil
import signal
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers as tf
from datasets import Dataset
from hf_peer import PEERS
from safetensors.torch import load_file
from sft_runs import LLAMA_SFT, ROOT, as_args, cli, losses, overrides
from test_aot import SMALL, compile_cli
from test_failures import one_line
from test_train import _free_port, logged
from trl import DPOConfig, DPOTrainer

import lora_jax as lj
from lora_jax import chat, models
from lora_jax.cli import main as cli_main
from lora_jax.data import Encode, Padded, Tokenizer, WithValues, packed
from lora_jax.files import resolve
from lora_jax.settings import DataSettings, DpoSettings, RunConfig, load_config
from lora_jax.sources import ListedRows, read_rows
from lora_jax.step import make_step
from lora_jax.tasks import Dpo, Encoder
from lora_jax.tasks.dpo import REFERENCE, _pair_logps

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected")  # fmt: skip
TARGETS = ["q_proj", "v_proj", "down_proj"]
DATA = DataSettings(task="dpo", max_length=12)  # a pair's row: 24 tokens, 12 slots
PASS_SAID = "reference_logps of the 64 training rows computed (one forward pass)"


def preference_rows(count, seed=0):
    """Prompts of a few words; the chosen response their reversal shifted by 40 (as the SFT
    set's), the rejected one shifted by 41."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        drawn = rng.integers(3, 50, int(rng.integers(2, 6)))
        rows.append({"prompt": " ".join(f"w{w}" for w in drawn),
                     "chosen": " ".join(f"w{w + 40}" for w in drawn[::-1]),
                     "rejected": " ".join(f"w{w + 41}" for w in drawn[::-1])})  # fmt: skip
    return rows


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def peer(sft, tmp_path_factory):
    """The tiny Llama, a peft LoRA adapter with random A and B saved from it, and ours
    loaded from that file: (model, base params, adapter, lora config, tokenizer, dir)."""
    directory = tmp_path_factory.mktemp("dpo")
    model, params, hf_config = models.from_pretrained(sft / "llama")
    torch.manual_seed(3)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    peft.get_peft_model(PEERS["llama"][1].from_pretrained(sft / "llama"), config).save_pretrained(
        directory / "adapter"
    )
    adapter, lora = lj.load_adapter(directory / "adapter", params)
    return model, params, adapter, lora, Tokenizer(sft / "llama", hf_config), directory


def pairs_batch(task, tokenizer, rows, max_length=12):
    data = DataSettings(task="dpo", max_length=max_length)
    examples = [task.encode(r, tokenizer, data) for r in rows]
    length = task.row_length(data)
    return examples, {k: jnp.asarray(v) for k, v in Padded(0, length, length)(examples).items()}


def ours(task, model, params, adapter, lora, batch):
    """(mean loss, {metric: mean}, adapter gradients of the mean loss)."""

    def mean(a):
        total, count, _, sums = task.loss_terms(lj.lora_apply(model.apply, lora),
                                                lj.combine(a, params), batch)  # fmt: skip
        return total / count, {k: v / count for k, v in sums.items()}

    (loss, metrics), grads = jax.value_and_grad(mean, has_aux=True)(adapter)
    return float(loss), {k: float(v) for k, v in metrics.items()}, grads


def trl_inputs(examples):
    """TRL's batch of the same token ids: every chosen sequence, then every rejected one,
    right-padded, with its attention and completion masks."""
    seqs = [[np.asarray(e[k])[np.asarray(e["segment_ids"]) == side]
             for k in ("input_ids", "loss_mask")] for side in (1, 2) for e in examples]  # fmt: skip
    length = max(len(ids) for ids, _ in seqs)
    out = {k: torch.zeros(len(seqs), length, dtype=torch.long)
           for k in ("input_ids", "attention_mask", "completion_mask")}  # fmt: skip
    for row, (ids, mask) in enumerate(seqs):
        out["input_ids"][row, : len(ids)] = torch.tensor(ids)
        out["attention_mask"][row, : len(ids)] = 1
        out["completion_mask"][row, : len(ids)] = torch.tensor(mask)
    return out


def trl_trainer(sft, directory, rows, tmp_path, **settings):
    """TRL's DPOTrainer given the base and a peft LoRA config (so its reference is the base
    with the adapter disabled, as ours), its adapter then set to the one ours loaded."""
    hf_tokenizer = tf.PreTrainedTokenizerFast(tokenizer_file=str(sft / "llama" / "tokenizer.json"),
                                              eos_token="</s>", pad_token="[UNK]")  # fmt: skip
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True,
                     **settings)  # fmt: skip
    trainer = DPOTrainer(model=PEERS["llama"][1].from_pretrained(sft / "llama"), args=args,
                         peft_config=config, train_dataset=Dataset.from_list(rows),
                         processing_class=hf_tokenizer)  # fmt: skip
    saved = load_file(directory / "adapter" / "adapter_model.safetensors")
    peft.set_peft_model_state_dict(trainer.model, saved)
    return trainer


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_metrics_and_gradients_equal_trls(sft, peer, tmp_path, loss_type):
    """TRL's DPOTrainer (`trl_trainer`) holding the random adapter ours holds: on one batch
    of four pairs of unequal lengths, the loss, TRL's six metrics and every adapter gradient
    equal ours at 1e-4 (float32; measured about 1e-7)."""
    model, params, adapter, lora, tokenizer, directory = peer
    rows = preference_rows(4)
    task = Dpo(DpoSettings(beta=0.1, loss=loss_type))
    examples, batch = pairs_batch(task, tokenizer, rows)
    loss, metrics, grads = ours(task, model, params, adapter, lora, batch)

    trainer = trl_trainer(sft, directory, rows, tmp_path, beta=0.1, loss_type=[loss_type])
    theirs = trainer._compute_loss(trainer.model, trl_inputs(examples), False)
    theirs.backward()
    theirs = theirs.detach()
    np.testing.assert_allclose(loss, theirs.item(), rtol=1e-4)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    for name in METRICS:
        np.testing.assert_allclose(metrics[name], logged[name], rtol=1e-4, atol=1e-6, err_msg=name)
    # TRL's gradients through peft's own save and our loader: the same leaves, our layout.
    for p in trainer.model.parameters():
        if p.grad is not None:
            p.data = p.grad
    trainer.model.save_pretrained(tmp_path / "grads")
    expected, _ = lj.load_adapter(tmp_path / "grads", params)
    flat, want = jax.tree.leaves_with_path(grads), dict(jax.tree.leaves_with_path(expected))
    assert len(flat) == len(want) == 3 * 2  # A and B of 3 targets (the layers stacked)
    scale = max(float(jnp.abs(g).max()) for _, g in flat)
    for path, g in flat:
        np.testing.assert_allclose(g, want[path], atol=1e-4 * scale, err_msg=str(path))


def step_loss(task, model, lora):
    """The task's loss as `step.make_step` takes it: (summed loss, pairs, metric sums)."""
    apply = lj.lora_apply(model.apply, lora)

    def loss(params, batch, rngs):
        total, count, _, sums = task.loss_terms(apply, params, batch, rngs)
        return total, count, sums

    return loss


def test_a_run_of_steps_follows_trls_loss_curve(sft, peer, tmp_path):
    """Ten AdamW steps over two alternating batches of four pairs, from the same adapter:
    our step (`step.make_step` on the task's loss, optax's adamw) and TRL's (its loss,
    backward, then the optimizer its trainer builds) give the same loss curve at 1e-3, and
    the curve falls, so the comparison tells the steps apart (measured: 2e-6)."""
    model, params, adapter, lora, tokenizer, directory = peer
    rows, lr = preference_rows(8, seed=2), 5e-3
    task = Dpo(DpoSettings(beta=0.5))
    batches = [pairs_batch(task, tokenizer, rows[i : i + 4]) for i in (0, 4)]
    tx = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
    step = make_step(step_loss(task, model, lora), tx)
    state = (jax.tree.map(jnp.copy, adapter), tx.init(adapter))
    ours_curve = []
    for i in range(10):
        *state, metrics = step(*state, params, batches[i % 2][1], i)
        ours_curve.append(float(metrics["loss"]))

    trainer = trl_trainer(sft, directory, rows, tmp_path, beta=0.5, learning_rate=lr,
                          weight_decay=0.0, adam_epsilon=1e-8)  # fmt: skip
    optimizer = trainer.create_optimizer()
    theirs_curve = []
    for i in range(10):
        optimizer.zero_grad()
        value = trainer._compute_loss(trainer.model, trl_inputs(batches[i % 2][0]), False)
        value.backward()
        optimizer.step()
        theirs_curve.append(value.item())
    np.testing.assert_allclose(ours_curve, theirs_curve, rtol=1e-3)
    assert theirs_curve[-1] < theirs_curve[0] - 0.1, theirs_curve


def float64_logps(sft, peer, rows, max_length=12):
    """Each pair's summed response log-probs (chosen, rejected) under the peft policy and
    under its base (adapter disabled), in float64 by PyTorch: the formulas' inputs."""
    _, _, _, _, tokenizer, directory = peer
    examples, _ = pairs_batch(Dpo(), tokenizer, rows, max_length)
    base = PEERS["llama"][1].from_pretrained(sft / "llama").double()
    policy = peft.PeftModel.from_pretrained(base, directory / "adapter").double().eval()
    out = np.zeros((2, len(rows), 2))  # (policy / reference, pair, chosen / rejected)
    counts = np.zeros((len(rows), 2))
    for i, e in enumerate(examples):
        for side in (1, 2):
            keep = np.asarray(e["segment_ids"]) == side
            ids, mask = np.asarray(e["input_ids"])[keep], np.asarray(e["loss_mask"])[keep]
            counts[i, side - 1] = mask[1:].sum()
            for which in (0, 1):
                skipped = policy.disable_adapter() if which else contextlib.nullcontext()
                with torch.no_grad(), skipped:
                    logits = policy(input_ids=torch.tensor(ids[None])).logits[0, :-1]
                logps = torch.log_softmax(logits, -1)[range(len(ids) - 1), ids[1:]].numpy()
                out[which, i, side - 1] = float(np.sum(logps * mask[1:]))
    return out[0], out[1], counts


@pytest.mark.parametrize("loss_type, settings", [
    ("sigmoid", {"label_smoothing": 0.2}),  # conservative DPO
    ("ipo", {"beta": 0.5}),
    ("simpo", {"beta": 2.0, "simpo_gamma": 0.8}),
])  # fmt: skip
def test_each_loss_equals_its_formula_in_float64(sft, peer, loss_type, settings):
    """The loss and rewards against numpy float64 from PyTorch's float64 log-probs: cDPO's
    smoothed sigmoid, IPO's squared per-token margin, SimPO's length-normalised margin with
    no reference; 1e-5 (float32 here)."""
    model, params, adapter, lora, tokenizer, _ = peer
    rows = preference_rows(6, seed=1)
    task = Dpo(DpoSettings(loss=loss_type, **settings))
    _, batch = pairs_batch(task, tokenizer, rows)
    loss, metrics, _ = ours(task, model, params, adapter, lora, batch)
    policy, reference, counts = float64_logps(sft, peer, rows)
    beta = task.settings.beta
    scores = policy / counts if loss_type == "simpo" else policy - reference
    delta = scores[:, 0] - scores[:, 1]
    log_sigmoid = lambda x: -np.logaddexp(0, -x)  # noqa: E731
    if loss_type == "sigmoid":
        eps = task.settings.label_smoothing
        losses = -(1 - eps) * log_sigmoid(beta * delta) - eps * log_sigmoid(-beta * delta)
    elif loss_type == "ipo":
        per_token = scores / counts
        losses = (per_token[:, 0] - per_token[:, 1] - 1 / (2 * beta)) ** 2
    else:
        losses = -log_sigmoid(beta * delta - task.settings.simpo_gamma)
    np.testing.assert_allclose(loss, losses.mean(), rtol=1e-5)
    rewards = beta * scores
    np.testing.assert_allclose(metrics["rewards/margins"], np.mean(rewards[:, 0] - rewards[:, 1]),
                               rtol=1e-4, atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(metrics["logps/chosen"], policy[:, 0].mean(), rtol=1e-5)
    assert metrics["rewards/accuracies"] == pytest.approx(np.mean(rewards[:, 0] > rewards[:, 1]))


def test_at_init_the_policy_is_its_own_reference(peer):
    """B = 0: policy and reference log-probs are equal, so the sigmoid loss is log 2 and
    every reward 0, while the gradient is not 0."""
    model, params, adapter, lora, tokenizer, _ = peer
    fresh = jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.zeros_like(leaf) if path[-1].key == "lora_b" else leaf, adapter
    )
    _, batch = pairs_batch(Dpo(), tokenizer, preference_rows(4))
    loss, metrics, grads = ours(Dpo(DpoSettings()), model, params, fresh, lora, batch)
    assert abs(loss - math.log(2)) < 1e-6
    # Equal but for float32 rounding: the policy's forward adds x·A·B = 0 where the base's
    # does not, and XLA fuses the two programs differently.
    assert abs(metrics["rewards/chosen"]) < 1e-6 and abs(metrics["rewards/rejected"]) < 1e-6
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))  # it learns


def test_the_step_holds_the_base_once(peer):
    """The reference is the policy's own base: the compiled DPO step's arguments are the
    adapter, its optimizer state, one base and the batch, byte for byte: a second base, or
    the reference's log-probs computed apart, would add to them."""
    model, params, adapter, lora, tokenizer, _ = peer
    task, tx = Dpo(DpoSettings()), optax.adamw(1e-3)
    _, batch = pairs_batch(task, tokenizer, preference_rows(2))
    args = (adapter, tx.init(adapter), params, batch)
    step = make_step(step_loss(task, model, lora), tx)
    memory = step.lower(*args, jnp.int32(0)).compile().memory_analysis()
    nbytes = lambda tree: sum(leaf.nbytes for leaf in jax.tree.leaves(tree))  # noqa: E731
    assert nbytes(params) > 4 * nbytes(args[:2])  # the base is the bulk of the arguments
    # And the step number's 4 bytes where XLA keeps it (unused without dropout).
    assert 0 <= memory.argument_size_in_bytes - nbytes(args) <= 4


def carrying_the_reference(peer, count):
    """`count` pairs as examples carrying their reference log-probs, as the pass before
    training (`Dpo.row_values`) gives them to `data.WithValues`: the base's, one pair a row."""
    model, params, _, lora, tokenizer, _ = peer
    encode = Encode(ListedRows(preference_rows(count)), Encoder(Dpo(), tokenizer, DATA))
    plain = Padded(0, 24, 24)([encode(i) for i in range(count)])
    logps = _pair_logps(lj.lora_apply(model.apply, lora), params, plain)[0]
    reference = logps.reshape(count, -1, 2)[:, 0]  # a row's pair is in its first slot
    return [WithValues(encode, {REFERENCE: reference})(i) for i in range(count)]


def test_a_precomputed_reference_takes_the_reference_forward_out_of_the_step(peer):
    """dpo.precompute_reference: a batch carrying the reference's log-probs (as the pass
    before training computes them, from the base alone) gives the live reference's loss,
    metrics and gradients (1e-6, float32; they are the same numbers), and its compiled step
    does under 0.8x the FLOPs: the policy's forward and backward remain (about two forwards'
    worth: the frozen base takes no weight gradient), the reference's forward is gone
    (measured: 0.70x)."""
    model, params, adapter, lora, _, _ = peer
    live, pre = Dpo(DpoSettings()), Dpo(DpoSettings(precompute_reference=True))
    examples = carrying_the_reference(peer, 4)
    batch, carried = (Padded(0, 24, 24)([{k: e[k] for k in task.batch_shapes(DATA, 1)}
                                         for e in examples]) for task in (live, pre))  # fmt: skip
    assert set(carried) == set(batch) | {REFERENCE}
    loss, metrics, grads = ours(live, model, params, adapter, lora, batch)
    loss_pre, metrics_pre, grads_pre = ours(pre, model, params, adapter, lora, carried)
    np.testing.assert_allclose(loss_pre, loss, rtol=1e-6)
    for name in METRICS:
        np.testing.assert_allclose(metrics_pre[name], metrics[name], rtol=1e-6, atol=1e-7)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), grads_pre,
                 grads)  # fmt: skip
    tx = optax.adamw(1e-3)

    def flops(task, batch):
        step = make_step(step_loss(task, model, lora), tx)
        args = (adapter, tx.init(adapter), params, batch, jnp.int32(0))
        return step.lower(*args).compile().cost_analysis()["flops"]

    ratio = flops(pre, carried) / flops(live, batch)
    assert ratio < 0.8, ratio


def test_packed_pairs_give_the_sums_and_gradients_of_one_pair_a_row(peer):
    """data.pack with dpo: pairs packed several to a row (pair k its segments 2k - 1 and 2k,
    each seeing only itself, positions restarting) give the summed loss, the pair count,
    TRL's metric sums and the adapter gradients of one pair a row (1e-5, float32), the
    reference live or carried in the rows' tokens (precompute_reference)."""
    model, params, adapter, lora, _, _ = peer
    apply = lj.lora_apply(model.apply, lora)
    examples = carrying_the_reference(peer, 16)
    plain = Padded(0, 24, 24)(examples)
    source = grain.MapDataset.source(examples).to_iter_dataset()
    rows = list(packed(source, list(examples[0]), 4, 96, 0))
    rows = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    assert len(rows["input_ids"]) < 8 and rows["segment_ids"].max() >= 6  # 3+ pairs a row

    def summed(task, batch):
        def total(a):
            loss, *rest = task.loss_terms(apply, lj.combine(a, params), batch)
            return loss, rest

        (loss, rest), grads = jax.value_and_grad(total, has_aux=True)(adapter)
        return [loss, *rest], grads

    for task in (Dpo(DpoSettings()), Dpo(DpoSettings(precompute_reference=True))):
        keep = task.batch_shapes(DATA, 1)
        (want, want_grads), (got, got_grads) = (
            summed(task, {k: jnp.asarray(v) for k, v in b.items() if k in keep})
            for b in (plain, rows)
        )
        assert float(got[1]) == float(want[1]) == 16  # every pair counted once
        np.testing.assert_allclose(got[:3], want[:3], rtol=1e-5)
        for name in METRICS:
            np.testing.assert_allclose(got[3][name], want[3][name], rtol=1e-5, atol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                     got_grads, want_grads)  # fmt: skip


def dpo_sets(sft, tmp_path, out, **changes):
    data = {"train": write_rows(tmp_path / "train.jsonl", preference_rows(64)),
            "eval": write_rows(tmp_path / "eval.jsonl", preference_rows(16, seed=1))}  # fmt: skip
    sets = {"data.task": "dpo", "data.train": data["train"], "data.eval": data["eval"],
            "data.max_length": 12, "dpo.beta": 1.0, **changes}  # fmt: skip
    return ["train", "--config", LLAMA_SFT, *as_args(overrides(sft, out, **sets))]


def test_train_on_pairs_writes_trls_metrics_and_learns(sft, tmp_path, capsys):
    """`lora-jax train` with data.task dpo: the first step's loss is log 2 (the adapter
    starts at B = 0), the six metrics are in metrics.jsonl and eval.json, and the reward
    accuracy on the eval pairs rises above chance; `lora-jax eval` of the saved adapter
    reports the run's own final metrics."""
    out = tmp_path / "out"
    args = dpo_sets(sft, tmp_path, out, **{"train.steps": 60, "dpo.beta": 3.0})
    assert cli_main(args) == 0
    logged = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert abs(logged[0]["loss"] - math.log(2)) < 1e-6
    assert all(set(METRICS) <= set(line) for line in logged)
    assert np.mean([m["loss"] for m in logged[-5:]]) < math.log(2) - 0.1
    final = json.loads((out / "eval.json").read_text())
    # 16 eval pairs; chance is 8 (measured: 12).
    assert set(METRICS) <= set(final) and final["rewards/accuracies"] >= 10 / 16, final
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    capsys.readouterr()
    assert cli_main(["eval", *args[1:]]) == 0
    printed = capsys.readouterr().out.splitlines()[-1]
    assert printed.startswith(f"{out / 'adapter'} on ")
    for name in METRICS:
        assert f"{name} {final[name]:.4f}" in printed, (name, printed)


def test_a_precomputed_reference_gives_the_live_references_curve(sft, tmp_path, capsys):
    """`lora-jax train` with dpo.precompute_reference: the pass before the first step is
    said, and the loss curve is the live reference's at 1e-4 (float32: the pass computes in
    other batches, padded to other lengths, than the steps do, and the pair loss amplifies
    the rounding of the log-ratios over six steps at 3e-2; measured 5e-6)."""
    steps = {"train.steps": 6}
    assert cli_main(dpo_sets(sft, tmp_path, tmp_path / "live", **steps)) == 0
    capsys.readouterr()
    pre = {**steps, "dpo.precompute_reference": True}
    assert cli_main(dpo_sets(sft, tmp_path, tmp_path / "pre", **pre)) == 0
    said = capsys.readouterr()
    assert PASS_SAID in said.out + said.err, said
    np.testing.assert_allclose(losses(tmp_path / "pre"), losses(tmp_path / "live"), rtol=1e-4)


def test_two_processes_stopped_and_resumed_give_one_processs_curve(sft, tmp_path):
    """DPO as a pod runs it: two jax.distributed processes, each with its own directory's
    view of the run, SIGTERM to process 1 stops both after one step and checkpoint,
    --resume on both finishes, and the curve is the one process's on 8 devices. The two
    compute the reference's log-probs before training (dpo.precompute_reference; each
    process its rows, gathered on both), again on --resume; the one process, in each step:
    a row's log-probs gathered in the wrong place would change the curve."""
    port, env = _free_port(), dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    # A learning rate a third of SFT's: at 3e-2 the two orders of summation drift apart by
    # 1e-3 over 16 steps, the pairs' loss amplifying every difference (a resume's error
    # would instead jump at the step it resumed from).
    # Unpacked: each process packs its own rows, so packed batches hold other pairs than one
    # process's (as for SFT's test of this).
    common = {"train.steps": 12, "checkpoint.every": 4, "mesh.fsdp": 4, "mesh.tensor": 2,
              "mesh.devices": -1, "train.batch_size": 8, "train.learning_rate": 1e-2,
              "data.pack": False}  # fmt: skip

    def start(*extra):
        procs = []
        for pid in range(2):
            join = {"distributed.coordinator": f"localhost:{port}",
                    "distributed.num_processes": 2, "distributed.process_id": pid}  # fmt: skip
            sets = dpo_sets(sft, tmp_path, tmp_path / "multi", **common, **join,
                            **{"dpo.precompute_reference": True})  # fmt: skip
            procs.append(cli(*sets, *extra, env=env))
        return procs

    procs, metrics = start(), tmp_path / "multi" / "metrics.jsonl"
    while procs[0].poll() is None and len(logged(metrics)) < 3:
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGTERM)
    stopped = set()
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 128 + signal.SIGTERM, err[-3000:]
        stopped |= set(re.findall(r"stopped by SIGTERM at step (\d+): checkpoint written", err))
    assert len(stopped) == 1 and int(stopped.pop()) < 12  # both, at the same step
    port = _free_port()
    for p in start("--resume"):
        out, err = p.communicate(timeout=400)
        assert p.returncode == 0, err[-3000:]
        assert PASS_SAID in out + err
    single = dpo_sets(sft, tmp_path, tmp_path / "single", **{**common, "mesh.devices": 8})
    assert cli_main(single) == 0
    # float32; the all-reduces sum in another order than one process's: 1e-4 relative
    # (measured 5e-7).
    np.testing.assert_allclose(losses(tmp_path / "multi"), losses(tmp_path / "single"), rtol=1e-4)
    assert len(losses(tmp_path / "multi")) == 12


def test_a_non_finite_loss_stops_at_once_as_sfts_does(sft, tmp_path, capsys):
    """A step whose pair loss is not finite (a learning rate of 1e30) stops the run before
    anything from that step is saved: exit 2, one line naming the step, the checkpoints and
    metrics ending at the step before it, no adapter."""
    out = tmp_path / "out"
    diverge = {"train.steps": 8, "train.learning_rate": 1e30, "train.clip_norm": 1e30,
               "checkpoint.every": 1}  # fmt: skip
    assert cli_main(dpo_sets(sft, tmp_path, out, **diverge)) == 2
    line = one_line(capsys.readouterr().err)
    bad = int(re.search(r"step (\d+): loss", line)[1])
    assert 1 < bad < 8 and "newest checkpoint" in line, line
    assert len(losses(out)) == bad - 1 and not (out / "adapter").exists()
    saved = [int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()]
    assert max(saved) == bad - 1, saved


@pytest.mark.parametrize("row, says", [
    ({"prompt": "w3", "chosen": "w4"}, "no field 'rejected'"),
    ({"prompt": "w3", "chosen": "w4 w5", "rejected": "w4 w5"},
     "chosen and rejected are the same text"),
    ({"prompt": "w3", "chosen": " ", "rejected": "w4"}, "chosen is empty"),
    ({"prompt": "w3", "chosen": 5, "rejected": "w4"}, "chosen is 5, not a string"),
    ({"prompt": " ".join(["w3"] * 12), "chosen": "w4", "rejected": "w5"},
     "the prompt is 12 tokens, leaving no room for a response within data.max_length 12"),
])  # fmt: skip
def test_a_bad_pair_is_one_line_naming_file_and_row(sft, tmp_path, capsys, row, says):
    out = tmp_path / "out"
    args = dpo_sets(sft, tmp_path, out)
    train = tmp_path / "train.jsonl"
    write_rows(train, [*preference_rows(3), row])
    assert cli_main(args) == 2
    line = one_line(capsys.readouterr().err)
    assert f"{train}:4: {says}" in line, line
    assert not out.exists()


# Chat templates as their checkpoints ship them (the file names which).
TEMPLATES = json.loads((Path(__file__).parent / "chat_templates.json").read_text())


def with_template(sft, tmp_path, name):
    """The tiny Llama with a chat template in its tokenizer_config.json, as the hub's are."""
    directory = tmp_path / name
    shutil.copytree(sft / "llama", directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": TEMPLATES[name], "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "[UNK]", "tokenizer_class": "PreTrainedTokenizerFast"}))  # fmt: skip
    return directory


def conversations(rows, system=False):
    """TRL's conversational form of `preference_rows`: the prompt a user turn (after an
    earlier exchange and a system turn, where asked), each response an assistant turn."""
    earlier = [{"role": "user", "content": "w7 w8"}, {"role": "assistant", "content": "w48 w47"}]
    head = [{"role": "system", "content": "w90 w91"}] if system else []
    turn = lambda role, text: [{"role": role, "content": text}]  # noqa: E731
    return [{"prompt": [*head, *earlier, *turn("user", r["prompt"])],
             "chosen": turn("assistant", r["chosen"]),
             "rejected": turn("assistant", r["rejected"])} for r in rows]  # fmt: skip


@pytest.mark.parametrize("name", ["llama3", "mistral", "zephyr"])
def test_conversational_pairs_are_rendered_and_split_as_trl_does(sft, tmp_path, name):
    """Rows of message lists: the text is transformers' apply_chat_template's, and each
    side's tokens and loss mask are TRL's DPOTrainer's (its prompt_ids then chosen_ids or
    rejected_ids, the completion starting where prompt and conversation part)."""
    directory = with_template(sft, tmp_path, name)
    rows = conversations(preference_rows(4, seed=3), system=name != "mistral")
    hf_tokenizer = tf.AutoTokenizer.from_pretrained(directory)
    _, _, hf_config = models.from_pretrained(directory)
    tokenizer = Tokenizer(directory, hf_config)
    for messages in (rows[0]["prompt"], rows[0]["prompt"] + rows[0]["chosen"]):
        for generation in (False, True):
            assert chat.render(tokenizer.chat_template, messages, tokenizer.specials, generation) \
                == hf_tokenizer.apply_chat_template(messages, tokenize=False,
                                                    add_generation_prompt=generation)  # fmt: skip
    data = DataSettings(task="dpo", max_length=64, template="{prompt}")
    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True)
    trainer = DPOTrainer(model=PEERS["llama"][1].from_pretrained(directory), args=args,
                         peft_config=peft.LoraConfig(r=4, target_modules=TARGETS),
                         train_dataset=Dataset.from_list(rows),
                         processing_class=hf_tokenizer)  # fmt: skip
    for row, theirs in zip(rows, trainer.train_dataset, strict=True):
        Dpo().check_row(row, "row", data, None)
        example = Dpo().encode(row, tokenizer, data)
        for side, key in ((1, "chosen_ids"), (2, "rejected_ids")):
            keep = example["segment_ids"] == side
            ids = list(theirs["prompt_ids"]) + list(theirs[key])
            assert example["input_ids"][keep].tolist() == ids
            assert example["loss_mask"][keep].tolist() == [0] * len(theirs["prompt_ids"]) + [1] * (
                len(ids) - len(theirs["prompt_ids"]))  # fmt: skip


def test_conversational_pairs_train(sft, tmp_path):
    """`lora-jax train` on conversational pairs (zephyr's template) runs to the end, the
    first loss log 2, and the eval's reward accuracy is reported."""
    directory = with_template(sft, tmp_path, "zephyr")
    train = write_rows(tmp_path / "chat.jsonl", conversations(preference_rows(32)))
    out = tmp_path / "out"
    sets = {"model.path": directory, "data.train": train, "data.eval": train,
            "data.max_length": 48, "train.steps": 4, "data.template": "{prompt}"}  # fmt: skip
    args = dpo_sets(sft, tmp_path, out, **sets)
    assert cli_main(args) == 0
    assert abs(losses(out)[0] - math.log(2)) < 1e-6
    assert "rewards/accuracies" in json.loads((out / "eval.json").read_text())


@pytest.mark.parametrize("template, change, says", [
    ("zephyr", {"data.template": "Q: {prompt}"}, "data.template 'Q: {prompt}' adds text to it: "
     "set data.template to '{prompt}'"),
    ("zephyr", {"row": {"chosen": [{"role": "assistant"}]}},
     "chosen[0] is not a message with a string role and content"),
    ("zephyr", {"row": {"rejected": [{"role": "assistant", "content": " "}]}},
     "rejected is empty: a pair needs two responses"),
    ("zephyr", {"row": {"chosen": []}}, "chosen is not a list of messages"),
    ("mistral", {"row": {"prompt": [{"role": "assistant", "content": "w3"}]}},
     "the chat template fails: Conversation roles must alternate"),
    (None, {}, "has no chat template (tokenizer_config.json's chat_template, or "
     "chat_template.jinja): a conversational row needs one"),
])  # fmt: skip
def test_a_bad_conversational_row_is_one_line(sft, tmp_path, capsys, template, change, says):
    """A template that wraps the prompt, a message without content, a row the checkpoint's
    own template refuses, a checkpoint with no template: one line naming file and row, exit
    2, nothing written."""
    model = with_template(sft, tmp_path, template) if template else sft / "llama"
    rows = conversations(preference_rows(3))
    rows[-1].update(change.pop("row", {}))
    train = write_rows(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "out"
    sets = {"model.path": model, "data.train": train, "data.eval": train,
            "data.template": "{prompt}", "data.max_length": 64, **change}  # fmt: skip
    assert cli_main(dpo_sets(sft, tmp_path, out, **sets)) == 2
    line = one_line(capsys.readouterr().err)
    row = 1 if "data.template" in change or template is None else 3
    assert f"{train}:{row}: " in line and says in line, line
    assert not out.exists()


@pytest.mark.parametrize("change, says", [
    ({"lora.modules_to_save": ["lm_head"]},
     "lora.modules_to_save is ['lm_head']; must be empty with data.task 'dpo'"),
    ({"lora.init": "pissa"}, "lora.init is 'pissa'; rewrites the base (its residual)"),
])  # fmt: skip
def test_settings_that_leave_no_untouched_base_are_refused(sft, tmp_path, capsys, change, says):
    """The reference policy is the base as the step holds it: a fully trained leaf or a
    base rewritten at init would make it something else."""
    out = tmp_path / "out"
    assert cli_main(dpo_sets(sft, tmp_path, out, **change)) == 2
    line = one_line(capsys.readouterr().err)
    assert says in line, line
    assert not out.exists()


def test_the_shipped_dpo_config_reads_the_shipped_pairs():
    """configs/llama3_8b_dpo.py is a DPO run at 2 pairs a chip on 16 chips, and every row of
    its default data (the shipped arithmetic pairs) is a pair the task accepts."""
    config = RunConfig.from_dict(load_config(str(ROOT / "configs" / "llama3_8b_dpo.py")))
    assert (config.data.task, config.train.batch_size, config.data.max_length) == ("dpo", 32, 2048)
    for split in (config.data.train, config.data.eval):
        rows = read_rows(resolve(split))
        assert len(rows) >= 200
        for i, row in enumerate(rows):
            Dpo().check_row(row, f"{split}:{i + 1}", config.data, None)


def test_a_dpo_step_compiles_for_tpu_within_a_quarter_of_sfts_bytes(tmp_path):
    """The DPO step (policy forward and backward of both responses, the reference forward)
    compiled by the TPU compiler for a v5e:2x2 at the SFT step's tokens a chip: its bytes a
    chip within 1.25x of SFT's (the reference forward saves nothing for the backward)."""
    (tmp_path / "config.json").write_text(json.dumps(SMALL))
    sft_step = compile_cli(tmp_path, "v5e:2x2", **{"data.task": "sft", "data.max_length": 256,
                                                   "train.batch_size": 8})  # fmt: skip
    dpo_step = compile_cli(tmp_path, "v5e:2x2", **{"data.task": "dpo", "data.max_length": 128,
                                                   "train.batch_size": 8})  # fmt: skip
    assert sft_step.returncode == dpo_step.returncode == 0, dpo_step.stderr[-3000:]
    sft_report, dpo_report = json.loads(sft_step.stdout), json.loads(dpo_step.stdout)
    assert dpo_report["tokens_per_chip"] == sft_report["tokens_per_chip"] == 8 * 256 // 4
    assert dpo_report["base_bytes"] == sft_report["base_bytes"]  # one base, not two
    assert dpo_report["bytes"] <= 1.25 * sft_report["bytes"], (dpo_report, sft_report)
