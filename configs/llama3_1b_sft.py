"""Supervised fine-tuning of Llama-3.2-1B: LoRA r=16 on every projection, bfloat16 base.

Data: JSONL rows {"prompt": ..., "response": ...}; only response tokens count in the loss.
The model id needs network once (or pass a local checkpoint with --set model.path=DIR).
"""

from lora_jax.settings import sft_config


def get_config():
    return sft_config(
        "meta-llama/Llama-3.2-1B",
        template="### Instruction:\n{prompt}\n\n### Response:\n",
        output_dir="runs/llama3_1b_sft",
    )
