"""QLoRA on Llama-3.1-70B on a small TPU slice, v5e-8 (8 chips, one host): the frozen base
stored as NF4 codes (about a quarter of its bfloat16 bytes) and split over all chips, LoRA
r=16 on every projection, 1 x 2048 tokens a chip, 4 micro-batches a step (32 sequences).

Sized with the TPU compiler before renting the slice (README, "Before you rent a pod"):
  lora-jax compile --config configs/llama3_70b_qlora.py --topology v5e-8
Remat "full": each layer is recomputed in the backward. Data: JSONL prompt/response rows, as
llama3_1b_sft.py. The model id needs network once and Meta's licence accepted on the hub.
"""

from lora_jax.settings import sft_config


def get_config():
    config = sft_config(
        "meta-llama/Llama-3.1-70B",
        template="### Instruction:\n{prompt}\n\n### Response:\n",
        output_dir="runs/llama3_70b_qlora",
    )
    config["model"].update(remat="full", quantize="nf4")
    config["data"]["max_length"] = 2048
    config["train"].update(batch_size=32, grad_accum=4)  # 1 row a chip a micro-batch
    return config
