"""Flax Linen models named like Hugging Face's modules, and their checkpoints in and out.

LoRA targets read like peft's `target_modules`: q_proj, v_proj, c_attn, query, value, ...
"""

from lora_jax.models.bert import BertConfig, BertForSequenceClassification, BertModel
from lora_jax.models.common import REMAT_POLICIES
from lora_jax.models.gpt2 import GPT2Config, GPT2LMHeadModel
from lora_jax.models.hub import (
    FAMILIES,
    Naming,
    build,
    checkpoint_dir,
    from_pretrained,
    random_checkpoint,
    save_pretrained,
)
from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM

__all__ = [
    "FAMILIES",
    "REMAT_POLICIES",
    "BertConfig",
    "BertForSequenceClassification",
    "BertModel",
    "GPT2Config",
    "GPT2LMHeadModel",
    "LlamaConfig",
    "LlamaForCausalLM",
    "Naming",
    "build",
    "checkpoint_dir",
    "from_pretrained",
    "random_checkpoint",
    "save_pretrained",
]
