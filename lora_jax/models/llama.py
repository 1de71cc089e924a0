"""Llama 2/3, Mistral and Qwen2 decoders, named like Hugging Face's modules.

One module tree serves all three: Qwen2 adds q/k/v biases, Mistral a sliding attention window,
Llama 3 its rope scaling. Params mirror transformers' names (model/layers/self_attn/q_proj,
...), with the layers stacked by nn.scan along a leading axis.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.models import common


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The architecture fields of a Llama/Mistral/Qwen2 config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Llama: bias on q, k, v and o
    qkv_bias: bool = False  # Qwen2: bias on q, k, v only
    mlp_bias: bool = False
    sliding_window: int | None = None
    hidden_act: str = "silu"

    @property
    def max_positions(self) -> int:
        """The context the checkpoint declares (RoPE itself has no table)."""
        return self.max_position_embeddings

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> LlamaConfig:
        """Reads transformers' config.json (v4 `rope_scaling` or v5 `rope_parameters`)."""
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"rope type {rope_type!r} is not supported (default, linear, llama3).")
        heads = hf["num_attention_heads"]
        window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            rope_type=rope_type,
            rope_factor=rope.get("factor", 1.0),
            low_freq_factor=rope.get("low_freq_factor", 1.0),
            high_freq_factor=rope.get("high_freq_factor", 4.0),
            original_max_position_embeddings=rope.get("original_max_position_embeddings", 8192),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=hf.get("attention_bias", False),
            qkv_bias=hf.get("model_type") == "qwen2",
            mlp_bias=hf.get("mlp_bias", False),
            sliding_window=window if hf.get("model_type") != "llama" else None,
            hidden_act=hf.get("hidden_act", "silu"),
        )


def inverse_frequencies(c: LlamaConfig) -> np.ndarray:
    """RoPE inverse frequencies, with Llama 3's long-context scaling where configured."""
    inv = 1.0 / c.rope_theta ** (np.arange(0, c.head_dim, 2, dtype=np.float64) / c.head_dim)
    if c.rope_type == "linear":
        return inv / c.rope_factor
    if c.rope_type == "llama3":
        old = c.original_max_position_embeddings
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / c.low_freq_factor, inv / c.rope_factor, inv)
        smooth = (old / wavelen - c.low_freq_factor) / (c.high_freq_factor - c.low_freq_factor)
        smoothed = (1 - smooth) * scaled / c.rope_factor + smooth * scaled
        medium = (wavelen >= old / c.high_freq_factor) & (wavelen <= old / c.low_freq_factor)
        return np.where(medium, smoothed, scaled)
    return inv


def rotate(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotary embedding in transformers' half-split layout, computed in float32."""
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


class LlamaAttention(common.Layer):
    @nn.compact
    def __call__(self, x, padding, positions):
        c = self.config
        bias = c.attention_bias or c.qkv_bias

        def proj(name, features, use_bias):
            return nn.Dense(features, use_bias=use_bias, dtype=self.dtype, name=name)

        def heads(name, count):
            return common.split_heads(proj(name, count * c.head_dim, bias)(x), count)

        q = heads("q_proj", c.num_attention_heads)
        k, v = heads("k_proj", c.num_key_value_heads), heads("v_proj", c.num_key_value_heads)
        inv_freq = inverse_frequencies(c)
        q, k = rotate(q, positions, inv_freq), rotate(k, positions, inv_freq)
        out = common.attend(q, k, v, padding, causal=True, window=c.sliding_window,
                            implementation=self.attention_impl, cache=self)  # fmt: skip
        out = common.merge_heads(out)
        return proj("o_proj", c.hidden_size, c.attention_bias)(out)


class LlamaMLP(common.Layer):
    @nn.compact
    def __call__(self, x):
        c = self.config

        def proj(name, features):
            return nn.Dense(features, use_bias=c.mlp_bias, dtype=self.dtype, name=name)

        gate = common.activation(c.hidden_act)(proj("gate_proj", c.intermediate_size)(x))
        return proj("down_proj", c.hidden_size)(gate * proj("up_proj", c.intermediate_size)(x))


class LlamaDecoderLayer(common.Layer):
    @nn.compact
    def __call__(self, x, padding, positions):
        c = self.config
        norm = lambda name: nn.RMSNorm(c.rms_norm_eps, dtype=self.dtype, name=name)  # noqa: E731
        attn = LlamaAttention(c, self.dtype, self.attention_impl, name="self_attn")
        x = x + attn(norm("input_layernorm")(x), padding, positions)
        x = x + LlamaMLP(c, self.dtype, name="mlp")(norm("post_attention_layernorm")(x))
        return x, None


class LlamaModel(common.ZooModel):
    config: LlamaConfig

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype)
        stack = common.scanned(LlamaDecoderLayer, c.num_hidden_layers, self.remat, broadcast=2)
        self.layers = stack(c, self.dtype, self.attention_impl)
        self.norm = nn.RMSNorm(c.rms_norm_eps, dtype=self.dtype)

    def __call__(self, input_ids, attention_mask=None, positions=None):
        positions = common.positions_or_default(input_ids, positions)
        x, _ = self.layers(self.embed_tokens(input_ids), attention_mask, positions)
        return self.norm(x)


class LlamaForCausalLM(common.ZooModel):
    """Token ids (B, T) -> logits (B, T, vocab). `attention_mask` (B, T): 1 for real tokens."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, positions=None):
        c = self.config
        model = LlamaModel(c, self.dtype, self.remat, self.attention_impl, name="model")
        hidden = model(input_ids, attention_mask, positions)
        if c.tie_word_embeddings:
            return model.embed_tokens.attend(hidden)
        return nn.Dense(c.vocab_size, use_bias=False, dtype=self.dtype, name="lm_head")(hidden)
