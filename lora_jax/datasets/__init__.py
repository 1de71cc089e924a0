"""Small datasets shipped with lora_jax, as JSONL: `negation` (the quickstart's sentiment
set) and the synthetic SFT tasks of `synthetic` (`arithmetic`, `reverse`)."""
