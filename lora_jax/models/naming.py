"""Our params paths <-> torch's module and tensor names, both ways, in one record.

Our module trees mirror transformers' names, so one rule maps every tensor: the keys joined
by ".", the layer index put back after the key that numbers a scanned stack (its axis 0),
`weight` <-> kernel (transposed, unless `fan_in_fan_out`; a convolution's (*spatial, in,
out) <-> (out, in, *spatial)) / scale / embedding, `bias` <-> bias. peft's adapter files add
a prefix and its factors' names (`lora_A.weight`, ...).

A mixture of experts' kernels are torch parameters of its `experts` module, (E, out, in),
named after our module (`mlp.experts.gate_up_proj`); peft adapts them as
`target_parameters`, one wrapper module per parameter nested in the parameters' order. The
per-expert tensors checkpoint files hold instead (`experts.{e}.w1.weight`) are `ExpertFiles`'.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from lora_jax.kinds import from_torch, to_torch
from lora_jax.tree import KERNEL, LORA_A, LORA_B, LORA_E, LORA_M, path_str

LEAF_TO_HF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
PEFT_PREFIX = "base_model.model."
# peft's tensor name, after the module's, for each of our adapter leaves (DoRA: magnitude).
PEFT_LEAVES = {LORA_A: "lora_A.weight", LORA_B: "lora_B.weight", LORA_M: "lora_magnitude_vector"}
# AdaLoRA's (peft_type ADALORA): its factors are bare parameters, not Linear modules.
ADALORA_LEAVES = {LORA_A: "lora_A", LORA_B: "lora_B", LORA_E: "lora_E"}
EXPERTS = "experts"  # the key of the module that holds a mixture's stacked expert kernels
# The parameters transformers' experts modules (Mixtral, Qwen3-MoE, ...) define, in order.
TRANSFORMERS_EXPERTS = ("gate_up_proj", "down_proj")
WRAPPED = ".base_layer"  # peft's name for the module a wrapper wraps


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
    # The parameters of an `experts` module (our modules of that name's children), in the
    # order torch's module defines them: peft nests its wrappers of them in that order.
    experts: tuple[str, ...] = ()
    # Modules torch holds as a bare weight parameter, not a Linear (a MoE router: mlp.gate),
    # which peft adapts through target_parameters ("mlp.gate.weight").
    bare: tuple[str, ...] = ()
    files: ExpertFiles | None = None  # how checkpoint files name the experts, if not as torch

    @classmethod
    def implied(cls, names: Iterable[str], **fields: Any) -> Naming:
        """The Naming torch module or tensor names imply: layers numbered under the key
        before an index (`model.layers.0.q_proj`: "layers"), none where no name holds one;
        transformers' expert parameters where a name holds `.experts.`."""
        keys = set()
        names = list(names)
        for name in names:
            parts = name.split(".")
            keys |= {parts[i - 1] for i, p in enumerate(parts[1:], 1) if p.isdigit()}
        if len(keys) > 1:
            raise ValueError(f"module names number their layers under several keys "
                             f"{sorted(keys)}; pass naming=models.Naming(layers=...).")  # fmt: skip
        if any(f".{EXPERTS}." in name for name in names):  # transformers' MoE, as peft wraps it
            fields.setdefault("experts", TRANSFORMERS_EXPERTS)
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

    def expert(self, module: Keys) -> bool:
        """Whether the module at these keys is one of a mixture's stacked expert kernels."""
        return len(module) > 1 and module[-2] == EXPERTS and module[-1] in self.experts

    def _bare(self, module: Keys) -> bool:
        """Whether the module at these keys is one torch holds as a bare weight (a router)."""
        return bool(module) and module[-1] in self.bare and not self.expert(module)

    def parameter(self, module: Keys) -> str | None:
        """The torch parameter name peft's target_parameters would give the kernel of the
        module at these keys, with the layer index left out ("mlp.experts.down_proj",
        "mlp.gate.weight"); None for a Linear module (target_modules)."""
        if not (self.expert(module) or self._bare(module)):
            return None
        name = self.names((*module, KERNEL), 1)[0]
        return re.sub(rf"^(.*\.)?{self.layers}\.\d+\.", "", name) if self.layers else name

    def names(self, keys: Keys, layers: int) -> list[str]:
        """torch's tensor names of one leaf: one per layer for a stacked leaf, else one."""
        if keys[-1] not in LEAF_TO_HF:
            raise ValueError(f"{path_str(keys)}: not a model parameter (an adapter leaf? "
                             "merge it first with lj.merge).")  # fmt: skip
        if self.expert(keys[:-1]):  # a parameter of the experts module, named as our module
            return self.modules(keys[:-1], layers)
        return [f"{m}.{LEAF_TO_HF[keys[-1]]}" for m in self.modules(keys[:-1], layers)]

    def transposed(self, keys: Keys) -> bool:
        """Whether this leaf is stored transposed in torch (`to_torch` / `from_torch` map it)."""
        return keys[-1] == KERNEL and not self.fan_in_fan_out

    def torch_layout(self, keys: Keys, array: Any) -> Any:
        """One layer of the leaf at `keys` as torch stores it (experts: (E, out, in))."""
        if self.expert(keys[:-1]):
            return array.swapaxes(-1, -2)
        return to_torch(array) if self.transposed(keys) else array

    def our_layout(self, keys: Keys, tensor: Any) -> Any:
        """A torch tensor as the leaf at `keys` holds it: `torch_layout` inverted."""
        if self.expert(keys[:-1]):
            return tensor.swapaxes(-1, -2)
        return from_torch(tensor) if self.transposed(keys) else tensor

    def pattern_key(self, module: Keys, name: str) -> str:
        """The name peft matches rank_pattern / alpha_pattern keys against for the adapter of
        torch module `name` (at our `module` keys): its parameter's for target_parameters
        (`...mlp.gate.weight`, `...experts.down_proj`), else the module's."""
        return f"{name}.{LEAF_TO_HF[KERNEL]}" if self._bare(module) else name

    def targeted(self, target_parameters: Iterable[str]) -> list[str]:
        """The expert parameters peft's `target_parameters` name (peft matches a parameter's
        full name or a dotted suffix of it), in torch's order."""
        chosen = list(target_parameters)
        return [p for p in self.experts
                if any(t == p or t.endswith(f"{EXPERTS}.{p}") for t in chosen)]  # fmt: skip

    def peft_module(self, name: str, targeted: list[str]) -> str:
        """peft's module name for the adapter of torch module `name`: an expert parameter's
        (`...experts.down_proj`) is its wrapper's, the experts module with one `.base_layer`
        per targeted parameter torch defines after it (peft wraps them in order)."""
        experts, _, param = name.rpartition(".")
        if param not in targeted or not experts.endswith(EXPERTS):
            return name
        return experts + WRAPPED * (len(targeted) - 1 - targeted.index(param))

    def tensors(self, params: dict[str, Any]) -> Iterator[tuple[str, jax.Array]]:
        """(checkpoint name, tensor in torch's layout) for every leaf of a params tree."""
        for keys, value in traverse_util.flatten_dict(params).items():
            stacked = self.stacked(keys)
            names = self.names(keys, value.shape[0] if stacked else 1)
            for layer, array in enumerate(value if stacked else [value]):
                name, tensor = self.layer_tensor(keys, layer, len(names), array)
                yield name, jnp.asarray(tensor)

    def layer_tensor(self, keys: Keys, layer: int, layers: int, array: Any) -> tuple[str, Any]:
        """(checkpoint name, tensor in torch's layout: a view where it can be) of one layer of
        the leaf at `keys` (of `layers`; 0 of 1 for a leaf that is not stacked)."""
        return self.names(keys, layers)[layer], self.torch_layout(keys, array)

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

    def peft_entry(
        self, name: str, known: Modules | None = None, targeted: list[str] | None = None
    ) -> tuple[Keys, int | None, str]:
        """(our leaf's keys, layer index or None, torch module name) of a peft tensor name:
        `peft_name` inverted. `known` (the base's modules and their leaves) places NNX list
        items and picks the leaf a `weight` is (kernel, scale or embedding); `targeted` (the
        expert parameters the file's target_parameters name, `Naming.targeted`) unwraps
        peft's nested expert wrappers."""
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
        if leaf is not None and targeted:
            module = self._unwrapped(name, module, targeted)
        keys, layer = self.module_keys(module, known)
        if leaf is None:
            leaves = (known or {}).get(keys, ())
            leaf = "bias" if tensor == "bias" else next(
                (n for n in leaves if LEAF_TO_HF.get(n) == "weight"), KERNEL)  # fmt: skip
        return (*keys, leaf), layer, module

    def _unwrapped(self, name: str, module: str, targeted: list[str]) -> str:
        """`peft_module` inverted: the expert parameter a peft wrapper's name stands for."""
        depth = 0
        while module.endswith(WRAPPED):
            module, depth = module[: -len(WRAPPED)], depth + 1
        if not module.endswith(EXPERTS):
            return module + WRAPPED * depth
        if depth >= len(targeted):
            raise ValueError(
                f"{name}: {depth} nested wrappers, but adapter_config.json's "
                f"target_parameters name {targeted} of this model's experts."
            )
        return f"{module}.{targeted[len(targeted) - 1 - depth]}"


@dataclasses.dataclass(frozen=True)
class ExpertFiles:
    """How checkpoint files name a mixture's experts, where they differ from torch's run-time
    names (transformers' conversion_mapping): each expert apart, under `module` in place of
    `mlp`, and each fused parameter as its `parts` side by side on the output axis
    (Mixtral's gate_up_proj: experts.{e}.w1.weight and experts.{e}.w3.weight)."""

    module: str  # the files' name for the block (Mixtral: block_sparse_moe)
    parts: tuple[tuple[str, tuple[str, ...]], ...]  # (parameter, its per-expert parts)

    def renamed(self, name: str) -> str:
        """A run-time name (not an expert parameter's) as the files write it."""
        return name.replace(".mlp.", f".{self.module}.")

    def sources(self, name: str, experts: int) -> list[list[str]] | None:
        """For an expert parameter's run-time name, the files' names of its parts, each a list
        over the experts; None for any other name."""
        head, _, param = name.rpartition(".")
        parts = dict(self.parts).get(param)
        if parts is None or not head.endswith(f".{EXPERTS}"):
            return None
        head = self.renamed(head + ".")
        return [[f"{head}{e}.{part}.weight" for e in range(experts)] for part in parts]

    def split(self, name: str, tensor: Any) -> list[tuple[str, Any]]:
        """An expert parameter (E, out, in) as the files hold it: one tensor per expert and
        part (the output axis split evenly); any other tensor renamed."""
        sources = self.sources(name, tensor.shape[0])
        if sources is None:
            return [(self.renamed(name), tensor)]
        size = tensor.shape[1] // len(sources)  # slices, not a split: views of a numpy array
        pieces = [tensor[:, i * size : (i + 1) * size] for i in range(len(sources))]
        return [(n, piece[e]) for names, piece in zip(sources, pieces, strict=True)
                for e, n in enumerate(names)]  # fmt: skip
