import flax.linen as nn, jax, jax.numpy as jnp, optax
import lora_jax as lj

class Mlp(nn.Module):  # any Linen model: Dense, DenseGeneral, Einsum, nn.scan stacks
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(64, name="up_proj")(x))
        return nn.Dense(2, name="lm_head")(nn.Dense(32, name="down_proj")(h))

model, x = Mlp(), jax.random.normal(jax.random.key(0), (256, 16))
labels = (x[:, 0] * x[:, 1] > 0).astype(jnp.int32)
config = lj.LoraConfig(rank=4, alpha=8.0, targets=("all-linear",))  # lm_head stays frozen
params = lj.init(jax.random.key(1), model.init(jax.random.key(2), x), config)
print(lj.summary(params, config))
adapter, base = lj.split(params, config)    # differentiate w.r.t. the adapter only
apply = lj.lora_apply(model.apply, config)  # x·W0 + (α/r)·(x·A)·B, never W0 + A·B
tx = optax.adam(3e-3)

@jax.jit
def step(adapter, opt_state):
    loss = lambda a: optax.softmax_cross_entropy_with_integer_labels(
        apply(lj.combine(a, base), x), labels).mean()
    value, grads = jax.value_and_grad(loss)(adapter)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(adapter, updates), opt_state, value

opt_state = tx.init(adapter)
for i in range(301):
    adapter, opt_state, value = step(adapter, opt_state)
    if i % 100 == 0: print(f"step {i:3d}  loss {value:.4f}")
params = lj.combine(adapter, base)
merged = lj.merge(params, config)  # plain params: the unmodified model runs them at no extra cost
gap = jnp.abs(model.apply(merged, x) - apply(params, x)).max()
print(f"merged model vs factored forward: max |diff| = {gap:.1e}")
