"""Tiny random checkpoints written by transformers (PyTorch, CPU): the reference peer."""

from __future__ import annotations

import numpy as np
import torch
import transformers as tf

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4)  # fmt: skip

# name -> (config, transformers class). Each covers a feature: llama3 rope scaling, GQA and a
# tied head; Mistral's sliding window (shorter than the test sequence); Qwen2's q/k/v biases
# and an untied head; GPT-2's Conv1D; BERT's pooler and its classifier; RoBERTa's positions
# and head.
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


def write_word_tokenizer(directory) -> None:
    """A tokenizer.json for the tiny checkpoints: words w3..w95 are token ids 3..95."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 96)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))
