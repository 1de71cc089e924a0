"""Many adapters on one base in one batch (per-example routing), and swapping adapters
without recompiling, on the tiny Llama (scanned layers)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from small_models import randomize_adapters

import lora_jax as lj
from lora_jax import compose, models

CONFIGS = [
    lj.LoraConfig(rank=2, alpha=4.0, targets=("q_proj", "v_proj")),
    lj.LoraConfig(rank=4, alpha=8.0, targets=("all-linear",)),
    lj.LoraConfig(rank=3, alpha=5.0, targets=("q_proj", "k_proj", "o_proj"), use_rslora=True),
]
IDS = np.random.RandomState(0).randint(3, 96, (5, 7))


@pytest.fixture(scope="module")
def llama(checkpoints):
    model, params, _ = models.from_pretrained(checkpoints / "llama")
    layouts = lj.kernel_layouts(model, jnp.asarray(IDS))
    adapters = [
        lj.split(randomize_adapters(lj.init(jax.random.key(i), params, c, layouts),
                                      jax.random.key(10 + i), 0.3), c)[0]
        for i, c in enumerate(CONFIGS)
    ]  # fmt: skip
    return model, params, adapters


def test_routed_batch_equals_each_example_alone_with_its_adapter_merged(llama):
    model, params, adapters = llama
    stacked, config = compose.stack(adapters, CONFIGS, base=params)
    ids = jnp.array([0, 2, -1, 1, 2])
    routed = jax.jit(lj.routed_apply(model.apply, config))
    got = routed(lj.combine(stacked, params), IDS, adapter_ids=ids)
    for row, k in enumerate(ids.tolist()):
        alone = params if k < 0 else lj.merge(lj.combine(adapters[k], params), CONFIGS[k])
        want = model.apply(alone, IDS[row : row + 1])[0]
        np.testing.assert_allclose(got[row], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    base = model.apply(params, IDS)
    assert np.abs(got[0] - base[0]).max() > 1e-2  # the adapters matter


def test_swapping_adapters_and_ids_never_recompiles(llama, compilations):
    model, params, adapters = llama
    compiled = compilations
    # Single adapters of ranks 2, 4 and 3, each padded to rank 4: one compiled function.
    apply = jax.jit(lj.lora_apply(model.apply, lj.LoraConfig(rank=4, alpha=4.0)))
    outputs = []
    for adapter, config in zip(adapters, CONFIGS, strict=True):
        padded, _ = compose.cat([adapter], [config], rank=4, base=params)
        outputs.append(apply(lj.combine(padded, params), IDS))
    first = len(compiled)
    assert first >= 1
    # Different adapters, different outputs, the same program.
    assert np.abs(outputs[0] - outputs[1]).max() > 1e-2
    # ...while an unpadded rank-2 adapter has other shapes: the counter does see compiles.
    apply(lj.combine(adapters[0], params), IDS)
    assert len(compiled) > first
    # Routed: new ids and another stack of the same shapes reuse the compiled step.
    routed = jax.jit(lj.routed_apply(model.apply, lj.LoraConfig(rank=4, alpha=4.0)))
    stack_a, _ = compose.stack(adapters, CONFIGS, rank=4, base=params)
    stack_b, _ = compose.stack(adapters[::-1], CONFIGS[::-1], rank=4, base=params)
    routed(lj.combine(stack_a, params), IDS, adapter_ids=jnp.array([0, 1, 2, -1, 0]))
    before = len(compiled)
    routed(lj.combine(stack_b, params), IDS, adapter_ids=jnp.array([2, 2, 1, 0, -1]))
    assert len(compiled) == before


def test_routing_errors_are_clear(llama):
    model, params, adapters = llama
    stacked, config = compose.stack(adapters, CONFIGS, base=params)
    apply = lj.routed_apply(model.apply, config)
    with pytest.raises(ValueError, match="3 adapter ids for a batch of 5"):
        apply(lj.combine(stacked, params), IDS, adapter_ids=jnp.array([0, 1, 2]))
    with pytest.raises(ValueError, match="below the largest adapter rank, 4"):
        compose.stack(adapters, CONFIGS, rank=3, base=params)
    with pytest.raises(ValueError, match="below the adapters' total rank, 9"):
        compose.cat(adapters, CONFIGS, rank=8, base=params)


def test_a_bank_runs_only_under_routed_apply(llama):
    """A stack read as one adapter would be the adapters' mean: everything else refuses it."""
    model, params, adapters = llama
    bank, config = compose.stack(adapters, CONFIGS, base=params)
    banked = lj.combine(bank, params)
    key = jax.random.key(0)
    refusals = {
        "lora_apply": lambda: lj.lora_apply(model.apply, config)(banked, IDS),
        "merge": lambda: lj.merge(banked, config),
        "sites": lambda: lj.sites(banked),
        "cat": lambda: compose.cat([bank], [config], base=params),
        "stack": lambda: compose.stack([bank], [config], base=params),
        "svd": lambda: compose.svd([bank], [config], [1.0], base=params),
        "linear": lambda: compose.linear([bank], [config], [1.0], base=params),
        "ties": lambda: compose.ties([bank], [config], [1.0], 0.5, base=params),
        "magnitude_prune": lambda: compose.magnitude_prune(
            [bank], [config], [1.0], 0.5, base=params
        ),
        "dare_linear": lambda: compose.dare_linear(key, [bank], [config], [1.0], 0.5, base=params),
        "dare_ties": lambda: compose.dare_ties(key, [bank], [config], [1.0], 0.5, base=params),
        "scale": lambda: compose.scale(bank, 2.0),
        "negate": lambda: compose.negate(bank),
    }
    for name, refused in refusals.items():
        with pytest.raises(ValueError, match=r"lj\.routed_apply") as err:
            refused()
        assert "model/layers/" in str(err.value), name  # the module is named
    # ...and routed_apply refuses a plain adapter, which has no blocks to route.
    with pytest.raises(ValueError, match=r"gave lj\.routed_apply one adapter"):
        lj.routed_apply(model.apply, CONFIGS[0])(
            lj.combine(adapters[0], params), IDS, adapter_ids=jnp.zeros(5, jnp.int32)
        )
