"""Our params paths <-> torch's module and tensor names, both ways, in one record.

Our module trees mirror transformers' names, so one rule maps every tensor: the keys joined
by ".", the layer index put back after the key that numbers a scanned stack (its axis 0),
`weight` <-> kernel (transposed, unless `fan_in_fan_out`; a convolution's (*spatial, in,
out) <-> (out, in, *spatial)) / scale / embedding, `bias` <-> bias. peft's adapter files add
a prefix and its factors' names (`lora_A.weight`, ...).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from lora_jax.tree import KERNEL, LORA_A, LORA_B, LORA_E, LORA_M, path_str

LEAF_TO_HF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
PEFT_PREFIX = "base_model.model."
# peft's tensor name, after the module's, for each of our adapter leaves (DoRA: magnitude).
PEFT_LEAVES = {LORA_A: "lora_A.weight", LORA_B: "lora_B.weight", LORA_M: "lora_magnitude_vector"}
# AdaLoRA's (peft_type ADALORA): its factors are bare parameters, not Linear modules.
ADALORA_LEAVES = {LORA_A: "lora_A", LORA_B: "lora_B", LORA_E: "lora_E"}


def to_torch(array: Any) -> Any:
    """A kernel in torch's layout: (in, out) -> (out, in), and a convolution's (*spatial, in,
    out) -> (out, in, *spatial); peft's factors A (.., in, r) and (r, out) map the same way."""
    n = array.ndim
    return array.transpose(n - 1, n - 2, *range(n - 2))


def from_torch(tensor: Any) -> Any:
    """`to_torch` inverted: (out, in, *spatial) -> (*spatial, in, out)."""
    n = tensor.ndim
    return tensor.transpose(*range(2, n), 1, 0)


Keys = tuple  # a params path: str keys, and int ones for the items of an NNX list
Modules = Mapping[Keys, Collection[str]]  # a base's module keys -> the leaf names it holds


@dataclasses.dataclass(frozen=True)
class Naming:
    """How a params tree's paths map to torch's module and tensor names, both ways: the keys
    joined by ".", with the layer index put after `layers` for a scanned stack (its axis 0),
    and `weight` <-> kernel (transposed, unless `fan_in_fan_out`) / scale / embedding,
    `bias` <-> bias.

    The zoo has one per family (`naming_of(hf_config)`); write one for your own Linen model
    whose torch twin has the same module names to exchange peft adapters with it."""

    layers: str | None = None  # the key under which torch numbers its layers
    fan_in_fan_out: bool = False  # kernels stored (in, out), as GPT-2's Conv1D does
    task_type: str | None = None  # peft's task_type, written in adapter_config.json

    @classmethod
    def implied(cls, names: Iterable[str], **fields: Any) -> Naming:
        """The Naming torch module or tensor names imply: layers numbered under the key
        before an index (`model.layers.0.q_proj`: "layers"), none where no name holds one."""
        keys = set()
        for name in names:
            parts = name.split(".")
            keys |= {parts[i - 1] for i, p in enumerate(parts[1:], 1) if p.isdigit()}
        if len(keys) > 1:
            raise ValueError(f"module names number their layers under several keys "
                             f"{sorted(keys)}; pass naming=models.Naming(layers=...).")  # fmt: skip
        return cls(layers=next(iter(keys), None), **fields)

    # ----------------------------------------------------------------- ours -> torch

    def stacked(self, keys: Keys) -> bool:
        """Whether the leaves under these keys hold one layer per index of axis 0."""
        return self.layers is not None and self.layers in keys

    def modules(self, modules: Keys, layers: int) -> list[str]:
        """torch's dotted module names for one of our module paths: one per layer if stacked."""
        parts = [str(k) for k in modules]  # int keys: an NNX list of layers
        if not self.stacked(modules):
            return [".".join(parts)]
        i = modules.index(self.layers) + 1
        return [".".join([*parts[:i], str(n), *parts[i:]]) for n in range(layers)]

    def names(self, keys: Keys, layers: int) -> list[str]:
        """Checkpoint names of one leaf: one per layer for a stacked leaf, else one."""
        if keys[-1] not in LEAF_TO_HF:
            raise ValueError(f"{path_str(keys)}: not a model parameter (an adapter leaf? "
                             "merge it first with lj.merge).")  # fmt: skip
        return [f"{m}.{LEAF_TO_HF[keys[-1]]}" for m in self.modules(keys[:-1], layers)]

    def transposed(self, keys: Keys) -> bool:
        """Whether this leaf is stored transposed in torch (`to_torch` / `from_torch` map it)."""
        return keys[-1] == KERNEL and not self.fan_in_fan_out

    def torch_layout(self, keys: Keys, array: Any) -> Any:
        """One layer of the leaf at `keys` as torch stores it."""
        return to_torch(array) if self.transposed(keys) else array

    def our_layout(self, keys: Keys, tensor: Any) -> Any:
        """A torch tensor as the leaf at `keys` holds it: `torch_layout` inverted."""
        return from_torch(tensor) if self.transposed(keys) else tensor

    def tensors(self, params: dict[str, Any]) -> Iterator[tuple[str, jax.Array]]:
        """(checkpoint name, tensor in torch's layout) for every leaf of a params tree."""
        for keys, value in traverse_util.flatten_dict(params).items():
            stacked = self.stacked(keys)
            names = self.names(keys, value.shape[0] if stacked else 1)
            for name, array in zip(names, value if stacked else [value], strict=True):
                yield name, jnp.asarray(self.torch_layout(keys, array))

    @staticmethod
    def peft_name(name: str, leaf: str | None = None, adalora: bool = False) -> str:
        """peft's tensor name for one of our adapter leaves (`PEFT_LEAVES`, or AdaLoRA's
        `ADALORA_LEAVES`) of the torch module `name`, or with no leaf for the torch tensor
        `name` of a fully trained module."""
        if leaf is None:
            return PEFT_PREFIX + name
        return f"{PEFT_PREFIX}{name}.{(ADALORA_LEAVES if adalora else PEFT_LEAVES)[leaf]}"

    # ----------------------------------------------------------------- torch -> ours

    def module_keys(self, module: str, known: Modules | None = None) -> tuple[Keys, int | None]:
        """(our module keys, layer index or None) of a torch module name: `modules` inverted.
        A name whose indices are list items in `known` (an NNX list of layers) keeps them."""
        parts = module.split(".")
        listed = tuple(int(p) if p.isdigit() else p for p in parts)
        if known is not None and listed in known:
            return listed, None
        if self.layers in parts[:-1] and parts[parts.index(self.layers) + 1].isdigit():
            i = parts.index(self.layers) + 1
            return tuple(parts[:i] + parts[i + 1 :]), int(parts[i])
        return listed, None

    def peft_entry(self, name: str, known: Modules | None = None) -> tuple[Keys, int | None, str]:
        """(our leaf's keys, layer index or None, torch module name) of a peft tensor name:
        `peft_name` inverted. `known` (the base's modules and their leaves) places NNX list
        items and picks the leaf a `weight` is (kernel, scale or embedding)."""
        if not name.startswith(PEFT_PREFIX):
            raise ValueError(f"{name}: not a peft tensor name (expected {PEFT_PREFIX}...).")
        rest = name[len(PEFT_PREFIX) :]
        suffixes = (*PEFT_LEAVES.items(), *ADALORA_LEAVES.items())
        leaf, suffix = next(((k, s) for k, s in suffixes if rest.endswith(f".{s}")), (None, ""))
        module, _, tensor = rest.rpartition(".")
        if leaf is not None:
            module = rest[: -len(suffix) - 1]
        elif tensor not in ("weight", "bias"):
            raise ValueError(f"{name}: neither a LoRA factor nor a module's weight or bias.")
        keys, layer = self.module_keys(module, known)
        if leaf is None:
            leaves = (known or {}).get(keys, ())
            leaf = "bias" if tensor == "bias" else next(
                (n for n in leaves if LEAF_TO_HF.get(n) == "weight"), KERNEL)  # fmt: skip
        return (*keys, leaf), layer, module
