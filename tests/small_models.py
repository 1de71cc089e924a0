"""Small Linen models covering every kernel kind LoRA adapts, and helpers shared by the tests."""

from __future__ import annotations

import math
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

D, HEADS, HEAD_DIM, FF, VOCAB = 16, 2, 4, 24, 11


class Mlp(nn.Module):
    """nn.Dense only, with an output head."""

    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(FF, name="up_proj")(x))
        h = nn.Dense(D, name="down_proj")(h)
        return nn.Dense(VOCAB, name="lm_head")(h)


class Attention(nn.Module):
    """DenseGeneral with several output axes (q, k), several input axes (o), and an Einsum (v)."""

    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        dense = lambda name: nn.DenseGeneral((HEADS, HEAD_DIM), dtype=self.dtype, name=name)  # noqa: E731
        q, k = dense("q_proj")(x), dense("k_proj")(x)
        v = nn.Einsum((D, HEADS, HEAD_DIM), "btd,dhk->bthk", dtype=self.dtype, name="v_proj")(x)
        weights = jax.nn.softmax(jnp.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(HEAD_DIM))
        o = jnp.einsum("bhqs,bshk->bqhk", weights, v)
        return nn.DenseGeneral(D, axis=(-2, -1), dtype=self.dtype, name="o_proj")(o)


class Block(nn.Module):
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x, _):
        x = x + Attention(self.dtype, name="attn")(nn.RMSNorm(name="attn_norm")(x))
        h = nn.RMSNorm(name="mlp_norm")(x)
        gate = nn.Dense(FF, dtype=self.dtype, name="gate_proj")(h)
        up = nn.Dense(FF, dtype=self.dtype, name="up_proj")(h)
        down = nn.Einsum((FF, D), "btf,fd->btd", dtype=self.dtype, name="down_proj")
        return x + down(nn.silu(gate) * up), None


class Stack(nn.Module):
    """A decoder-like stack: embedding, `nn.scan` over remat'd blocks, untied head."""

    layers: int = 3
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCAB, D, name="embed")(tokens)
        blocks = nn.scan(
            nn.remat(Block),
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            length=self.layers,
        )
        x, _ = blocks(self.dtype, name="layers")(x, None)
        return nn.Dense(VOCAB, dtype=self.dtype, name="lm_head")(nn.RMSNorm(name="norm")(x))


def tokens(key, batch=2, length=5):
    return jax.random.randint(key, (batch, length), 0, VOCAB)


def features(key, batch=2, length=5):
    return jax.random.normal(key, (batch, length, D))


# (model, example input) per kernel kind; the scanned stack holds all of them.
CASES = {
    "dense": (Mlp(), features),
    "dense_general_and_einsum": (Attention(), features),
    "scan": (Stack(), tokens),
}


def randomize_adapters(params, key, scale=0.1):
    """Non-zero A and B, so that tests see the adapter's contribution."""

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "lora_a" in name or "lora_b" in name:
            sub = jax.random.fold_in(key, zlib.crc32(name.encode()))  # same in every process
            return (scale * jax.random.normal(sub, leaf.shape)).astype(leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(fill, params)


def run_merged(model, merged, *inputs):
    """An unmodified NNX module on a merged pure dict: nnx.merge of its own graphdef."""
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, merged)
    return nnx.merge(graphdef, state)(*inputs)
