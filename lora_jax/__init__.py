"""lora_jax: LoRA for JAX/Flax as a pure parameter-tree transform.

The core (config, tree, apply) holds no model, training or I/O code; `lora_jax.models` holds
the Flax model zoo and `lora_jax.io` adapter files in peft's format.
"""

from lora_jax.apply import kernel_layouts, lora_apply, merged_apply, nnx_adapt, routed_apply
from lora_jax.config import LoraConfig
from lora_jax.generate import generate, generate_text
from lora_jax.quant import QuantizedKernel, dequantize, nbytes, quantize
from lora_jax.tree import (
    Bank,
    Site,
    adapter_layout,
    adapter_specs,
    combine,
    init,
    merge,
    optimizer,
    partition,
    sites,
    split,
    summary,
    targets,
    unmerge,
)

__all__ = [
    "Bank",
    "LoraConfig",
    "QuantizedKernel",
    "Site",
    "adapter_layout",
    "adapter_specs",
    "combine",
    "dequantize",
    "generate",
    "generate_text",
    "init",
    "kernel_layouts",
    "load_adapter",
    "lora_apply",
    "merge",
    "merged_apply",
    "nbytes",
    "nnx_adapt",
    "optimizer",
    "partition",
    "quantize",
    "routed_apply",
    "save_adapter",
    "sites",
    "split",
    "summary",
    "targets",
    "unmerge",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Adapter files need the model zoo and safetensors; load them on first use so that
    # importing the core stays light for projects that only transform trees.
    if name in ("load_adapter", "save_adapter"):
        from lora_jax import io

        return getattr(io, name)
    raise AttributeError(f"module 'lora_jax' has no attribute {name!r}")
