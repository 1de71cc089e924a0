"""Llama 2/3, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3, Mixtral and Qwen3-MoE decoders, named
like Hugging Face's modules.

One module tree serves them all: Qwen2 adds q/k/v biases, Mistral a sliding attention window,
Llama 3 its rope scaling, Qwen3 per-head q/k norms, Phi-3 fused projections and partial
rotary, Mixtral and Qwen3-MoE a mixture of experts in place of the MLP (`moe`); Gemma its
(1 + w) norms and scaled embeddings, Gemma 2/3 norms around each sublayer, soft-capping and
local layers alternating with global ones (a per-layer flag scanned with the layers, not a
second stack). Params mirror transformers' names
(model/layers/self_attn/q_proj, ...), with the layers stacked by nn.scan along a leading
axis.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.models import common, moe
from lora_jax.sharding import constrain_batch


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The architecture fields of a Llama / Mistral / Qwen2-3 / Gemma 1-3 / Phi-3 config.json."""

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
    local_layers: tuple[bool, ...] = ()  # per layer: attends within the window (default: all)
    local_rope_theta: float | None = None  # Gemma 3: local layers' RoPE base, unscaled
    partial_rotary_factor: float = 1.0  # Phi-3 family: RoPE on this share of each head
    fused: bool = False  # Phi-3: one qkv_proj and one gate_up_proj
    hidden_act: str = "silu"
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm of each query and key head
    gemma: bool = False  # RMSNorm as (1 + w) in float32, embeddings scaled by sqrt(hidden)
    sandwich_norms: bool = False  # Gemma 2/3: norms after attention and MLP, before the sum
    query_pre_attn_scalar: float | None = None  # Gemma 2/3: scores scaled by its -1/2 power
    attn_logit_softcapping: float | None = None  # Gemma 2: cap * tanh(score / cap)
    final_logit_softcapping: float | None = None
    # Mixtral, Qwen3-MoE: a sparse mixture of experts in place of every layer's MLP.
    num_experts: int = 0
    experts_per_token: int = 2
    moe_intermediate_size: int | None = None  # each expert's (default: intermediate_size)
    norm_topk_prob: bool = True  # the top-k routing weights renormalised to sum 1
    float32_routing: bool = True  # Mixtral keeps routing weights in float32, Qwen3-MoE casts
    router_aux_loss_coef: float = 0.0  # the load-balancing loss's weight, when trained

    @property
    def expert_intermediate_size(self) -> int:
        """Each expert's feed-forward width."""
        return self.moe_intermediate_size or self.intermediate_size

    @property
    def max_positions(self) -> int:
        """The context the checkpoint declares (RoPE itself has no table)."""
        return self.max_position_embeddings

    @property
    def window(self) -> int | None:
        """The sliding window, if any layer attends within it."""
        return self.sliding_window if any(self.local_layers or (True,)) else None

    @property
    def mixed(self) -> bool:
        """Whether local (windowed) and global layers alternate: a per-layer scanned flag."""
        return bool(self.sliding_window) and len(set(self.local_layers)) > 1

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> LlamaConfig:
        """Reads transformers' config.json (v4 `rope_scaling` or v5 `rope_parameters`)."""
        kind = hf.get("model_type")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        local_rope = rope.pop("sliding_attention", None)  # Gemma 3 (v5): per layer type
        rope = dict(rope.pop("full_attention", None) or rope)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"rope type {rope_type!r} is not supported (default, linear, llama3).")
        heads = hf["num_attention_heads"]
        kv_heads = hf.get("num_key_value_heads") or heads
        if heads % kv_heads:  # attention stacks each key head's group of query heads
            raise ValueError(f"num_attention_heads ({heads}) is not a multiple of "
                             f"num_key_value_heads ({kv_heads}).")  # fmt: skip
        window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
        gemma2, gemma3 = kind == "gemma2", kind == "gemma3_text"
        experts = _experts(hf)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            rope_type=rope_type,
            rope_factor=rope.get("factor", 1.0),
            low_freq_factor=rope.get("low_freq_factor", 1.0),
            high_freq_factor=rope.get("high_freq_factor", 4.0),
            original_max_position_embeddings=rope.get("original_max_position_embeddings", 8192),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", kind.startswith("gemma")),
            attention_bias=hf.get("attention_bias", False),
            qkv_bias=kind == "qwen2",
            mlp_bias=hf.get("mlp_bias", False),
            sliding_window=window if kind not in ("llama", "gemma") else None,  # phi3: all
            local_layers=_local_layers(hf),
            partial_rotary_factor=rope.get("partial_rotary_factor",
                                           hf.get("partial_rotary_factor", 1.0)),
            fused=kind == "phi3",
            local_rope_theta=(local_rope or {}).get(
                "rope_theta", hf.get("rope_local_base_freq", 10000.0 if gemma3 else None)),
            hidden_act=(hf.get("hidden_activation") if gemma2 or gemma3 else None)
            or hf.get("hidden_act", "silu"),
            qk_norm=kind in ("qwen3", "qwen3_moe", "gemma3_text"),
            gemma=kind.startswith("gemma"),
            sandwich_norms=gemma2 or gemma3,
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar") if gemma2 or gemma3 else None,
            attn_logit_softcapping=hf.get("attn_logit_softcapping") if gemma2 else None,
            final_logit_softcapping=hf.get("final_logit_softcapping"),
            num_experts=experts,
            experts_per_token=hf.get("num_experts_per_tok", 2),
            moe_intermediate_size=hf.get("moe_intermediate_size"),
            norm_topk_prob=hf.get("norm_topk_prob", kind == "mixtral"),
            float32_routing=kind == "mixtral",
            router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.0) if experts else 0.0,
        )  # fmt: skip


def _experts(hf: dict[str, Any]) -> int:
    """How many experts each layer's MoE block holds (0: a dense MLP), refusing what one
    scanned stack of layers cannot hold: Qwen3-MoE's dense layers among sparse ones."""
    kind = hf.get("model_type")
    if kind not in ("mixtral", "qwen3_moe"):
        return 0
    key = "num_local_experts" if "num_local_experts" in hf else "num_experts"
    count, top_k = hf.get(key), hf.get("num_experts_per_tok", 2)
    if not (isinstance(count, int) and isinstance(top_k, int) and 1 <= top_k <= count):
        raise ValueError(
            f"{kind}: {key}={count}, num_experts_per_tok="
            f"{hf.get('num_experts_per_tok')}; a MoE needs 1 <= top-k <= experts."
        )
    if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
        raise ValueError(
            f"{kind}: mlp_only_layers={hf.get('mlp_only_layers')}, "
            f"decoder_sparse_step={hf.get('decoder_sparse_step')}: dense layers "
            "among the sparse ones are not supported (every layer must be a MoE)."
        )
    return count


def _local_layers(hf: dict[str, Any]) -> tuple[bool, ...]:
    """Which layers attend within the sliding window: config.json's `layer_types`, or the
    pattern transformers derives when a (v4) config lacks it."""
    n, kind = hf["num_hidden_layers"], hf.get("model_type")
    if types := hf.get("layer_types"):
        return tuple(t == "sliding_attention" for t in types)
    if kind == "gemma2":
        return tuple(i % 2 == 0 for i in range(n))
    if kind == "gemma3_text":
        pattern = hf.get("sliding_window_pattern", 6)
        return tuple((i + 1) % pattern != 0 for i in range(n))
    if kind in ("qwen2", "qwen3"):
        return tuple(i >= hf.get("max_window_layers", n) for i in range(n))
    return ()


def inverse_frequencies(c: LlamaConfig, local: bool = False) -> np.ndarray:
    """RoPE inverse frequencies, with Llama 3's long-context scaling where configured; `local`:
    Gemma 3's local layers' own base, unscaled."""
    theta = c.local_rope_theta if local and c.local_rope_theta else c.rope_theta
    dim = int(c.head_dim * c.partial_rotary_factor)
    inv = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if local and c.local_rope_theta:
        return inv
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
    """Rotary embedding in transformers' half-split layout, computed in float32, on the
    first 2 * len(inv_freq) features of each head (all of them but with partial rotary)."""
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    x, kept = x[..., : angles.shape[-1]], x[..., angles.shape[-1] :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    x = (x * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)
    return jnp.concatenate([x, kept], axis=-1)


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: computed in float32, weights stored as offsets from 1 (zeros at init)."""

    eps: float
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        offset = self.param("scale", nn.initializers.zeros, (x.shape[-1],))
        y = x.astype(jnp.float32)
        y = y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + self.eps)
        return (y * (1.0 + offset.astype(jnp.float32))).astype(self.dtype or x.dtype)


def norm(c: LlamaConfig, dtype: Any, name: str | None = None) -> nn.Module:
    """The family's RMSNorm: Gemma's (1 + w) in float32, else Flax's (Llama's)."""
    if c.gemma:
        return RMSNorm(c.rms_norm_eps, dtype, name=name)
    return nn.RMSNorm(c.rms_norm_eps, dtype=dtype, name=name)


class LlamaAttention(common.Layer):
    """Rotary, grouped-query attention (q/k norms, windows, soft-capping per family)."""

    @nn.compact
    def __call__(self, x, padding, positions, local):
        c = self.config
        bias = c.attention_bias or c.qkv_bias

        def proj(name, features, use_bias):
            return nn.Dense(features, use_bias=use_bias, dtype=self.dtype, name=name)

        def heads(name, count, normed=False):  # Qwen3, Gemma 3: q and k normed per head
            h = common.split_heads(proj(f"{name}_proj", count * c.head_dim, bias)(x), count)
            return norm(c, self.dtype, f"{name}_norm")(h) if normed else h

        n, kv = c.num_attention_heads, c.num_key_value_heads
        if c.fused:  # Phi-3: q, k and v side by side in one projection's output
            qkv = proj("qkv_proj", (n + 2 * kv) * c.head_dim, bias)(x)
            parts = jnp.split(qkv, [n * c.head_dim, (n + kv) * c.head_dim], axis=-1)
            q, k, v = (common.split_heads(t, h) for t, h in zip(parts, (n, kv, kv), strict=True))
        else:
            q, k, v = heads("q", n, c.qk_norm), heads("k", kv, c.qk_norm), heads("v", kv)
        inv_freq = inverse_frequencies(c)
        if c.local_rope_theta:  # Gemma 3: local layers rotate with their own base
            inv_freq = jnp.where(local, inverse_frequencies(c, local=True), inv_freq)
        q, k = rotate(q, positions, inv_freq), rotate(k, positions, inv_freq)
        out = common.attend(
            q, k, v, padding, causal=True, window=c.window, local=local if c.mixed else None,
            implementation=self.attention_impl, cache=self,
            scale=c.query_pre_attn_scalar and c.query_pre_attn_scalar**-0.5,
            softcap=c.attn_logit_softcapping,
        )  # fmt: skip
        out = common.merge_heads(out)
        return proj("o_proj", c.hidden_size, c.attention_bias)(out)


class LlamaMLP(common.Layer):
    """The gated feed-forward block: down(act(gate(x)) * up(x)) (fused for Phi-3)."""

    @nn.compact
    def __call__(self, x):
        c = self.config

        def proj(name, features):
            return nn.Dense(features, use_bias=c.mlp_bias, dtype=self.dtype, name=name)

        if c.fused:  # Phi-3: gate and up side by side in one projection's output
            gate, up = jnp.split(proj("gate_up_proj", 2 * c.intermediate_size)(x), 2, axis=-1)
        else:
            gate = proj("gate_proj", c.intermediate_size)(x)
            up = proj("up_proj", c.intermediate_size)(x)
        return proj("down_proj", c.hidden_size)(common.activation(c.hidden_act)(gate) * up)


class LlamaDecoderLayer(common.Layer):
    """One pre-norm layer (Gemma 2/3: norms around each sublayer too)."""

    @nn.compact
    def __call__(self, x, padding, positions, local):
        c = self.config
        attn = LlamaAttention(c, self.dtype, self.attention_impl, name="self_attn")
        mlp = (moe.SparseMoe if c.num_experts else LlamaMLP)(c, self.dtype, name="mlp")
        x = constrain_batch(x)  # the carry between scanned layers: each chip its own rows
        h = attn(norm(c, self.dtype, "input_layernorm")(x), padding, positions, local)
        if not c.sandwich_norms:
            x = x + h
            return x + mlp(norm(c, self.dtype, "post_attention_layernorm")(x)), None
        # Gemma 2/3: each sublayer's output normed before the residual sum as well.
        x = x + norm(c, self.dtype, "post_attention_layernorm")(h)
        h = mlp(norm(c, self.dtype, "pre_feedforward_layernorm")(x))
        return x + norm(c, self.dtype, "post_feedforward_layernorm")(h), None


class LlamaModel(common.ZooModel):
    """Token embedding, the scanned layers, the final norm."""

    config: LlamaConfig

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype)
        stack = common.scanned(LlamaDecoderLayer, c.num_hidden_layers, self.remat, broadcast=2,
                               per_layer=1)  # fmt: skip
        self.layers = stack(c, self.dtype, self.attention_impl)
        self.norm = norm(c, self.dtype)

    def __call__(self, input_ids, attention_mask=None, positions=None):
        c = self.config
        positions = common.positions_or_default(input_ids, positions)
        x = constrain_batch(self.embed_tokens(input_ids))  # not split like the table
        if c.gemma:  # in the embedding's dtype, as transformers rounds it
            x = x * jnp.asarray(math.sqrt(c.hidden_size), x.dtype)
        local = jnp.asarray(c.local_layers or (False,) * c.num_hidden_layers)
        x, _ = self.layers(x, attention_mask, positions, local)
        return self.norm(x)


class LlamaForCausalLM(common.CausalLM):
    """The decoder and its LM head (tied to the embedding where the config says)."""

    config: LlamaConfig

    def setup(self):
        c = self.config
        self.model = LlamaModel(c, self.dtype, self.remat, self.attention_impl)
        if not c.tie_word_embeddings:
            self.lm_head = nn.Dense(c.vocab_size, use_bias=False, dtype=self.dtype)

    def hidden(self, input_ids, attention_mask=None, positions=None):
        return self.model(input_ids, attention_mask, positions)

    def head(self, hidden):
        c = self.config
        if c.tie_word_embeddings:
            logits = self.model.embed_tokens.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        if cap := c.final_logit_softcapping:  # Gemma 2
            logits = cap * jnp.tanh(logits / cap)
        return logits
