"""Small datasets shipped with lora_jax, as JSONL: `negation` (the quickstart's sentiment
set) and the synthetic tasks of `synthetic` (SFT: `arithmetic`, `reverse`; preference
pairs for DPO: `arithmetic_pairs`)."""
