"""Supervised fine-tuning of Mixtral-8x7B on a TPU v5e-16 slice (16 chips, 4 hosts): LoRA
r=16 on attention and on every expert (each its own A, B; the router left alone), bfloat16
base split over all chips (fsdp, each expert's kernels too), 1 x 2048 tokens a chip.

Sized with the TPU compiler before renting the slice (README, "Before you rent a pod"):
  lora-jax compile --config configs/mixtral_8x7b_sft.py --topology v5e-16
Remat "full": each layer is recomputed in the backward. Data: JSONL prompt/response rows, as
llama3_1b_sft.py. The model id needs network once.
"""

from lora_jax.settings import sft_config


def get_config():
    config = sft_config(
        "mistralai/Mixtral-8x7B-v0.1",
        template="### Instruction:\n{prompt}\n\n### Response:\n",
        output_dir="runs/mixtral_8x7b_sft",
    )
    config["model"]["remat"] = "full"
    config["data"]["max_length"] = 2048
    config["train"].update(batch_size=16, grad_accum=1)  # 1 row a chip
    # peft refuses lora_dropout on target_parameters (the experts): without dropout the
    # saved adapter loads in peft as written.
    config["lora"]["dropout"] = 0.0
    return config
