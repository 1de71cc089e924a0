"""GPT-2, named like Hugging Face's modules (transformer/h/attn/c_attn, ...).

GPT-2's Conv1D layers store weights as (in, out), which is already Flax's kernel layout.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lora_jax.models import common


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """The architecture fields of a GPT-2 config.json."""

    vocab_size: int
    n_embd: int
    n_layer: int
    n_head: int
    n_positions: int
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> GPT2Config:
        """Reads transformers' config.json, refusing the variants this module does not build."""
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("add_cross_attention"):
            raise ValueError(
                "GPT-2 variants with per-layer attention scaling or cross-attention "
                "are not supported."
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in hf.items() if k in fields})

    @property
    def max_positions(self) -> int:
        """The rows of the learned position table."""
        return self.n_positions


class GPT2Attention(common.Layer):
    """Causal attention from one fused c_attn projection, then c_proj."""

    @nn.compact
    def __call__(self, x, padding):
        c = self.config
        qkv = nn.Dense(3 * c.n_embd, dtype=self.dtype, name="c_attn")(x)
        q, k, v = (common.split_heads(t, c.n_head) for t in jnp.split(qkv, 3, axis=-1))
        out = common.attend(
            q, k, v, padding, causal=True, implementation=self.attention_impl, cache=self
        )
        out = common.merge_heads(out)
        return nn.Dense(c.n_embd, dtype=self.dtype, name="c_proj")(out)


class GPT2MLP(common.Layer):
    """c_fc, activation, c_proj."""

    @nn.compact
    def __call__(self, x):
        c = self.config
        h = nn.Dense(c.n_inner or 4 * c.n_embd, dtype=self.dtype, name="c_fc")(x)
        return nn.Dense(c.n_embd, dtype=self.dtype, name="c_proj")(
            common.activation(c.activation_function)(h)
        )


class GPT2Block(common.Layer):
    """One pre-norm layer: attention, then the MLP, each with its residual."""

    @nn.compact
    def __call__(self, x, padding):
        c = self.config
        norm = lambda name: nn.LayerNorm(c.layer_norm_epsilon, dtype=self.dtype, name=name)  # noqa: E731
        x = x + GPT2Attention(c, self.dtype, self.attention_impl, name="attn")(
            norm("ln_1")(x), padding
        )
        return x + GPT2MLP(c, self.dtype, name="mlp")(norm("ln_2")(x)), None


class GPT2Model(common.ZooModel):
    """Token and position embeddings, the scanned blocks, the final LayerNorm."""

    config: GPT2Config

    def setup(self):
        c = self.config
        self.wte = nn.Embed(c.vocab_size, c.n_embd, dtype=self.dtype)
        self.wpe = nn.Embed(c.n_positions, c.n_embd, dtype=self.dtype)
        self.h = common.scanned(GPT2Block, c.n_layer, self.remat, broadcast=1)(
            c, self.dtype, self.attention_impl
        )
        self.ln_f = nn.LayerNorm(c.layer_norm_epsilon, dtype=self.dtype)

    def __call__(self, input_ids, attention_mask=None, positions=None):
        positions = common.positions_or_default(input_ids, positions)
        x = self.wte(input_ids) + self.wpe(positions)
        x, _ = self.h(x, attention_mask)
        return self.ln_f(x)


class GPT2LMHeadModel(common.CausalLM):
    """The head is tied to the token embedding."""

    config: GPT2Config

    def setup(self):
        self.transformer = GPT2Model(self.config, self.dtype, self.remat, self.attention_impl)

    def hidden(self, input_ids, attention_mask=None, positions=None):
        return self.transformer(input_ids, attention_mask, positions)

    def head(self, hidden):
        return self.transformer.wte.attend(hidden)
