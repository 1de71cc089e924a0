"""Preference tuning (DPO) of Llama-3.1-8B on a TPU v5e-16 slice (16 chips, 4 hosts): LoRA
r=16 on every projection, bfloat16 base split over all chips (fsdp), 2 rows a chip of 2 x
2048 tokens (a pair's chosen and rejected sequence, or shorter pairs packed several to a
row), the 8192 tokens a chip of llama3_8b_sft.py. The reference policy is the base itself
(the adapter left out: no second copy of the weights), so DPO after SFT starts from the SFT
run merged into a checkpoint (`lora-jax merge`), named by model.path.

Sized with the TPU compiler before renting the slice (README, "Before you rent a pod"):
  lora-jax compile --config configs/llama3_8b_dpo.py --topology v5e-16
Data: JSONL prompt/chosen/rejected rows (the shipped arithmetic pairs until data.train /
data.eval name yours). Learning rate and beta as zephyr-7b's LoRA DPO recipe (5e-6, 0.1).
The model id needs network once and Meta's licence accepted on the hub.
"""

from lora_jax.settings import sft_config

PAIRS = "package:lora_jax/datasets/arithmetic_pairs"


def get_config():
    config = sft_config(
        "meta-llama/Llama-3.1-8B",
        template="### Instruction:\n{prompt}\n\n### Response:\n",
        output_dir="runs/llama3_8b_dpo",
    )
    config["model"]["remat"] = "full"
    config["data"].update(task="dpo", train=f"{PAIRS}/train.jsonl", eval=f"{PAIRS}/test.jsonl",
                          max_length=2048)  # fmt: skip
    config["dpo"] = {"loss": "sigmoid", "beta": 0.1}
    config["train"].update(batch_size=32, grad_accum=1, learning_rate=5e-6)  # 2 rows a chip
    return config
