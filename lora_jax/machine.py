"""What this host has, found without importing jax: `import lora_jax` and the `lora-jax`
entry point settle jax's platforms before jax loads."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import MutableMapping
from importlib.metadata import entry_points
from pathlib import Path

DEV = Path("/dev")


def tpu_chips(dev: Path = DEV) -> bool:
    """Whether this host has TPU chips (accel* devices up to v5e, vfio groups from v5p and
    v6e)."""
    return any(dev.glob("accel*")) or any(p.name.isdigit() for p in dev.glob("vfio/*"))


def on_tpu_vm(dev: Path = DEV) -> bool:
    """Whether this host has TPU chips for libtpu to run."""
    return tpu_chips(dev) and importlib.util.find_spec("libtpu") is not None


def cpu_alone(environ: MutableMapping[str, str] = os.environ, dev: Path = DEV) -> None:
    """JAX_PLATFORMS=cpu (unless it is set) where libtpu is installed but this host has no
    TPU and no other accelerator plugin (CUDA, ROCm) is installed: libtpu, loaded by jax to
    look for chips, prints warnings about the TPU VM it did not find on every command and
    every `import jax`. The CPU is all jax would find anyway; `lora-jax compile` loads
    libtpu for its compiler all the same."""
    if "JAX_PLATFORMS" in environ or importlib.util.find_spec("libtpu") is None:
        return
    plugins = importlib.util.find_spec("jax_plugins") or entry_points(group="jax_plugins")
    if tpu_chips(dev) or plugins:
        return
    environ["JAX_PLATFORMS"] = "cpu"
