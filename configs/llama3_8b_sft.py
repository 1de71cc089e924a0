"""Supervised fine-tuning of Llama-3.1-8B on a TPU v5e-16 slice (16 chips, 4 hosts): LoRA
r=16 on every projection, bfloat16 base split over all chips (fsdp), 4 x 2048 tokens a chip.

Sized with the TPU compiler before renting the slice (README, "Before you rent a pod"):
  lora-jax compile --config configs/llama3_8b_sft.py --topology v5e-16
Remat "full" (each layer recomputed in the backward): saving the projections' outputs
instead fits only 1 x 2048 tokens a chip. Data: JSONL prompt/response rows, as
llama3_1b_sft.py. The model id needs network once and Meta's licence accepted on the hub.
"""

from lora_jax.settings import sft_config


def get_config():
    config = sft_config(
        "meta-llama/Llama-3.1-8B",
        template="### Instruction:\n{prompt}\n\n### Response:\n",
        output_dir="runs/llama3_8b_sft",
    )
    config["model"]["remat"] = "full"
    config["data"]["max_length"] = 2048
    config["train"].update(batch_size=64, grad_accum=1)  # 4 rows a chip on 16 chips
    return config
