"""The LoRA paper's E2E NLG setting (Hu et al. 2021, table 11) for GPT-2 medium.

r=4, alpha=32 on the fused attention projection (c_attn), dropout 0.1, AdamW lr 2e-4 with
500 warmup steps, weight decay 0.01, batch 8, 5 epochs (42,061 examples -> 26,290 steps).
Data: JSONL rows {"meaning_representation": ..., "human_reference": ...} from the E2E set.
"""

from lora_jax.train import default_config


def get_config():
    config = default_config()
    config["model"].update(path="openai-community/gpt2-medium", num_labels=None)
    config["lora"].update(
        rank=4, alpha=32.0, targets=["c_attn"], exclude=[], modules_to_save=[], dropout=0.1
    )
    config["data"].update(
        task="sft",
        train="data/e2e/train.jsonl",
        eval="data/e2e/dev.jsonl",
        template="{meaning_representation} ||",
        response_field="human_reference",
        max_length=512,
    )
    config["train"].update(
        steps=26_290,
        head_only_steps=0,
        batch_size=8,
        learning_rate=2e-4,
        warmup_steps=500,
        weight_decay=0.01,
    )
    config["checkpoint"].update(every=2000, keep=3)
    config["output_dir"] = "runs/gpt2_e2e"
    return config
