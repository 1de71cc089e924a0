"""The factored forward for Flax NNX models, against the merged model, the same model written
with Linen, and peft on its torch twin; sharded over 8 devices like one."""

import dataclasses
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from jaxpr_check import factored_like_merged, kernel_shapes, leaves_named
from small_models import randomize_adapters, run_merged

import lora_jax as lj
from lora_jax import compose, models, sharding

VOCAB, D, HEADS, HEAD_DIM, FF, LAYERS = 13, 16, 2, 4, 24, 2
CONFIG = lj.LoraConfig(rank=2, alpha=4.0, targets=(r"layers/(q|k|v|o|up|down)$",))
NAMING = models.Naming(layers="layers")  # torch numbers the scanned layers under "layers"


def attention(q, k, v):
    t = q.shape[1]
    scores = jnp.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(HEAD_DIM)
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e9)
    return jnp.einsum("bhqs,bshk->bqhk", jax.nn.softmax(scores), v)


class Block(nnx.Module):
    """Attention through LinearGeneral (several output axes for q/k/v, several input for o),
    an Einsum up-projection and a Linear down-projection."""

    def __init__(self, rngs: nnx.Rngs):
        self.norm = nnx.RMSNorm(D, rngs=rngs)
        general = lambda: nnx.LinearGeneral(D, (HEADS, HEAD_DIM), use_bias=False, rngs=rngs)  # noqa: E731
        self.q, self.k, self.v = general(), general(), general()
        self.o = nnx.LinearGeneral((HEADS, HEAD_DIM), D, axis=(-2, -1), use_bias=False, rngs=rngs)
        self.up = nnx.Einsum("btd,df->btf", (D, FF), rngs=rngs)
        self.down = nnx.Linear(FF, D, rngs=rngs)

    def __call__(self, x):
        h = self.norm(x)
        x = x + self.o(attention(self.q(h), self.k(h), self.v(h)))
        return x + self.down(jax.nn.gelu(self.up(x)))


class Model(nnx.Module):
    """Embedding, LAYERS blocks stacked by nnx.vmap and run by nnx.scan over nnx.remat, head."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)

        @nnx.split_rngs(splits=LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stack(rngs):
            return Block(rngs)

        self.layers = stack(rngs)
        self.head = nnx.Linear(D, VOCAB, rngs=rngs)

    def __call__(self, tokens):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        @nnx.remat
        def body(x, block):
            return block(x)

        return self.head(body(self.embed(tokens), self.layers))


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.RMSNorm(name="norm")(x)
        general = lambda n: nn.DenseGeneral((HEADS, HEAD_DIM), use_bias=False, name=n)  # noqa: E731
        o = nn.DenseGeneral(D, axis=(-2, -1), use_bias=False, name="o")
        x = x + o(attention(general("q")(h), general("k")(h), general("v")(h)))
        up = nn.Einsum((D, FF), "btd,df->btf", use_bias=False, name="up")
        return x + nn.Dense(D, name="down")(jax.nn.gelu(up(x))), None


class LinenModel(nn.Module):
    """The same model written with Linen: its params tree has the NNX pure dict's paths."""

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCAB, D, name="embed")(tokens)
        scan = nn.scan(nn.remat(LinenBlock), variable_axes={"params": 0},
                       split_rngs={"params": True}, length=LAYERS)  # fmt: skip
        x, _ = scan(name="layers")(x, None)
        return nn.Dense(VOCAB, name="head")(x)


class TorchBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.RMSNorm(D, eps=1e-6)
        linear = lambda i, o, bias=False: torch.nn.Linear(i, o, bias=bias)  # noqa: E731
        self.q, self.k, self.v = (linear(D, HEADS * HEAD_DIM) for _ in range(3))
        self.o, self.up, self.down = linear(HEADS * HEAD_DIM, D), linear(D, FF), linear(FF, D, True)

    def forward(self, x):
        b, t, _ = x.shape
        h = self.norm(x)
        q, k, v = (m(h).view(b, t, HEADS, HEAD_DIM) for m in (self.q, self.k, self.v))
        scores = torch.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(HEAD_DIM)
        scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), -1e9)
        heads = torch.einsum("bhqs,bshk->bqhk", scores.softmax(-1), v).reshape(b, t, -1)
        x = x + self.o(heads)
        return x + self.down(torch.nn.functional.gelu(self.up(x), approximate="tanh"))


class TorchModel(torch.nn.Module):
    """The torch twin: the same module names, so peft's files name our paths."""

    def __init__(self, pure):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, D)
        self.layers = torch.nn.ModuleList([TorchBlock() for _ in range(LAYERS)])
        self.head = torch.nn.Linear(D, VOCAB)
        t = lambda a: torch.tensor(np.asarray(a))  # noqa: E731
        head = pure["head"]
        weights = {"embed.weight": t(pure["embed"]["embedding"]),
                   "head.weight": t(head["kernel"]).T, "head.bias": t(head["bias"])}  # fmt: skip
        for i in range(LAYERS):
            layer = jax.tree.map(lambda a, i=i: a[i], pure["layers"])
            # torch Linear weights are (out, in), with several kernel axes flattened row-major.
            kernels = {n: layer[n]["kernel"] for n in ("q", "k", "v", "up", "down")}
            kernels["o"] = layer["o"]["kernel"].reshape(HEADS * HEAD_DIM, D)
            for n, kernel in kernels.items():
                weights[f"layers.{i}.{n}.weight"] = t(kernel.reshape(kernel.shape[0], -1)).T
            weights[f"layers.{i}.norm.weight"] = t(layer["norm"]["scale"])
            weights[f"layers.{i}.down.bias"] = t(layer["down"]["bias"])
        self.load_state_dict(weights)

    def forward(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def setup(seed=0):
    """(NNX model, its pure dict with random non-zero adapters, tokens)."""
    model = Model(nnx.Rngs(seed))
    pure = nnx.to_pure_dict(nnx.state(model))
    params = lj.init(jax.random.key(1), pure, CONFIG, lj.kernel_layouts(model))
    tokens = jax.random.randint(jax.random.key(2), (3, 7), 0, VOCAB)
    return model, randomize_adapters(params, jax.random.key(3), 0.3), tokens


def test_layouts_come_from_the_modules_and_match_linen():
    model, _, tokens = setup()
    layouts = lj.kernel_layouts(model)
    assert layouts["layers/q"] == (1, 2) and layouts["layers/o"] == (2, 1)
    assert layouts["layers/up"] == (1, 1) and layouts["head"] == (1, 1)
    assert layouts == lj.kernel_layouts(LinenModel(), tokens)


def test_factored_forward_equals_merged_model_and_starts_at_the_base():
    model, params, tokens = setup()
    adapted = lj.nnx_adapt(model, params, CONFIG)
    factored = nnx.jit(lambda m, t: m(t))(adapted, tokens)
    merged = run_merged(model, lj.merge(params, CONFIG), tokens)
    base = model(tokens)
    # float32: the two orders of summation differ by ~1e-6 relative.
    np.testing.assert_allclose(factored, merged, rtol=1e-5, atol=1e-5 * np.abs(merged).max())
    assert np.abs(factored - base).max() > 1e-2  # the adapter contributes
    # The copy's state is the same tree; the original model is untouched.
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(adapted)), params)
    assert type(model.layers.q) is nnx.LinearGeneral and not hasattr(model.layers.q, "lora_a")
    assert type(adapted.layers.q).__name__ == "LoRALinearGeneral"
    fresh = lj.init(jax.random.key(1), nnx.to_pure_dict(nnx.state(model)), CONFIG,
                    lj.kernel_layouts(model))  # fmt: skip
    np.testing.assert_array_equal(lj.nnx_adapt(model, fresh, CONFIG)(tokens), base)
    # The State itself serves as the tree too: it is read as its pure dict.
    from_state = lj.init(jax.random.key(1), nnx.state(model), CONFIG, lj.kernel_layouts(model))
    jax.tree.map(np.testing.assert_array_equal, from_state, fresh)
    again = lj.nnx_adapt(model, nnx.state(adapted), CONFIG)(tokens)
    np.testing.assert_array_equal(again, adapted(tokens))


def test_no_kernel_shaped_product_and_gradients_equal_the_merged_formulation():
    model, params, tokens = setup()
    adapter, base = lj.split(params, CONFIG)

    def factored(adapter, base, tokens):
        return lj.nnx_adapt(model, lj.combine(adapter, base), CONFIG)(tokens)

    def merged(adapter, base, tokens):
        return run_merged(model, lj.merge(lj.combine(adapter, base), CONFIG), tokens)

    args = (adapter, base, tokens)
    ab = (leaves_named(adapter, "lora_a"), leaves_named(adapter, "lora_b"), [tokens])
    g_f = factored_like_merged(factored, merged, args, *ab, kernel_shapes(params))
    # NNX's own idiom, a pure function of the split state, gives the same gradients.
    graphdef, lora, rest = nnx.split(lj.nnx_adapt(model, params, CONFIG), nnx.LoRAParam, ...)
    nnx_loss = lambda lora, rest: jnp.mean(nnx.merge(graphdef, lora, rest, copy=True)(tokens) ** 2)  # noqa: E731
    g_nnx = nnx.to_pure_dict(jax.jit(jax.grad(nnx_loss))(lora, rest))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), g_nnx, g_f)


def test_same_adapter_gradients_as_the_model_written_with_linen():
    model, params, tokens = setup()
    linen = LinenModel()
    init = linen.init(jax.random.key(0), tokens)
    shapes = lambda tree: jax.tree.map(jnp.shape, tree)  # noqa: E731
    assert shapes(init["params"]) == shapes(nnx.to_pure_dict(nnx.state(model)))
    adapter, base = lj.split(params, CONFIG)
    apply = lj.lora_apply(linen.apply, CONFIG)

    def linen_loss(adapter):
        return jnp.mean(apply({"params": lj.combine(adapter, base)}, tokens) ** 2)

    def nnx_loss(adapter):
        return jnp.mean(lj.nnx_adapt(model, lj.combine(adapter, base), CONFIG)(tokens) ** 2)

    g_linen = jax.jit(jax.grad(linen_loss))(adapter)
    g_nnx = jax.jit(jax.grad(nnx_loss))(adapter)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g_nnx, g_linen
    )


def test_peft_adapter_loads_into_the_nnx_model(tmp_path):
    model, _, tokens = setup()
    pure = nnx.to_pure_dict(nnx.state(model))
    twin = TorchModel(pure).eval()
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["q", "k", "o", "up", "down"],
                          init_lora_weights=False)  # fmt: skip
    peer = peft.get_peft_model(twin, cfg).eval()
    peer.save_pretrained(tmp_path)
    with torch.no_grad():
        theirs = peer(torch.tensor(np.asarray(tokens))).numpy()
    adapter, config = lj.load_adapter(tmp_path, pure, lj.kernel_layouts(model))
    ours = np.asarray(lj.nnx_adapt(model, lj.combine(adapter, pure), config)(tokens))
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert np.abs(ours - np.asarray(model(tokens))).max() > 1e-2


def test_nnx_adapter_saved_loads_in_peft(tmp_path):
    model, params, tokens = setup()
    pure = nnx.to_pure_dict(nnx.state(model))
    lj.save_adapter(tmp_path, lj.split(params, CONFIG)[0], CONFIG, naming=NAMING, base=pure)
    peer = peft.PeftModel.from_pretrained(TorchModel(pure).eval(), tmp_path).eval()
    with torch.no_grad():
        theirs = peer(torch.tensor(np.asarray(tokens))).numpy()
    ours = np.asarray(lj.nnx_adapt(model, params, CONFIG)(tokens))
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert np.abs(ours - np.asarray(model(tokens))).max() > 1e-2


RULES = (
    (r"layers/(q|k|v)/kernel$", ("fsdp", "tensor", None)),
    (r"layers/o/kernel$", ("tensor", None, "fsdp")),
    (r"layers/up/kernel$", ("fsdp", "tensor")),
    (r"layers/down/kernel$", ("tensor", "fsdp")),
)


def test_sharded_over_8_devices_adapters_follow_kernels_and_loss_equals_one_device():
    assert jax.device_count() == 8
    model, params, tokens = setup()
    mesh = sharding.make_mesh(fsdp=4, tensor=2)
    shardings = sharding.param_shardings(params, mesh, RULES)
    base_shardings = sharding.param_shardings(nnx.state(model), mesh, RULES)  # a State too
    assert base_shardings["layers"]["q"]["kernel"] == shardings["layers"]["q"]["kernel"]
    layers = shardings["layers"]
    # A: the kernel's layer and input axes, rank replicated; B: layer, rank, output axes.
    # A factor its kernel leaves whole over fsdp is split over fsdp on its kernel-facing
    # axis (ZeRO-3): q's B on its last output axis, o's A on its last input axis.
    assert layers["q"]["lora_a"].spec == PartitionSpec(None, "fsdp", None)
    assert layers["q"]["lora_b"].spec == PartitionSpec(None, None, "tensor", "fsdp")
    assert layers["o"]["lora_a"].spec == PartitionSpec(None, "tensor", "fsdp", None)
    assert layers["o"]["lora_b"].spec == PartitionSpec(None, None, "fsdp")
    placed = jax.device_put(params, shardings)
    adapter, base = lj.split(placed, CONFIG)
    batch = jax.device_put(tokens, NamedSharding(mesh, PartitionSpec()))

    def loss(adapter, base, tokens):
        logits = lj.nnx_adapt(model, lj.combine(adapter, base), CONFIG)(tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

    step = jax.jit(jax.value_and_grad(loss))
    value, grads = step(adapter, base, batch)
    assert grads["layers"]["q"]["lora_a"].sharding.is_equivalent_to(layers["q"]["lora_a"], 3)
    one = jax.devices()[0]
    value_1, grads_1 = step(
        *jax.device_put((lj.split(params, CONFIG)), one), jax.device_put(tokens, one)
    )
    np.testing.assert_allclose(value, value_1, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, grads_1
    )


def test_unsupported_modules_and_options_fail_naming_the_path():
    model, params, _ = setup()
    with pytest.raises(ValueError, match="dropout"):
        lj.nnx_adapt(model, params, lj.LoraConfig(rank=2, targets=("layers/q$",), dropout=0.1))
    conv = nnx.Sequential(nnx.ConvTranspose(3, 4, (3,), rngs=nnx.Rngs(0)))
    pure = nnx.to_pure_dict(nnx.state(conv))
    conv_params = lj.init(jax.random.key(0), pure, lj.LoraConfig(rank=1, targets=(".*",)),
                          {"layers/0": (2, 1)})  # fmt: skip
    with pytest.raises(ValueError, match=r"layers/0: holds a LoRA adapter, but ConvTranspose"):
        lj.nnx_adapt(conv, conv_params, lj.LoraConfig(rank=1, targets=(".*",)))
    wrong = lj.init(jax.random.key(1), nnx.to_pure_dict(nnx.state(model)), CONFIG,
                    {**lj.kernel_layouts(model), "layers/q": (2, 1)})  # fmt: skip
    with pytest.raises(ValueError, match=r"layers/q: adapter laid out for 2 input / 1 output"):
        lj.nnx_adapt(model, wrong, CONFIG)
    with pytest.raises(ValueError, match="no lora_a/lora_b"):
        lj.nnx_adapt(model, nnx.to_pure_dict(nnx.state(model)), CONFIG)


def test_tree_functions_and_dora_serve_the_nnx_tree():
    model, params, tokens = setup()
    base = nnx.to_pure_dict(nnx.state(model))
    labels = jax.tree.leaves(lj.partition(params, CONFIG))
    assert labels.count("lora") == 2 * 6 and "frozen" in labels
    # unmerge(merge) gives W0 back.
    restored = lj.unmerge(lj.merge(params, CONFIG), lj.split(params, CONFIG)[0], CONFIG)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), restored, base)
    # Two adapters composed exactly (cat) run factored like the sum of their merges.
    other = randomize_adapters(params, jax.random.key(7), 0.3)
    adapters = [lj.split(p, CONFIG)[0] for p in (params, other)]
    both, config = compose.cat(adapters, [CONFIG, CONFIG], base=base)
    summed = jax.tree.map(lambda a, b, w: a + b - w, lj.merge(params, CONFIG),
                          lj.merge(other, CONFIG), base)  # fmt: skip
    factored = lj.nnx_adapt(model, lj.combine(both, base), config)(tokens)
    np.testing.assert_allclose(factored, run_merged(model, summed, tokens), rtol=1e-5, atol=1e-5)
    # DoRA: the learned magnitude rides along as a third LoRAParam.
    dora = lj.LoraConfig(rank=2, alpha=4.0, targets=CONFIG.targets, use_dora=True)
    params = lj.init(jax.random.key(1), base, dora, lj.kernel_layouts(model))
    params = randomize_adapters(params, jax.random.key(3), 0.3)
    adapted = lj.nnx_adapt(model, params, dora)
    assert isinstance(adapted.layers.o.lora_magnitude, nnx.LoRAParam)
    merged = run_merged(model, lj.merge(params, dora), tokens)
    np.testing.assert_allclose(adapted(tokens), merged, rtol=1e-5, atol=1e-5 * np.abs(merged).max())


# Layers in an nnx.List (int keys, one module per layer) rather than a scanned stack: peft's
# numbered names then map to list items, both ways.
class ListBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.up, self.down = nnx.Linear(D, FF, rngs=rngs), nnx.Linear(FF, D, rngs=rngs)

    def __call__(self, x):
        return x + self.down(jax.nn.relu(self.up(x)))


class ListModel(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List([ListBlock(rngs) for _ in range(LAYERS)])
        self.head = nnx.Linear(D, 3, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class TorchListModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        block = lambda: torch.nn.ModuleDict({"up": torch.nn.Linear(D, FF),  # noqa: E731
                                             "down": torch.nn.Linear(FF, D)})  # fmt: skip
        self.layers = torch.nn.ModuleList([block() for _ in range(LAYERS)])
        self.head = torch.nn.Linear(D, 3)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer["down"](torch.relu(layer["up"](x)))
        return self.head(x)


def test_peft_adapters_both_ways_for_layers_in_an_nnx_list(tmp_path):
    model, naming = ListModel(nnx.Rngs(0)), models.Naming()
    base = nnx.to_pure_dict(nnx.state(model))
    assert 0 in base["layers"]  # int keys
    twin = TorchListModel().eval()
    twin.load_state_dict({n: torch.tensor(np.asarray(t)) for n, t in naming.tensors(base)})
    x = np.random.RandomState(0).randn(5, D).astype(np.float32)
    config = lj.LoraConfig(rank=2, alpha=4.0, targets=("up", "down"))
    params = randomize_adapters(lj.init(jax.random.key(1), base, config), jax.random.key(2), 0.3)
    lj.save_adapter(tmp_path / "ours", lj.split(params, config)[0], config, naming=naming,
                    base=base)  # fmt: skip
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert sorted(written["target_modules"]) == ["down", "up"]
    peer = peft.PeftModel.from_pretrained(twin, tmp_path / "ours").eval()
    with torch.no_grad():
        theirs = peer(torch.tensor(x)).numpy()
    ours = np.asarray(lj.nnx_adapt(model, params, config)(x))
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert np.abs(ours - np.asarray(model(x))).max() > 1e-2
    # peft's own adapter, read back onto the list.
    peer.save_pretrained(tmp_path / "theirs")
    adapter, loaded = lj.load_adapter(tmp_path / "theirs", base)
    assert set(adapter["layers"]) == {0, 1}
    from_state, _ = lj.load_adapter(tmp_path / "theirs", nnx.state(model))  # read as its dict
    jax.tree.map(np.testing.assert_array_equal, from_state, adapter)
    got = np.asarray(lj.nnx_adapt(model, lj.combine(adapter, base), loaded)(x))
    np.testing.assert_allclose(got, theirs, atol=1e-4)
    # A fully trained module inside the list (peft's modules_to_save) comes back onto its item.
    twin = TorchListModel().eval()
    twin.load_state_dict({n: torch.tensor(np.asarray(t)) for n, t in naming.tensors(base)})
    peer = peft.get_peft_model(twin, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["up"],
                                                     modules_to_save=["down"]))  # fmt: skip
    with torch.no_grad():
        for p in peer.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
        theirs = peer.eval()(torch.tensor(x)).numpy()
    peer.save_pretrained(tmp_path / "saved")
    adapter, loaded = lj.load_adapter(tmp_path / "saved", base)
    assert set(adapter["layers"][1]) == {"up", "down"}
    assert lj.partition(adapter, loaded)["layers"][1]["down"]["kernel"] == "lora"
    got = np.asarray(lj.nnx_adapt(model, lj.combine(adapter, base), loaded)(x))
    np.testing.assert_allclose(got, theirs, atol=1e-4)
    assert np.abs(got - np.asarray(model(x))).max() > 1e-2


def test_an_adalora_adapter_runs_factored_in_nnx():
    """AdaLoRA's E is an nnx.LoRAParam beside A and B, folded into A in the forward: the
    NNX model (stacked layers, LinearGeneral and Linear) gives the merged model's output."""
    config = dataclasses.replace(CONFIG, adalora=lj.AdaLora(target_rank=2, total_steps=10))
    model, _, tokens = setup()
    pure = nnx.to_pure_dict(nnx.state(model))
    params = lj.init(jax.random.key(1), pure, config, lj.kernel_layouts(model))
    params = randomize_adapters(params, jax.random.key(3), 0.3)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.linspace(-1.0, 1.0, x.size).reshape(x.shape) if p[-1].key == "lora_e"
        else x, params)  # fmt: skip
    adapted = lj.nnx_adapt(model, params, config)
    assert isinstance(adapted.layers.q.lora_e, nnx.LoRAParam)
    factored = adapted(tokens)
    merged = run_merged(model, lj.merge(params, config), tokens)
    np.testing.assert_allclose(factored, merged, rtol=1e-5, atol=1e-5 * np.abs(merged).max())
    assert np.abs(factored - model(tokens)).max() > 1e-2
