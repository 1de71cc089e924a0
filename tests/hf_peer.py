"""Tiny random checkpoints written by transformers (PyTorch, CPU): the reference peer."""

from __future__ import annotations

import numpy as np
import torch
import transformers as tf

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4)  # fmt: skip

# Gemma 2/3: head_dim apart from hidden / heads, a window shorter than the test sequences
# (local and global layers differ), large weights so that soft-capping really caps.
GEMMA = dict(num_key_value_heads=2, head_dim=16, sliding_window=4, query_pre_attn_scalar=12,
             initializer_range=0.3)  # fmt: skip

# name -> (config, transformers class). Each covers a feature: llama3 rope scaling, GQA and a
# tied head; Mistral's sliding window (shorter than the test sequence); Qwen2's q/k/v biases
# and an untied head; Qwen3's q/k norms and a window on its second layer only; Gemma's
# (1 + w) norms, scaled embeddings and GeGLU; Gemma 2's soft-capping and alternating
# windows; Gemma 3's q/k norms and local RoPE base beside a scaled global one; Phi-3's
# fused qkv_proj and gate_up_proj, partial rotary and window; Mixtral's and Qwen3-MoE's
# experts: an odd number (5), top-2, Mixtral's renormalised weights and Qwen3-MoE's raw ones,
# a router initialised wide (0.2) so that no two experts' probabilities nearly tie; GPT-2's
# Conv1D; BERT's pooler and its classifier; RoBERTa's positions and head.
PEERS = {
    "llama": (tf.LlamaConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=True,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 16}),
              tf.LlamaForCausalLM),
    "mistral": (tf.MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=4),
                tf.MistralForCausalLM),
    "qwen2": (tf.Qwen2Config(**SMALL, num_key_value_heads=1, tie_word_embeddings=False),
              tf.Qwen2ForCausalLM),
    "qwen3": (tf.Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=16, use_sliding_window=True,
                             sliding_window=4, max_window_layers=1, eos_token_id=2),
              tf.Qwen3ForCausalLM),
    "gemma": (tf.GemmaConfig(**SMALL, num_key_value_heads=1, head_dim=16), tf.GemmaForCausalLM),
    "gemma2": (tf.Gemma2Config(**SMALL, **GEMMA, attn_logit_softcapping=5.0,
                               final_logit_softcapping=1.0), tf.Gemma2ForCausalLM),
    "gemma3": (tf.Gemma3TextConfig(**SMALL, **GEMMA, layer_types=["full_attention",
                                                                  "sliding_attention"],
                                   rope_parameters={
                                       "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                          "rope_theta": 1e6},
                                       "sliding_attention": {"rope_type": "default",
                                                             "rope_theta": 1e4}}),
               tf.Gemma3ForCausalLM),
    "phi3": (tf.Phi3Config(**SMALL, num_key_value_heads=2, sliding_window=5, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2,
                           rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                            "partial_rotary_factor": 0.5}),
             tf.Phi3ForCausalLM),
    "mixtral": (tf.MixtralConfig(**SMALL, num_key_value_heads=2, num_local_experts=5,
                                 num_experts_per_tok=2, initializer_range=0.2),
                tf.MixtralForCausalLM),
    "qwen3_moe": (tf.Qwen3MoeConfig(**SMALL, num_key_value_heads=2, head_dim=16, num_experts=5,
                                    num_experts_per_tok=2, moe_intermediate_size=24,
                                    norm_topk_prob=False, initializer_range=0.2),
                  tf.Qwen3MoeForCausalLM),
    "gpt2": (tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                           bos_token_id=0, eos_token_id=0), tf.GPT2LMHeadModel),
    "bert": (tf.BertConfig(**SMALL), tf.BertModel),
    "bert_cls": (tf.BertConfig(**SMALL, num_labels=3), tf.BertForSequenceClassification),
    "roberta": (tf.RobertaConfig(**SMALL, num_labels=3), tf.RobertaForSequenceClassification),
}  # fmt: skip


def write(name: str, directory) -> None:
    """Saves a randomly initialised transformers model `name` to `directory`."""
    torch.manual_seed(0)
    config, cls = PEERS[name]
    cls(config).eval().save_pretrained(directory)


def reference_output(name: str, directory, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """What transformers computes: logits, or BERT's last hidden state."""
    model = PEERS[name][1].from_pretrained(directory).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    return (out.last_hidden_state if name == "bert" else out.logits).numpy()


def peer_logits(model, ids: np.ndarray) -> np.ndarray:
    """A transformers (or peft) model's logits for `ids`, or a bare encoder's (BertModel)
    last hidden state, without gradients."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids))
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()


def write_word_tokenizer(directory) -> None:
    """A tokenizer.json for the tiny checkpoints: words w3..w95 are token ids 3..95."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 96)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))


def write_reversal_set(root, sizes: dict[str, int], words: int) -> None:
    """A learnable SFT set in `root/<split>.jsonl` (`sizes`: rows a split), seeded: each
    response is its prompt's `words` words reversed and shifted, so only the model can tell."""
    import json

    rng = np.random.default_rng(0)
    for split, n in sizes.items():
        with (root / f"{split}.jsonl").open("w") as f:
            for _ in range(n):
                drawn = rng.integers(3, 50, words)
                row = {"prompt": " ".join(f"w{w}" for w in drawn),
                       "response": " ".join(f"w{w + 40}" for w in drawn[::-1])}  # fmt: skip
                f.write(json.dumps(row) + "\n")
