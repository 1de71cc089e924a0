"""Supervised fine-tuning of Mixtral-8x7B on a TPU v5e-16 slice (16 chips, 4 hosts): LoRA
r=16 on attention and on every expert (each its own A, B; the router left alone), bfloat16
base, 2 x 2048 tokens a chip. The experts split over an expert axis of 2 (each chip holds 4 of
a layer's 8, its share of them over fsdp 8) and everything else over all 16 chips.

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
    config["train"].update(batch_size=32, grad_accum=1)  # 2 rows a chip
    # Without the expert axis (fsdp over all 16) each layer's backward gathers its 8 experts'
    # kernels whole and 1 row a chip is what fits (13.6 GiB of 15.75); with it, 2 rows.
    config["mesh"]["expert"] = 2
    # peft refuses lora_dropout on target_parameters (the experts): without dropout the
    # saved adapter loads in peft as written.
    config["lora"]["dropout"] = 0.0
    return config
