"""Supervised fine-tuning of Gemma 3 1B: LoRA r=16 on every projection, bfloat16 base.

Data: JSONL rows {"prompt": ..., "response": ...}; only response tokens count in the loss.
The model id needs network once and Gemma's licence accepted on the Hugging Face hub (or
pass a local checkpoint with --set model.path=DIR).
"""

from lora_jax.settings import sft_config


def get_config():
    return sft_config(
        "google/gemma-3-1b-pt",
        template="<start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n",
        output_dir="runs/gemma3_1b_sft",
    )
