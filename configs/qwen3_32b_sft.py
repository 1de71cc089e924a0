"""Supervised fine-tuning of Qwen3-32B in its chat format on a TPU v5e-32 slice (32 chips, 8
hosts): LoRA r=16 on every projection, bfloat16 base split over all chips (fsdp), 1 x 2048
tokens a chip, 2 micro-batches a step (64 sequences).

Sized with the TPU compiler before renting the slice (README, "Before you rent a pod"):
  lora-jax compile --config configs/qwen3_32b_sft.py --topology v5e-32
Remat "full": each layer is recomputed in the backward. Data: JSONL prompt/response rows, as
llama3_1b_sft.py.
"""

from lora_jax.settings import sft_config


def get_config():
    config = sft_config(
        "Qwen/Qwen3-32B",
        template="<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
        output_dir="runs/qwen3_32b_sft",
    )
    config["model"]["remat"] = "full"
    config["data"]["max_length"] = 2048
    config["train"].update(batch_size=64, grad_accum=2)  # 1 row a chip a micro-batch
    return config
