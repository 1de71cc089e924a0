"""Supervised fine-tuning of Qwen2-0.5B-Instruct in its chat format, LoRA on every projection.

Same data format as llama3_1b_sft.py (JSONL prompt/response, loss on the response only).
"""

from lora_jax.settings import sft_config


def get_config():
    config = sft_config(
        "Qwen/Qwen2-0.5B-Instruct",
        template="<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
        output_dir="runs/qwen2_sft",
    )
    config["train"]["grad_accum"] = 2  # a smaller model: bigger micro-batches fit
    return config
