"""The train-step factory as a library: a plain Linen MLP, no config file, no runner."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from small_models import VOCAB, D, Mlp

import lora_jax as lj
from lora_jax.step import StepShardings, factors_only, make_step, opt_state_shardings

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
