"""Bad input: a ValueError that names the path and says what to do, and nothing mutated."""

import copy

import jax
import jax.numpy as jnp
import pytest
from small_models import Stack, tokens

import lora_jax as lj

CONFIG = lj.LoraConfig(rank=4, targets=("all-linear",))


@pytest.fixture
def stack():
    model, x = Stack(), tokens(jax.random.key(0))
    variables = model.init(jax.random.key(1), x)
    layouts = lj.kernel_layouts(model, x)
    return variables, layouts, lj.init(jax.random.key(2), variables, CONFIG, layouts)


def snapshot(tree):
    return (
        jax.tree.structure(tree),
        [id(v) for v in jax.tree.leaves(tree)],
        copy.deepcopy(jax.tree.map(lambda v: v.shape, tree)),
    )


def raises(fn, tree, match):
    before = snapshot(tree)
    with pytest.raises(ValueError, match=match):
        fn()
    assert snapshot(tree) == before


def test_no_kernel_matches_lists_available_paths(stack):
    variables, layouts, _ = stack
    config = lj.LoraConfig(targets=("qproj",))
    raises(
        lambda: lj.init(jax.random.key(0), variables, config, layouts),
        variables,
        r"no kernel matches targets=\('qproj',\).*'layers/attn/q_proj'",
    )


def test_rank_too_large_names_path(stack):
    variables, layouts, _ = stack
    config = lj.LoraConfig(rank=9, targets=("q_proj",))  # q_proj is 16 -> (2, 4): 8 outputs
    raises(
        lambda: lj.init(jax.random.key(0), variables, config, layouts),
        variables,
        r"layers/attn/q_proj: rank 9 exceeds the kernel's smallest dimension min\(16, 8\)",
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0}, "must be an int >= 1"),
        ({"rank_pattern": {"q_proj": -2}}, "rank for 'q_proj' is -2"),
        ({"alpha": 0.0}, "must be a finite number > 0"),
        ({"alpha": float("inf")}, "must be a finite number > 0"),
        ({"dropout": 1.0}, r"must be in \[0, 1\)"),
        ({"init": "zeros"}, "choose one of"),
        ({"targets": ("q_proj[",)}, "not a valid regex"),
        ({"targets": ()}, "targets is empty"),
    ],
)
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lj.LoraConfig(**kwargs)


@pytest.mark.parametrize("target", ["embed", "norm"])
def test_target_on_a_leaf_that_is_not_a_kernel(stack, target):
    variables, layouts, _ = stack
    config = lj.LoraConfig(targets=(target, "q_proj"))
    raises(
        lambda: lj.init(jax.random.key(0), variables, config, layouts),
        variables,
        rf"target matches '[a-z_/]*{target}[a-z_]*', which holds .* but no kernel",
    )


def test_init_twice_is_refused(stack):
    _, layouts, params = stack
    raises(
        lambda: lj.init(jax.random.key(0), params, CONFIG, layouts),
        params,
        "already holds an adapter at 'layers/",
    )


def test_ambiguous_kernel_without_layouts(stack):
    variables, _, _ = stack
    raises(
        lambda: lj.init(jax.random.key(0), variables, CONFIG),
        variables,
        r"layers/\w+(/\w+)?: kernel shape .* is ambiguous.*lj.kernel_layouts",
    )


def test_target_both_adapted_and_saved(stack):
    variables, layouts, _ = stack
    config = lj.LoraConfig(targets=("up_proj",), modules_to_save=("up_proj",))
    raises(
        lambda: lj.init(jax.random.key(0), variables, config, layouts),
        variables,
        "layers/up_proj: both a LoRA target and in modules_to_save",
    )


def test_attach_with_wrong_shape(stack):
    variables, _, params = stack
    adapter = lj.split(params, CONFIG)[0]
    bad = jax.tree.map(lambda v: v, adapter)
    bad["params"]["layers"]["up_proj"]["lora_a"] = jnp.zeros((3, 15, 4))
    raises(
        lambda: lj.combine(bad, variables),
        variables,
        r"layers/up_proj: lora_a \(3, 15, 4\) and lora_b \(3, 4, 24\) do not fit kernel "
        r"\(3, 16, 24\)",
    )


def test_attach_with_unknown_path(stack):
    variables, _, params = stack
    adapter = lj.split(params, CONFIG)[0]
    adapter["params"]["layers"]["missing"] = adapter["params"]["layers"]["up_proj"]
    raises(lambda: lj.combine(adapter, variables), variables, "layers/missing: .*no such module")


def test_attach_with_half_an_adapter(stack):
    variables, _, params = stack
    adapter = lj.split(params, CONFIG)[0]
    del adapter["params"]["layers"]["up_proj"]["lora_b"]
    raises(lambda: lj.combine(adapter, variables), variables, "layers/up_proj: an adapter needs")


def test_combine_onto_a_tree_that_already_has_an_adapter(stack):
    _, _, params = stack
    adapter = lj.split(params, CONFIG)[0]
    raises(lambda: lj.combine(adapter, params), params, "combine: the tree already holds")


def test_combine_with_mismatched_saved_module():
    config = lj.LoraConfig(rank=2, targets=("up_proj",), modules_to_save=("lm_head",))
    model, x = Stack(), tokens(jax.random.key(0))
    variables = model.init(jax.random.key(1), x)
    params = lj.init(jax.random.key(2), variables, config, lj.kernel_layouts(model, x))
    adapter, _ = lj.split(params, config)
    adapter["params"]["lm_head"]["kernel"] = jnp.zeros((16, 12))
    raises(
        lambda: lj.combine(adapter, variables),
        variables,
        r"lm_head/kernel: adapter shape \(16, 12\) != base shape \(16, 11\)",
    )


def test_merge_without_adapter(stack):
    variables, _, _ = stack
    raises(lambda: lj.merge(variables, CONFIG), variables, "merge: the tree holds no lora_a")


def test_unmerge_of_a_tree_still_holding_the_adapter(stack):
    _, _, params = stack
    adapter = lj.split(params, CONFIG)[0]
    raises(lambda: lj.unmerge(params, adapter, CONFIG), params, "unmerge: the tree already holds")


def test_layout_that_does_not_fit_the_kernel(stack):
    variables, _, _ = stack
    layouts = {"layers/up_proj": (2, 2)}
    config = lj.LoraConfig(targets=("up_proj",))
    raises(
        lambda: lj.init(jax.random.key(0), variables, config, layouts),
        variables,
        r"layers/up_proj: layout \(2, 2\) does not fit kernel shape \(3, 16, 24\)",
    )
