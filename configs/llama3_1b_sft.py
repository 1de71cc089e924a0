"""Supervised fine-tuning of Llama-3.2-1B: LoRA r=16 on every projection, bfloat16 base.

Data: JSONL rows {"prompt": ..., "response": ...}; only response tokens count in the loss.
The model id needs network once (or pass a local checkpoint with --set model.path=DIR).
"""

from lora_jax.train import default_config


def get_config():
    config = default_config()
    config["model"].update(
        path="meta-llama/Llama-3.2-1B",
        dtype="bfloat16",
        compute_dtype="bfloat16",
        remat="dots",
        num_labels=None,
    )
    config["lora"].update(
        rank=16, alpha=32.0, targets=["all-linear"], exclude=[], modules_to_save=[], dropout=0.05
    )
    config["data"].update(
        task="sft",
        train="data/sft/train.jsonl",
        eval="data/sft/eval.jsonl",
        template="### Instruction:\n{prompt}\n\n### Response:\n",
        max_length=1024,
    )
    config["train"].update(
        steps=1000,
        head_only_steps=0,
        batch_size=32,
        grad_accum=4,
        learning_rate=2e-4,
        warmup_steps=50,
        weight_decay=0.0,
    )
    config["mesh"].update(data=1, fsdp=-1, tensor=1)
    config["checkpoint"].update(every=200, keep=3)
    config["output_dir"] = "runs/llama3_1b_sft"
    return config
