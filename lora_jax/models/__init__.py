"""Flax Linen models named like Hugging Face's modules, and their checkpoints in and out.

LoRA targets read like peft's `target_modules`: q_proj, v_proj, c_attn, query, value, ...
Names load on first use, so a light submodule (`options`, `naming`) can be imported without
the zoo's models.
"""

from __future__ import annotations

from lora_jax.lazy import attributes

# Each public name and the submodule that holds it.
_HOMES = {
    "BertConfig": "bert",
    "BertForSequenceClassification": "bert",
    "BertModel": "bert",
    "GPT2Config": "gpt2",
    "GPT2LMHeadModel": "gpt2",
    "LlamaConfig": "llama",
    "LlamaForCausalLM": "llama",
    "Naming": "naming",
    "DTYPES": "options",
    "REMAT_POLICIES": "options",
    "FAMILIES": "hub",
    "abstract_pretrained": "hub",
    "build": "hub",
    "checkpoint_dir": "hub",
    "config_of": "hub",
    "from_pretrained": "hub",
    "random_checkpoint": "hub",
    "save_pretrained": "hub",
}
__all__ = sorted(_HOMES)


__getattr__, __dir__ = attributes(__name__, _HOMES)
