"""lora_jax: LoRA for JAX/Flax as a pure parameter-tree transform.

The core (config, tree, apply) holds no model, training or I/O code.
"""

from lora_jax.apply import kernel_layouts, lora_apply, merged_apply
from lora_jax.config import LoraConfig
from lora_jax.tree import (
    adapter_layout,
    attach,
    combine,
    extract,
    init,
    merge,
    optimizer,
    partition,
    split,
    summary,
    targets,
    unmerge,
)

__all__ = [
    "LoraConfig",
    "adapter_layout",
    "attach",
    "combine",
    "extract",
    "init",
    "kernel_layouts",
    "lora_apply",
    "merge",
    "merged_apply",
    "optimizer",
    "partition",
    "split",
    "summary",
    "targets",
    "unmerge",
]
__version__ = "0.1.0"
