"""lora_jax: LoRA for JAX/Flax as a pure parameter-tree transform.

The core (config, tree, apply) holds no model, training or I/O code; `lora_jax.models` holds
the Flax model zoo and `lora_jax.io` adapter files in peft's format.
"""

from __future__ import annotations

from lora_jax.lazy import attributes
from lora_jax.machine import cpu_alone

cpu_alone()  # before anything imports jax: no libtpu warnings on a host without a TPU

# Each public name and the module that holds it. Names load on first use, so `import
# lora_jax` is instant (the `lora-jax` command installs its signal handlers before anything
# slow is imported) and projects that only transform trees never load the zoo or safetensors.
_HOMES = {
    **dict.fromkeys(
        ("kernel_layouts", "lora_apply", "merged_apply", "nnx_adapt", "routed_apply"), "apply"
    ),
    **dict.fromkeys(("AdaLora", "LoraConfig"), "config"),
    **dict.fromkeys(("adalora_allocator", "adalora_penalty", "adalora_ranks"), "adalora"),
    # `generation`, not `generate`: a submodule's import binds its name on the package.
    **dict.fromkeys(("generate", "generate_text"), "generation"),
    **dict.fromkeys(("QuantizedKernel", "dequantize", "loftq", "nbytes", "quantize"), "quant"),
    **dict.fromkeys(
        (
            "Bank",
            "Site",
            "adapter_layout",
            "adapter_specs",
            "combine",
            "init",
            "merge",
            "optimizer",
            "partition",
            "sites",
            "split",
            "summary",
            "targets",
            "unmerge",
        ),
        "tree",
    ),
    **dict.fromkeys(("load_adapter", "save_adapter"), "io"),
    "ConvLayout": "kinds",
}
__all__ = sorted(_HOMES)
__version__ = "0.1.0"


__getattr__, __dir__ = attributes(__name__, _HOMES)
