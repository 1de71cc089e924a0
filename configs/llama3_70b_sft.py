"""Supervised fine-tuning of Llama-3.1-70B on a TPU v5e-64 slice (64 chips, 16 hosts): LoRA
r=16 on every projection, bfloat16 base split over all chips (fsdp), 1 x 2048 tokens a chip,
2 micro-batches a step (128 sequences).

Sized with the TPU compiler before renting the slice (README, "Before you rent a pod"):
  lora-jax compile --config configs/llama3_70b_sft.py --topology v5e-64
Remat "full": each layer is recomputed in the backward. Data: JSONL prompt/response rows, as
llama3_1b_sft.py. The model id needs network once and Meta's licence accepted on the hub.
"""

from lora_jax.settings import sft_config


def get_config():
    config = sft_config(
        "meta-llama/Llama-3.1-70B",
        template="### Instruction:\n{prompt}\n\n### Response:\n",
        output_dir="runs/llama3_70b_sft",
    )
    config["model"]["remat"] = "full"
    config["data"]["max_length"] = 2048
    config["train"].update(batch_size=128, grad_accum=2)  # 1 row a chip a micro-batch
    return config
