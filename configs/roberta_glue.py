"""The LoRA paper's GLUE setting (Hu et al. 2021, table 9) for RoBERTa-base on SST-2.

r=8, alpha=8 on query and value, the classifier trained in full, AdamW lr 5e-4 with 6%
warmup, batch 16, max length 512, 60 epochs (SST-2: 67,349 sentences -> 252,559 steps).
Data comes from TensorFlow Datasets (`pip install tensorflow-datasets`; network once).
"""

from lora_jax.settings import default_config


def get_config():
    config = default_config()
    config["model"].update(path="FacebookAI/roberta-base", num_labels=2)
    config["lora"].update(
        rank=8,
        alpha=8.0,
        targets=["query", "value"],
        exclude=[],
        modules_to_save=["classifier"],
        dropout=0.0,
    )
    config["data"].update(
        task="classify",
        train="tfds:glue/sst2:train",
        eval="tfds:glue/sst2:validation",
        text_field="sentence",
        label_field="label",
        labels=[],
        max_length=512,
    )
    config["train"].update(
        steps=252_559,
        head_only_steps=0,
        batch_size=16,
        learning_rate=5e-4,
        warmup_steps=15_154,
        weight_decay=0.1,
    )
    config["checkpoint"].update(every=5000, keep=3)
    config["output_dir"] = "runs/roberta_glue_sst2"
    return config
