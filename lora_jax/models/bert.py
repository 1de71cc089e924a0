"""BERT and RoBERTa encoders with sequence-classification heads, named like Hugging Face's
modules (encoder/layer/attention/self/query, ...). RoBERTa differs only in its position ids
(counted from padding_idx + 1) and its classification head."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lora_jax.models import common


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The architecture fields of a BERT/RoBERTa config.json."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    num_labels: int = 2
    roberta: bool = False

    @property
    def max_positions(self) -> int:
        """Usable rows of the learned position table: RoBERTa's first padding_idx + 1 rows are
        never used, since it counts positions from there."""
        return self.max_position_embeddings - (self.pad_token_id + 1 if self.roberta else 0)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> BertConfig:
        """Reads transformers' config.json; the label count comes from `id2label`."""
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported for BERT/RoBERTa.")
        fields = {f.name for f in dataclasses.fields(cls)} - {"num_labels", "roberta"}
        return cls(
            **{k: v for k, v in hf.items() if k in fields and v is not None},
            num_labels=len(hf["id2label"]) if hf.get("id2label") else hf.get("num_labels", 2),
            roberta=hf.get("model_type") == "roberta",
        )


class BertEmbeddings(common.Layer):
    """Word, position and token-type embeddings, summed and layer-normed."""

    @nn.compact
    def __call__(self, input_ids, token_type_ids):
        c = self.config
        if c.roberta:  # RoBERTa counts real tokens from padding_idx + 1
            real = (input_ids != c.pad_token_id).astype(jnp.int32)
            positions = jnp.cumsum(real, axis=1) * real + c.pad_token_id
        else:
            positions = common.positions_or_default(input_ids, None)
        embed = lambda n, name: nn.Embed(n, c.hidden_size, dtype=self.dtype, name=name)  # noqa: E731
        x = (
            embed(c.vocab_size, "word_embeddings")(input_ids)
            + embed(c.max_position_embeddings, "position_embeddings")(positions)
            + embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids)
        )
        return nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(x)


class BertSelfAttention(common.Layer):
    """query, key, value and bidirectional attention over the padding mask."""

    @nn.compact
    def __call__(self, x, padding):
        c = self.config
        project = lambda name: nn.Dense(c.hidden_size, dtype=self.dtype, name=name)(x)  # noqa: E731
        q, k, v = (
            common.split_heads(project(n), c.num_attention_heads) for n in ("query", "key", "value")
        )
        return common.merge_heads(
            common.attend(q, k, v, padding, causal=False, implementation=self.attention_impl)
        )


class AddNorm(common.Layer):
    """dense, residual, LayerNorm: BERT's `attention.output` and `output` modules."""

    @nn.compact
    def __call__(self, x, residual):
        c = self.config
        x = nn.Dense(c.hidden_size, dtype=self.dtype, name="dense")(x) + residual
        return nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(x)


class BertAttention(common.Layer):
    """Self-attention, then its output projection, residual and LayerNorm."""

    @nn.compact
    def __call__(self, x, padding):
        attn = BertSelfAttention(self.config, self.dtype, self.attention_impl, name="self")
        return AddNorm(self.config, self.dtype, name="output")(attn(x, padding), x)


class BertIntermediate(common.Layer):
    """The feed-forward block's up projection and activation."""

    @nn.compact
    def __call__(self, x):
        c = self.config
        return common.activation(c.hidden_act)(
            nn.Dense(c.intermediate_size, dtype=self.dtype, name="dense")(x)
        )


class BertLayer(common.Layer):
    """One encoder layer: attention, then the feed-forward block."""

    @nn.compact
    def __call__(self, x, padding):
        h = BertAttention(self.config, self.dtype, self.attention_impl, name="attention")(
            x, padding
        )
        inner = BertIntermediate(self.config, self.dtype, name="intermediate")(h)
        return AddNorm(self.config, self.dtype, name="output")(inner, h), None


class BertEncoder(common.ZooModel):
    """The layers, stacked by nn.scan."""

    config: BertConfig

    @nn.compact
    def __call__(self, x, padding):
        stack = common.scanned(BertLayer, self.config.num_hidden_layers, self.remat, broadcast=1)
        return stack(self.config, self.dtype, self.attention_impl, name="layer")(x, padding)[0]


class BertModel(common.ZooModel):
    """Token ids (B, T) -> (hidden states (B, T, D), pooled first token (B, D) or None)."""

    config: BertConfig
    add_pooling_layer: bool = True

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
        c = self.config
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = BertEmbeddings(c, self.dtype, name="embeddings")(input_ids, token_type_ids)
        x = BertEncoder(c, self.dtype, self.remat, self.attention_impl, name="encoder")(
            x, attention_mask
        )
        if not self.add_pooling_layer:
            return x, None
        return x, BertPooler(c, self.dtype, name="pooler")(x[:, 0])


class BertPooler(common.Layer):
    """The first token's hidden state through a dense layer and tanh."""

    @nn.compact
    def __call__(self, first_token):
        return jnp.tanh(
            nn.Dense(self.config.hidden_size, dtype=self.dtype, name="dense")(first_token)
        )


class BertForSequenceClassification(common.ZooModel):
    """Token ids (B, T) -> class logits (B, num_labels), for BERT and RoBERTa checkpoints."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
        c = self.config
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, name=name)  # noqa: E731
        encoder = BertModel(
            c,
            self.dtype,
            self.remat,
            self.attention_impl,
            add_pooling_layer=not c.roberta,
            name="roberta" if c.roberta else "bert",
        )
        hidden, pooled = encoder(input_ids, attention_mask, token_type_ids)
        if not c.roberta:
            return dense(c.num_labels, "classifier")(pooled)
        head = RobertaClassificationHead(c, self.dtype, name="classifier")
        return head(hidden[:, 0])


class RobertaClassificationHead(common.Layer):
    """RoBERTa's head: dense and tanh on the first token, then out_proj."""

    @nn.compact
    def __call__(self, x):
        c = self.config
        x = jnp.tanh(nn.Dense(c.hidden_size, dtype=self.dtype, name="dense")(x))
        return nn.Dense(c.num_labels, dtype=self.dtype, name="out_proj")(x)
