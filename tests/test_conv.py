"""LoRA on convolutions (Linen nn.Conv, NNX nnx.Conv): the factored forward against the merged
kernel, and peft adapter files both ways with a torch twin (Conv2d, peft's Conv LoRA)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx
from jaxpr_check import factored_like_merged, kernel_shapes, leaves_named
from small_models import randomize_adapters, run_merged

import lora_jax as lj
from lora_jax import compose, io, models

CHANNELS = 3
NAMING = models.Naming()
TARGETS = ("conv1", "conv2", "proj", "head")
CONFIG = lj.LoraConfig(rank=2, alpha=4.0, targets=TARGETS)


class Cnn(nn.Module):
    """Two 3x3 convolutions (the second strided), a 1x1 projection, a pooled dense head."""

    @nn.compact
    def __call__(self, x):
        x = jax.nn.relu(nn.Conv(8, (3, 3), padding=1, name="conv1")(x))
        x = jax.nn.relu(nn.Conv(8, (3, 3), strides=2, padding=1, name="conv2")(x))
        x = nn.Conv(6, (1, 1), name="proj")(x)
        return nn.Dense(3, name="head")(x.mean((1, 2)))


class NnxCnn(nnx.Module):
    """`Cnn` written with NNX."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(CHANNELS, 8, (3, 3), padding=1, rngs=rngs)
        self.conv2 = nnx.Conv(8, 8, (3, 3), strides=2, padding=1, rngs=rngs)
        self.proj = nnx.Conv(8, 6, (1, 1), rngs=rngs)
        self.head = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.conv2(jax.nn.relu(self.conv1(x))))
        return self.head(self.proj(x).mean((1, 2)))


class TorchCnn(torch.nn.Module):
    """The twin: the same modules and names, NCHW."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(CHANNELS, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.proj = torch.nn.Conv2d(8, 6, 1)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):  # x: NHWC, as the Flax models take it
        x = torch.relu(self.conv1(x.permute(0, 3, 1, 2)))
        x = torch.relu(self.conv2(x))
        return self.head(self.proj(x).mean((2, 3)))


def images(seed=0, n=2, size=9):
    return np.random.RandomState(seed).randn(n, size, size, CHANNELS).astype(np.float32)


def twin_of(pure):
    twin = TorchCnn().eval()
    twin.load_state_dict({n: torch.tensor(np.asarray(t)) for n, t in NAMING.tensors(pure)})
    return twin


def torch_logits(model, x):
    with torch.no_grad():
        return model(torch.tensor(x)).numpy()


class Flax:
    """One of the two Flax CNNs behind one interface: its pure params, layouts, and outputs
    with an adapter (factored) or of a params tree (merged)."""

    def __init__(self, kind):
        self.kind, x = kind, images()
        if kind == "linen":
            self.model = Cnn()
            self.pure = self.model.init(jax.random.key(0), x)["params"]
            self.layouts = lj.kernel_layouts(self.model, x)
        else:
            self.model = NnxCnn(nnx.Rngs(0))
            self.pure = nnx.to_pure_dict(nnx.state(self.model))
            self.layouts = lj.kernel_layouts(self.model)

    def factored(self, params, config, x):
        if self.kind == "linen":
            return lj.lora_apply(self.model.apply, config)({"params": params}, x)
        return lj.nnx_adapt(self.model, params, config)(x)

    def plain(self, params, x):
        if self.kind == "linen":
            return self.model.apply({"params": params}, x)
        return run_merged(self.model, params, x)


KINDS = ("linen", "nnx")


@pytest.mark.parametrize("kind", KINDS)
def test_layouts_name_the_convolutions_and_factored_equals_merged(kind):
    flax_model, x = Flax(kind), images()
    assert flax_model.layouts == {"conv1": (3, 1), "conv2": (3, 1), "proj": (3, 1),
                                  "head": (1, 1)}  # fmt: skip
    assert isinstance(flax_model.layouts["conv2"], lj.ConvLayout)
    assert not isinstance(flax_model.layouts["head"], lj.ConvLayout)
    params = lj.init(jax.random.key(1), flax_model.pure, CONFIG, flax_model.layouts)
    assert params["conv2"]["lora_a"].shape == (3, 3, 8, 2)
    assert params["conv2"]["lora_b"].shape == (2, 8)
    np.testing.assert_allclose(flax_model.factored(params, CONFIG, x),
                               flax_model.plain(flax_model.pure, x), atol=1e-6)  # fmt: skip
    params = randomize_adapters(params, jax.random.key(2), 0.3)
    ours = flax_model.factored(params, CONFIG, x)
    merged = flax_model.plain(lj.merge(params, CONFIG), x)
    np.testing.assert_allclose(ours, merged, atol=1e-5)
    assert np.abs(ours - flax_model.plain(flax_model.pure, x)).max() > 1e-2  # not a no-op


@pytest.mark.parametrize("kind", KINDS)
def test_no_kernel_shaped_product_and_gradients_equal_the_merged_formulation(kind):
    flax_model, x = Flax(kind), images()
    params = lj.init(jax.random.key(1), flax_model.pure, CONFIG, flax_model.layouts)
    adapter, base = lj.split(randomize_adapters(params, jax.random.key(2), 0.3), CONFIG)

    def factored(adapter, base, x):
        return flax_model.factored(lj.combine(adapter, base), CONFIG, x)

    def merged(adapter, base, x):
        return flax_model.plain(lj.merge(lj.combine(adapter, base), CONFIG), x)

    args = (adapter, base, jnp.asarray(x))
    ab = (leaves_named(adapter, "lora_a"), leaves_named(adapter, "lora_b"), [args[2]])
    shapes = kernel_shapes(params)
    assert (3, 3, 8, 8) in shapes  # the conv2 kernel, whole
    factored_like_merged(factored, merged, args, *ab, shapes)


@pytest.mark.filterwarnings("ignore:left unquantized")  # the 3-way head
@pytest.mark.parametrize("dora", [False, True])
def test_convolutions_on_a_quantized_base_run_factored_like_merged(dora):
    # QLoRA: the conv kernels stored as NF4 codes, dequantized inside nn.Conv's own forward.
    flax_model, x = Flax("linen"), images()
    config = lj.LoraConfig(rank=2, alpha=4.0, targets=TARGETS, use_dora=dora)
    qbase = lj.quantize(flax_model.pure, config, block_size=2)
    assert isinstance(qbase["conv2"]["kernel"], lj.QuantizedKernel)
    params = lj.init(jax.random.key(1), qbase, config, flax_model.layouts)
    params = randomize_adapters(params, jax.random.key(2), 0.3)
    ours = flax_model.factored(params, config, x)
    np.testing.assert_allclose(ours, flax_model.plain(lj.merge(params, config), x), atol=1e-5)
    assert np.abs(ours - flax_model.plain(lj.dequantize(qbase), x)).max() > 1e-2


class Geometry(nn.Module):
    """One nn.Conv of the given settings."""

    conv: dict

    @nn.compact
    def __call__(self, x):
        return nn.Conv(name="conv", **self.conv)(x)


GEOMETRIES = {  # name: (nn.Conv settings, input shape)
    "1d dilated, SAME": (dict(kernel_size=(3,), kernel_dilation=2, padding="SAME"), (2, 11, 4)),
    "2d strided, VALID": (dict(kernel_size=(3, 2), strides=(2, 1), padding="VALID"), (2, 9, 8, 4)),
    "2d input-dilated": (
        dict(kernel_size=(3, 3), input_dilation=2, padding=((1, 2), (2, 1))),
        (2, 5, 5, 4),
    ),
    "2d circular": (dict(kernel_size=(3, 3), padding="CIRCULAR"), (2, 5, 5, 4)),
    "3d": (dict(kernel_size=(2, 2, 2)), (2, 4, 4, 4, 4)),
    "unbatched 2d": (dict(kernel_size=(3, 3)), (6, 6, 4)),
    "causal 1d, bfloat16": (
        dict(kernel_size=(3,), padding="CAUSAL", dtype=jnp.bfloat16),
        (2, 7, 4),
    ),
}


@pytest.mark.parametrize("name", GEOMETRIES)
def test_every_convolution_geometry_factored_equals_merged(name):
    settings, shape = GEOMETRIES[name]
    model = Geometry({"features": 5, **settings})
    x = jnp.asarray(np.random.RandomState(0).randn(*shape), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    layouts = lj.kernel_layouts(model, x)
    spatial = len(settings["kernel_size"])
    assert layouts == {"conv": lj.ConvLayout(spatial + 1, 1)}
    config = lj.LoraConfig(rank=2, alpha=4.0, targets=("conv",))
    params = randomize_adapters(lj.init(jax.random.key(1), variables, config, layouts),
                                jax.random.key(2), 0.3)  # fmt: skip
    ours = lj.lora_apply(model.apply, config)(params, x)
    merged = model.apply(lj.merge(params, config), x)
    assert ours.shape == merged.shape and ours.dtype == merged.dtype
    tol = 5e-2 if settings.get("dtype") == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.float32(ours), np.float32(merged), atol=tol)
    assert np.abs(np.float32(ours) - np.float32(model.apply(variables, x))).max() > 10 * tol


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_peft_conv_adapter_loads_with_peft_logits(kind, dora, tmp_path):
    flax_model, x = Flax(kind), images(seed=3)
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=2, lora_alpha=3, target_modules=list(TARGETS), use_dora=dora,
                          init_lora_weights=False)  # fmt: skip
    peer = peft.get_peft_model(twin_of(flax_model.pure), cfg).eval()
    if dora:  # magnitudes away from their initial norms, so that DoRA's rescaling shows
        with torch.no_grad():
            for name, p in peer.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(1 + 0.2 * torch.rand_like(p))
    peer.save_pretrained(tmp_path)
    theirs = torch_logits(peer, x)
    adapter, config = lj.load_adapter(tmp_path, flax_model.pure, flax_model.layouts,
                                      naming=NAMING)  # fmt: skip
    assert adapter["conv1"]["lora_a"].shape == (3, 3, CHANNELS, 2)
    assert config.use_dora == dora
    params = lj.combine(adapter, flax_model.pure)
    ours = np.asarray(flax_model.factored(params, config, x))
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert np.abs(ours - np.asarray(flax_model.plain(flax_model.pure, x))).max() > 1e-2
    # io.read_adapter reads it without the base: kernels (*spatial, in, out) from the factors.
    read, _ = io.read_adapter(tmp_path, naming=NAMING)
    assert read["conv2"]["kernel"].shape == (3, 3, 8, 8)
    # The merge is one kernel, peft's merge_and_unload's.
    merged = dict(NAMING.tensors(lj.merge(params, config)))
    for name, tensor in peer.merge_and_unload().state_dict().items():
        np.testing.assert_allclose(merged[name], tensor.numpy(), atol=1e-5, err_msg=name)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_our_conv_adapter_loads_in_peft_and_comes_back_whole(kind, dora, tmp_path):
    flax_model, x = Flax(kind), images(seed=4)
    config = lj.LoraConfig(rank=2, alpha=4.0, targets=TARGETS, use_dora=dora)
    params = lj.init(jax.random.key(1), flax_model.pure, config, flax_model.layouts)
    params = randomize_adapters(params, jax.random.key(2), 0.3)
    adapter = lj.split(params, config)[0]
    lj.save_adapter(tmp_path / "ours", adapter, config, naming=NAMING, base=flax_model.pure,
                    layouts=flax_model.layouts)  # fmt: skip
    peer = peft.PeftModel.from_pretrained(twin_of(flax_model.pure), tmp_path / "ours").eval()
    ours = np.asarray(flax_model.factored(params, config, x))
    np.testing.assert_allclose(torch_logits(peer, x), ours, atol=1e-4)
    assert np.abs(ours - np.asarray(flax_model.plain(flax_model.pure, x))).max() > 1e-2
    peer.save_pretrained(tmp_path / "via_peft")
    back, back_config = lj.load_adapter(tmp_path / "via_peft", flax_model.pure,
                                        flax_model.layouts, naming=NAMING)  # fmt: skip
    jax.tree.map(np.testing.assert_array_equal, back, adapter)  # exactly the factors saved
    assert back_config.use_dora == dora


def test_grouped_and_masked_convolutions_are_refused_naming_the_path():
    class Odd(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(4, (3, 3), feature_group_count=2, name="grouped")(x)
            return nn.Conv(4, (3, 3), mask=jnp.ones((3, 3, 4, 4)), name="masked")(x)

    model, x = Odd(), jnp.ones((1, 5, 5, 4))
    layouts = lj.kernel_layouts(model, x)
    assert "grouped convolution (feature_group_count=2)" in layouts["grouped"]
    assert "masked convolution" in layouts["masked"]
    variables = model.init(jax.random.key(0), x)
    config = lj.LoraConfig(rank=2, targets=("grouped",))
    with pytest.raises(ValueError, match=r"grouped: cannot be adapted: a grouped convolution"):
        lj.init(jax.random.key(1), variables, config, layouts)
    # Given a layout by hand, init adds the factors, and the forward refuses them by path.
    params = lj.init(jax.random.key(1), variables, config, {"grouped": (3, 1)})
    with pytest.raises(ValueError, match=r"grouped: holds a LoRA adapter, but a grouped conv"):
        lj.lora_apply(model.apply, config)(params, x)
    grouped = nnx.Conv(4, 4, (3, 3), feature_group_count=2, rngs=nnx.Rngs(0))
    assert "grouped convolution" in lj.kernel_layouts(grouped)[""]


def test_routing_a_bank_through_a_convolution_is_refused_naming_the_path():
    flax_model, x = Flax("linen"), images()
    params = lj.init(jax.random.key(1), flax_model.pure, CONFIG, flax_model.layouts)
    adapter = lj.split(params, CONFIG)[0]
    bank, config = compose.stack([adapter, adapter], [CONFIG, CONFIG], base=flax_model.pure)
    routed = lj.routed_apply(flax_model.model.apply, config)
    with pytest.raises(ValueError, match=r"conv1: routing needs nn.Dense/DenseGeneral; this one "
                                         r"is nn.Conv"):  # fmt: skip
        routed({"params": lj.combine(bank, flax_model.pure)}, x, adapter_ids=jnp.array([0, 1]))


@pytest.mark.parametrize("kind", KINDS)
def test_adalora_conv_adapters_go_both_ways_with_peft(kind, tmp_path):
    """peft's SVDConv2d stores A flat, (r, in·kh·kw): a peft AdaLoRA adapter on the twin's
    convolutions (some ranks pruned) gives peft's logits here, and ours give ours in peft."""
    flax_model, x = Flax(kind), images(seed=5)
    torch.manual_seed(0)
    cfg = peft.AdaLoraConfig(init_r=3, target_r=1, total_step=10, lora_alpha=4,
                             target_modules=list(TARGETS))  # fmt: skip
    peer = peft.get_peft_model(twin_of(flax_model.pure), cfg).eval()
    with torch.no_grad():
        for name, p in peer.named_parameters():
            if "lora_" in name:  # E away from zero, its first entry pruned
                p.copy_(torch.randn_like(p) * (0.3 if "lora_E" not in name else 1.0))
            if "lora_E" in name:
                p[0] = 0.0
    peer.base_model.peft_config["default"].rank_pattern = {
        f"{m}.lora_E": [False, True, True] for m in TARGETS
    }
    peer.save_pretrained(tmp_path / "theirs")
    adapter, config = lj.load_adapter(tmp_path / "theirs", flax_model.pure, flax_model.layouts,
                                      naming=NAMING)  # fmt: skip
    assert adapter["conv1"]["lora_a"].shape == (3, 3, CHANNELS, 3) and config.adalora
    params = lj.combine(adapter, flax_model.pure)
    ours = np.asarray(flax_model.factored(params, config, x))
    np.testing.assert_allclose(ours, torch_logits(peer, x), atol=1e-4)
    assert np.abs(ours - np.asarray(flax_model.plain(flax_model.pure, x))).max() > 1e-2

    lj.save_adapter(tmp_path / "ours", adapter, config, naming=NAMING, base=flax_model.pure,
                    layouts=flax_model.layouts)  # fmt: skip
    again = peft.PeftModel.from_pretrained(twin_of(flax_model.pure), tmp_path / "ours").eval()
    np.testing.assert_allclose(torch_logits(again, x), ours, atol=1e-4)
