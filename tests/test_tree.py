"""init / partition / split / merge / unmerge / summary / optimizer on parameter trees."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from small_models import CASES, FF, Mlp, Stack, features, randomize_adapters, tokens

import lora_jax as lj

CONFIG = lj.LoraConfig(rank=4, alpha=8.0, targets=("all-linear",))


def stack_params(config=CONFIG, dtype=jnp.float32):
    model, x = Stack(), tokens(jax.random.key(0))
    variables = jax.tree.map(lambda v: v.astype(dtype), model.init(jax.random.key(1), x))
    return (
        model,
        x,
        variables,
        lj.init(jax.random.key(2), variables, config, lj.kernel_layouts(model, x)),
    )


def flat(tree):
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_init_adds_factors_beside_each_kernel_and_shares_base_buffers():
    _, _, variables, params = stack_params()
    before, after = flat(variables), flat(params)
    assert all(after[k] is v for k, v in before.items())  # same buffers, no copies
    added = {k: v for k, v in after.items() if k not in before}
    q = "['params']['layers']['attn']['q_proj']"
    assert added[q + "['lora_a']"].shape == (3, 16, 4)  # layers, in, r
    assert added[q + "['lora_b']"].shape == (3, 4, 2, 4)  # layers, r, heads, head_dim
    o = "['params']['layers']['attn']['o_proj']"
    assert added[o + "['lora_a']"].shape == (3, 2, 4, 4) and added[o + "['lora_b']"].shape == (
        3,
        4,
        16,
    )
    assert "['params']['lm_head']['lora_a']" not in added  # all-linear leaves the head alone
    assert len(added) == 2 * 7
    for k, v in added.items():
        assert v.dtype == jnp.float32
        if k.endswith("['lora_b']"):
            assert not np.any(v)
        else:
            assert np.std(v) > 0


@pytest.mark.parametrize("init", ["gaussian", "pissa"])
def test_init_reports_its_progress_over_the_targets(init):
    """`progress` wraps the targets (a tqdm bar in lora-jax train): each one passes through it
    once, and wrapping changes nothing in the result."""
    config = lj.LoraConfig(rank=4, alpha=8.0, targets=("all-linear",), init=init)
    model, x = Stack(), tokens(jax.random.key(0))
    params, layouts = model.init(jax.random.key(1), x), lj.kernel_layouts(model, x)
    seen = []

    def progress(targets):
        for target in targets:
            seen.append(target)
            yield target

    got = lj.init(jax.random.key(0), params, config, layouts, progress=progress)
    assert len(seen) == len(lj.targets(params, config)) > 1
    jax.tree.map(np.testing.assert_array_equal, got,
                 lj.init(jax.random.key(0), params, config, layouts))  # fmt: skip


def test_gaussian_and_kaiming_inits_follow_peft():
    kernel = {"proj": {"kernel": jnp.zeros((400, 300))}}
    a = lj.init(jax.random.key(0), kernel, lj.LoraConfig(rank=8, targets=("proj",)))["proj"][
        "lora_a"
    ]
    assert abs(float(np.std(a)) - 1 / 8) < 0.01  # N(0, 1/r)
    config = lj.LoraConfig(rank=8, targets=("proj",), init="kaiming")
    a = lj.init(jax.random.key(0), kernel, config)["proj"]["lora_a"]
    bound = 1 / np.sqrt(400)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound  # U(±1/sqrt(fan_in))


def test_each_adapter_init_depends_on_its_path_only():
    _, _, variables, _ = stack_params()
    layouts = lj.kernel_layouts(Stack(), tokens(jax.random.key(0)))
    one = lj.init(jax.random.key(2), variables, lj.LoraConfig(targets=("q_proj",)), layouts)
    two = lj.init(
        jax.random.key(2), variables, lj.LoraConfig(targets=("q_proj", "v_proj")), layouts
    )
    q = lambda p: p["params"]["layers"]["attn"]["q_proj"]["lora_a"]  # noqa: E731
    np.testing.assert_array_equal(q(one), q(two))


def test_rank_and_alpha_patterns_apply_per_path():
    config = lj.LoraConfig(
        rank=2,
        alpha=4.0,
        targets=("all-linear",),
        rank_pattern={"gate_proj": 6},
        alpha_pattern={"up_proj": 1.0},
    )
    _, _, _, params = stack_params(config)
    layers = params["params"]["layers"]
    assert (
        layers["gate_proj"]["lora_a"].shape[-1] == 6 and layers["up_proj"]["lora_a"].shape[-1] == 2
    )
    assert (
        config.scale_for("layers/up_proj", 2) == 0.5
        and config.scale_for("layers/gate_proj", 6) == 4 / 6
    )
    assert "layers/gate_proj" in lj.summary(params, config)


def test_presets_select_attention_and_linear_kernels():
    _, _, variables, _ = stack_params()
    attention = lj.targets(variables, lj.LoraConfig(targets=("attention",)))
    assert attention == sorted(f"layers/attn/{n}_proj" for n in "qkvo")
    linear = lj.targets(variables, lj.LoraConfig(targets=("all-linear",), exclude=("down",)))
    assert "lm_head" not in linear and "layers/down_proj" not in linear and len(linear) == 6


def test_partition_labels_and_optimizer_state_is_adapter_only():
    config = lj.LoraConfig(rank=4, targets=("all-linear",), modules_to_save=("lm_head",))
    params = stack_params(config)[3]
    labels = flat(lj.partition(params, config))
    trained = {k for k, v in labels.items() if v == "lora"}
    assert trained == {k for k in labels if "lora_" in k or "lm_head" in k}
    adapter = lj.split(params, config)[0]
    adapter_size = sum(v.size for v in jax.tree.leaves(adapter))
    tx = lj.optimizer(optax.adam(1e-2), params, config)
    state = tx.init(params)
    sizes = [v.size for v in jax.tree.leaves(state)]
    # Adam: mu and nu per trained element, plus one scalar step count.
    assert sum(sizes) == 2 * adapter_size + 1


def test_optimizer_steps_move_adapter_and_leave_base_bit_identical():
    config = lj.LoraConfig(rank=4, targets=("all-linear",), modules_to_save=("lm_head",))
    model, x, _, params = stack_params(config)
    tx = lj.optimizer(optax.adamw(1e-2), params, config)
    apply = lj.lora_apply(model.apply, config)

    @jax.jit
    def step(params, state):
        grads = jax.grad(lambda p: jnp.mean(apply(p, x) ** 2))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state, new = tx.init(params), params
    for _ in range(3):
        new, state = step(new, state)
    labels = flat(lj.partition(params, config))
    for key, old in flat(params).items():
        moved = flat(new)[key]
        if labels[key] == "frozen":
            assert np.asarray(moved).tobytes() == np.asarray(old).tobytes(), key
        else:
            assert np.abs(moved - old).max() > 0, key


@pytest.mark.parametrize("name", sorted(CASES))
def test_split_and_combine_are_exact_inverses(name):
    model, make_input = CASES[name]
    x = make_input(jax.random.key(0))
    variables = model.init(jax.random.key(1), x)
    # A head trained in full where the model has one: a pattern must match something.
    saved = ("lm_head",) if "lm_head" in variables["params"] else ()
    config = lj.LoraConfig(rank=2, targets=("all-linear",), modules_to_save=saved)
    params = lj.init(jax.random.key(2), variables, config, lj.kernel_layouts(model, x))
    adapter, base = lj.split(params, config)
    chex.assert_trees_all_equal_structs(lj.combine(adapter, base), params)
    assert all(
        a is b
        for a, b in zip(
            jax.tree.leaves(lj.combine(adapter, base)), jax.tree.leaves(params), strict=True
        )
    )
    assert all("lora_" in k or "lm_head" in k for k in flat(adapter))
    assert not any("lora_" in k or "lm_head" in k for k in flat(base))
    # The adapter alone goes onto a freshly loaded base, replacing the saved modules.
    attached = lj.combine(adapter, variables)
    assert flat(attached).keys() == flat(params).keys()
    assert all(flat(attached)[k] is v for k, v in flat(params).items())


def test_merge_gives_the_base_structure_and_matches_float64():
    _, _, variables, params = stack_params()
    params = randomize_adapters(params, jax.random.key(3))
    merged = lj.merge(params, CONFIG)
    assert jax.tree.structure(merged) == jax.tree.structure(variables)
    for m, v in zip(jax.tree.leaves(merged), jax.tree.leaves(variables), strict=True):
        assert m.shape == v.shape and m.dtype == v.dtype
    q = {
        k: np.asarray(v, np.float64)
        for k, v in params["params"]["layers"]["attn"]["q_proj"].items()
    }
    update = np.einsum("lir,lrhk->lihk", q["lora_a"], q["lora_b"])
    expected = q["kernel"] + 2.0 * update
    np.testing.assert_allclose(
        merged["params"]["layers"]["attn"]["q_proj"]["kernel"], expected, rtol=1e-6, atol=1e-6
    )
    # Untouched leaves are shared, not copied.
    assert merged["params"]["embed"]["embedding"] is variables["params"]["embed"]["embedding"]


def test_unmerge_restores_float32_base_within_documented_bound():
    _, _, variables, params = stack_params()
    params = randomize_adapters(params, jax.random.key(3), scale=0.5)
    adapter = lj.split(params, CONFIG)[0]
    restored = lj.unmerge(lj.merge(params, CONFIG), adapter, CONFIG)
    assert jax.tree.structure(restored) == jax.tree.structure(variables)
    eps = 2.0**-24
    merged_with_delta = flat(lj.merge(params, CONFIG))
    for key, w0 in flat(variables).items():
        delta = np.abs(np.asarray(merged_with_delta[key], np.float64) - np.asarray(w0, np.float64))
        bound = 2 * eps * (np.abs(w0) + 2 * delta) + 1e-30
        assert np.all(np.abs(np.asarray(flat(restored)[key], np.float64) - w0) <= bound), key
    # Round trip: attach the adapter again and the model is back to the trained one.
    assert flat(lj.combine(adapter, restored)).keys() == flat(params).keys()


def test_bfloat16_merge_is_within_one_rounding_of_float32_merge():
    _, _, variables, params = stack_params(dtype=jnp.bfloat16)
    params = randomize_adapters(params, jax.random.key(3), scale=0.5)
    merged = flat(lj.merge(params, CONFIG))
    as_f32 = jax.tree.map(lambda v: v.astype(jnp.float32), params)
    reference = flat(lj.merge(as_f32, CONFIG))
    for key, ref in reference.items():
        got = merged[key]
        assert got.dtype == jnp.bfloat16
        # One round-to-nearest to bfloat16: |err| <= 2^-8 |ref| (8 significand bits).
        err = np.abs(np.asarray(got, np.float32) - ref)
        assert np.all(err <= 2.0**-8 * np.abs(ref) + 1e-38), key
    restored = flat(lj.unmerge(lj.merge(params, CONFIG), lj.split(params, CONFIG)[0], CONFIG))
    for key, w0 in flat(variables).items():
        bound = 2 * 2.0**-8 * np.abs(reference[key]) + 1e-38
        assert np.all(
            np.abs(np.asarray(restored[key], np.float32) - np.asarray(w0, np.float32)) <= bound
        )


def test_merge_keeps_each_kernel_sharding():
    assert len(jax.devices()) == 8
    mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"))
    model, x = Mlp(), features(jax.random.key(0))
    config = lj.LoraConfig(rank=4, targets=("up_proj", "down_proj"))
    params = lj.init(jax.random.key(1), model.init(jax.random.key(2), x), config)
    params = randomize_adapters(params, jax.random.key(3))

    def place(path, leaf):
        adapted_kernel = path[-1].key == "kernel" and path[-2].key in ("up_proj", "down_proj")
        return jax.device_put(
            leaf, NamedSharding(mesh, P("fsdp", "tensor") if adapted_kernel else P())
        )

    sharded = jax.tree_util.tree_map_with_path(place, params)
    merged = lj.merge(sharded, config)
    for name in ("up_proj", "down_proj"):
        kernel = merged["params"][name]["kernel"]
        assert kernel.sharding == sharded["params"][name]["kernel"].sharding
        shard_shapes = {s.data.shape for s in kernel.addressable_shards}
        assert shard_shapes == {(kernel.shape[0] // 4, kernel.shape[1] // 2)}  # really split 4 x 2
    np.testing.assert_allclose(
        merged["params"]["up_proj"]["kernel"],
        lj.merge(params, config)["params"]["up_proj"]["kernel"],
        rtol=1e-6,
    )


def test_merge_is_jittable_and_differentiable():
    _, _, _, params = stack_params()
    merged = jax.jit(lj.merge, static_argnums=1)(params, CONFIG)
    assert jax.tree.structure(merged) == jax.tree.structure(lj.merge(params, CONFIG))
    grad = jax.grad(
        lambda p: jnp.sum(lj.merge(p, CONFIG)["params"]["layers"]["up_proj"]["kernel"])
    )(params)
    assert np.abs(grad["params"]["layers"]["up_proj"]["lora_a"]).max() == 0  # B = 0 at init
    assert np.abs(grad["params"]["layers"]["up_proj"]["lora_b"]).max() > 0


def test_summary_reports_counts_like_peft():
    config = lj.LoraConfig(rank=4, targets=("up_proj",), modules_to_save=("lm_head",))
    _, _, variables, params = stack_params(config)
    text = lj.summary(params, config)
    adapter = 3 * (16 * 4 + 4 * FF)
    head = 16 * 11 + 11
    total = sum(v.size for v in jax.tree.leaves(variables)) + adapter
    assert "layers/up_proj" in text and "(3, 16, 4)" in text and "lm_head/kernel" in text
    assert f"trainable params: {adapter + head:,} || all params: {total:,}" in text


def test_adapter_specs_follow_each_kernel_and_train_sharded():
    # Auto axes: XLA propagates shardings through the model (GSPMD), as in most JAX training.
    mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=(AxisType.Auto,) * 2)
    model, x = Stack(), tokens(jax.random.key(0), batch=4)
    config = lj.LoraConfig(rank=4, targets=("all-linear",), use_dora=True)
    variables = model.init(jax.random.key(1), x)
    params = lj.init(jax.random.key(2), variables, config, lj.kernel_layouts(model, x))
    params = randomize_adapters(params, jax.random.key(3))

    def base_spec(path, leaf):  # a rule a user would write: inputs over fsdp, outputs over tensor
        if path[-1].key != "kernel":
            return P()
        stacked = int(path[1].key == "layers")
        first, last = leaf.shape[stacked], leaf.shape[-1]
        middle = [None] * (leaf.ndim - stacked - 2)
        fsdp, tensor = "fsdp" if first % 4 == 0 else None, "tensor" if last % 2 == 0 else None
        return P(*([None] * stacked), fsdp, *middle, tensor)

    specs = lj.adapter_specs(params, jax.tree_util.tree_map_with_path(base_spec, variables))
    up = specs["params"]["layers"]["up_proj"]
    assert up["kernel"] == P(None, "fsdp", "tensor")
    assert up["lora_a"] == P(None, "fsdp", None)  # layer, input (as the kernel), rank
    assert up["lora_b"] == P(None, None, "tensor")  # layer, rank, output (as the kernel)
    assert up["lora_magnitude"] == P(None, "tensor")
    assert specs["params"]["layers"]["attn"]["q_proj"]["lora_b"] == P(None, None, None, "tensor")
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                             is_leaf=lambda s: isinstance(s, P))  # fmt: skip
    placed = jax.device_put(params, shardings)
    a = placed["params"]["layers"]["up_proj"]["lora_a"]
    assert {s.data.shape for s in a.addressable_shards} == {(3, 4, 4)}  # 16 inputs over 4
    adapter_shardings = lj.split(shardings, config)[0]
    apply = lj.lora_apply(model.apply, config)
    loss = lambda adapter, base: jnp.mean(apply(lj.combine(adapter, base), x) ** 2)  # noqa: E731
    adapter, base_params = lj.split(placed, config)
    grad = jax.jit(jax.value_and_grad(loss), out_shardings=(NamedSharding(mesh, P()),
                                                            adapter_shardings))  # fmt: skip
    value, grads = grad(adapter, base_params)
    ref_value, ref_grads = jax.value_and_grad(loss)(*lj.split(params, config))
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-4, atol=1e-6)
    assert grads["params"]["layers"]["up_proj"]["lora_a"].sharding.spec == P(None, "fsdp", None)
