import sys
import jax, jax.numpy as jnp, optax
from flax import nnx
import lora_jax as lj
from lora_jax import models

VOCAB, D, HEADS, HEAD_DIM, FF, LAYERS = 64, 32, 4, 8, 64, 2

class Block(nnx.Module):  # Llama-style: RMSNorm, causal attention, SwiGLU
    def __init__(self, rngs):
        self.attn_norm, self.mlp_norm = nnx.RMSNorm(D, rngs=rngs), nnx.RMSNorm(D, rngs=rngs)
        proj = lambda: nnx.LinearGeneral(D, (HEADS, HEAD_DIM), use_bias=False, rngs=rngs)
        self.q_proj, self.k_proj, self.v_proj = proj(), proj(), proj()
        self.o_proj = nnx.LinearGeneral((HEADS, HEAD_DIM), D, axis=(-2, -1), use_bias=False,
                                        rngs=rngs)
        self.gate_proj = nnx.Linear(D, FF, use_bias=False, rngs=rngs)
        self.up_proj = nnx.Linear(D, FF, use_bias=False, rngs=rngs)
        self.down_proj = nnx.Linear(FF, D, use_bias=False, rngs=rngs)

    def __call__(self, x):
        h = self.attn_norm(x)
        causal = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        x = x + self.o_proj(nnx.dot_product_attention(q, k, v, mask=causal))
        h = self.mlp_norm(x)
        return x + self.down_proj(nnx.silu(self.gate_proj(h)) * self.up_proj(h))

class Llama(nnx.Module):  # the layers stacked by nnx.vmap, run by nnx.scan over nnx.remat
    def __init__(self, rngs):
        self.embed_tokens = nnx.Embed(VOCAB, D, rngs=rngs)
        stack = nnx.split_rngs(splits=LAYERS)(nnx.vmap(Block, in_axes=0, out_axes=0))
        self.layers, self.norm = stack(rngs), nnx.RMSNorm(D, rngs=rngs)
        self.lm_head = nnx.Linear(D, VOCAB, use_bias=False, rngs=rngs)

    def __call__(self, tokens):
        layer = nnx.remat(lambda x, block: block(x))
        body = nnx.scan(layer, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        return self.lm_head(self.norm(body(self.embed_tokens(tokens), self.layers)))

model = Llama(nnx.Rngs(0))  # stands in for a pretrained model
config = lj.LoraConfig(rank=8, alpha=16.0, targets=("all-linear",))  # lm_head stays frozen
base = nnx.to_pure_dict(nnx.state(model))  # the tree every lj function works on
params = lj.init(jax.random.key(1), base, config, lj.kernel_layouts(model))
print(lj.summary(params, config))
lora = lj.nnx_adapt(model, params, config)  # a copy running x·W0 + (α/r)·(x·A)·B, never W0 + A·B
opt = nnx.Optimizer(lora, optax.adam(1e-2), wrt=nnx.LoRAParam)  # the frozen base is masked
tokens = (jnp.arange(32)[:, None] + 5 * jnp.arange(17)[None]) % VOCAB  # each row counts by 5

@nnx.jit
def step(lora, opt):
    def loss(lora):
        logits = lora(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(lora)
    opt.update(lora, grads)
    return value

for i in range(151):
    value = step(lora, opt)
    if i % 50 == 0: print(f"step {i:3d}  loss {value:.4f}")
trained = nnx.to_pure_dict(nnx.state(lora))  # the tree lj.init made, trained
graphdef, state = nnx.split(model)
nnx.replace_by_pure_dict(state, lj.merge(trained, config))
merged = nnx.merge(graphdef, state)  # the unmodified model: no extra cost
gap = jnp.abs(merged(tokens) - lora(tokens)).max()
print(f"merged model vs factored forward: max |diff| = {gap:.1e}")
out_dir = sys.argv[1] if len(sys.argv) > 1 else "nnx-adapter"
naming = models.Naming(layers="layers")  # peft names the modules layers.0.q_proj, ...
out = lj.save_adapter(out_dir, lj.split(trained, config)[0], config, naming=naming, base=base)
print(f"peft adapter written to {out}")
