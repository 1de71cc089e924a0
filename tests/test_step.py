"""The train-step factory as a library: a plain Linen MLP, no config file, no runner; and the
chunked token loss against the whole-batch one."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from small_models import VOCAB, D, Mlp, randomize_adapters

import lora_jax as lj
from lora_jax import models
from lora_jax.step import (
    StepShardings,
    factors_only,
    make_step,
    opt_state_shardings,
    token_terms,
)

CONFIG = lj.LoraConfig(rank=4, alpha=8.0, targets=("all-linear",), modules_to_save=("lm_head",))


def setup():
    model, x = Mlp(), jax.random.normal(jax.random.key(0), (64, D))
    labels = jnp.argmax(x[:, :VOCAB], -1)  # a function of the input to learn
    params = lj.init(jax.random.key(2), model.init(jax.random.key(1), x), CONFIG)
    apply = lj.lora_apply(model.apply, CONFIG)

    def loss(params, batch, rngs):
        logits = apply(params, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).sum(), len(
            batch["y"]
        )

    return params, {"x": x, "y": labels}, loss


def flat(tree):
    return {"/".join(map(str, k)): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_step_trains_a_plain_linen_mlp_with_a_head_only_phase_first():
    params, batch, loss = setup()
    adapter, base = lj.split(params, CONFIG)
    tx = optax.adam(1e-2)
    head_tx, full_tx = (factors_only(tx, adapter, CONFIG, frozen=f) for f in (True, False))
    head, full = make_step(loss, head_tx), make_step(loss, full_tx)
    opt_state = full_tx.init(adapter)  # one state for both phases
    before = {k: np.asarray(v) for k, v in flat(adapter).items()}
    first = None
    for i in range(20):
        adapter, opt_state, metrics = head(adapter, opt_state, base, batch, jnp.int32(i))
        first = first or float(metrics["loss"])
    moved = {k: np.abs(np.asarray(v) - before[k]).max() for k, v in flat(adapter).items()}
    assert all(moved[k] == 0 for k in moved if "lora_" in k)  # the factors stayed put
    assert all(moved[k] > 0 for k in moved if "lm_head" in k)  # the head learned
    for i in range(20, 200):
        adapter, opt_state, metrics = full(adapter, opt_state, base, batch, jnp.int32(i))
    assert float(metrics["loss"]) < 0.2 * first
    assert all(np.abs(np.asarray(v) - before[k]).max() > 0 for k, v in flat(adapter).items())


def test_micro_batches_and_shardings_give_the_one_batch_step():
    params, batch, loss = setup()
    adapter, base = lj.split(params, CONFIG)
    tx = optax.sgd(0.1)
    copy = jax.tree.map(jnp.copy, adapter)  # the step donates its adapter
    want, _, want_metrics = make_step(loss, tx)(copy, tx.init(copy), base, batch, 0)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    rep, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    adapter_s = jax.tree.map(lambda _: rep, adapter)
    shardings = StepShardings(adapter_s, opt_state_shardings(tx, adapter, adapter_s, rep),
                              jax.tree.map(lambda _: rep, base), rows, rep)  # fmt: skip
    step = make_step(loss, tx, accum=4, shardings=shardings)
    got, _, metrics = step(adapter, tx.init(adapter), base, jax.device_put(batch, rows), 0)
    np.testing.assert_allclose(metrics["loss"], want_metrics["loss"], rtol=1e-5)
    for k, v in flat(got).items():
        np.testing.assert_allclose(v, flat(want)[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert got["params"]["lm_head"]["kernel"].sharding == rep


def _logit_sizes(compiled, vocab):
    """Element counts of the float32 arrays with a vocabulary axis in a compiled HLO."""
    shapes = [
        [int(n) for n in s.split(",")] for s in re.findall(r"f32\[([\d,]+)\]", compiled.as_text())
    ]
    return [math.prod(s) for s in shapes if vocab in s]


def test_chunked_token_loss_equals_the_full_one_and_never_holds_all_logits(checkpoints):
    model, params, _ = models.from_pretrained(checkpoints / "llama")
    config = lj.LoraConfig(rank=4, alpha=8.0, targets=("all-linear",))
    ids = jax.random.randint(jax.random.key(0), (4, 16), 3, 96)
    params = lj.init(jax.random.key(1), params, config, lj.kernel_layouts(model, ids))
    adapter, base = lj.split(randomize_adapters(params, jax.random.key(2)), config)
    apply = lj.lora_apply(model.apply, config)
    weights = (jax.random.uniform(jax.random.key(3), (4, 15)) > 0.3).astype(jnp.float32)

    def full(a):  # the whole batch's float32 logits at once
        logits = apply(lj.combine(a, base), ids)[:, :-1].astype(jnp.float32)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
        correct = (jnp.argmax(logits, -1) == ids[:, 1:]).astype(jnp.float32)
        return jnp.sum(losses * weights), (jnp.sum(weights), jnp.sum(correct * weights))

    def chunked(a, chunk=16):  # 60 tokens in chunks of 16: the last one padded
        p = lj.combine(a, base)
        hidden = apply(p, ids, method="hidden")[:, :-1]
        head = functools.partial(apply, p, method="head")
        total, count, correct = token_terms(head, hidden, ids[:, 1:], weights, chunk=chunk)
        return total, (count, correct)

    (want, want_aux), want_grads = jax.value_and_grad(full, has_aux=True)(adapter)
    # Several chunks (checkpointed), and the whole batch as one chunk (not checkpointed).
    for got_fn in (chunked, functools.partial(chunked, chunk=1024)):
        (got, got_aux), got_grads = jax.value_and_grad(got_fn, has_aux=True)(adapter)
        # float32, summed in another order: 1e-6 relative on the loss, and on the gradients
        # 1e-5 of each leaf's largest entry.
        np.testing.assert_allclose(got, want, rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(got_aux), np.asarray(want_aux))
        for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
            np.testing.assert_allclose(g, w, atol=1e-5 * np.abs(w).max())
    # The compiled forward and backward: no float32 logits for the batch's tokens at once.
    all_logits = 4 * 15 * 96
    compiled = {f: jax.jit(jax.value_and_grad(f, has_aux=True)).lower(adapter).compile()
                for f in (full, chunked)}  # fmt: skip
    assert max(_logit_sizes(compiled[full], 96)) >= all_logits  # the check can see them
    assert max(_logit_sizes(compiled[chunked], 96)) < all_logits  # chunks, the (tied) table
