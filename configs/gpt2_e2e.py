"""The LoRA paper's E2E NLG setting (Hu et al. 2021, table 11) for GPT-2 medium.

r=4, alpha=32 on the fused attention projection (c_attn), dropout 0.1, AdamW lr 2e-4 with
500 warmup steps, weight decay 0.01, batch 8, 5 epochs (42,061 examples -> 26,290 steps).
Data: JSONL rows {"meaning_representation": ..., "human_reference": ...} from the E2E set.
"""

from lora_jax.settings import sft_config


def get_config():
    config = sft_config("openai-community/gpt2-medium", template="{meaning_representation} ||",
                        output_dir="runs/gpt2_e2e")  # fmt: skip
    config["model"].update(dtype="float32", compute_dtype=None, remat="none")
    config["lora"].update(rank=4, alpha=32.0, targets=["c_attn"], dropout=0.1)
    config["data"].update(train="data/e2e/train.jsonl", eval="data/e2e/dev.jsonl",
                          response_field="human_reference", max_length=512)  # fmt: skip
    config["train"].update(steps=26_290, batch_size=8, grad_accum=1, learning_rate=2e-4,
                           warmup_steps=500, weight_decay=0.01)  # fmt: skip
    config["mesh"].update(data=-1, fsdp=1)
    config["checkpoint"].update(every=2000)
    return config
