"""Supervised fine-tuning of Qwen2-0.5B-Instruct with LoRA on attention and MLP projections.

Same data format as llama3_1b_sft.py (JSONL prompt/response, loss on the response only).
"""

from lora_jax.train import default_config


def get_config():
    config = default_config()
    config["model"].update(
        path="Qwen/Qwen2-0.5B-Instruct",
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
        template="<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
        max_length=1024,
    )
    config["train"].update(
        steps=1000,
        head_only_steps=0,
        batch_size=32,
        grad_accum=2,
        learning_rate=2e-4,
        warmup_steps=50,
    )
    config["mesh"].update(data=1, fsdp=-1, tensor=1)
    config["checkpoint"].update(every=200, keep=3)
    config["output_dir"] = "runs/qwen2_sft"
    return config
