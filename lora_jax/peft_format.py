"""peft's adapter format beyond tensor names and layouts (those are `models.naming` and
`lora_jax.kinds`): one record per variant, what a PiSSA/OLoRA adapter becomes for the
original base, and adapter_config.json both ways.

A variant's record (`Plain`, `DoRA`, `AdaLoRA`) owns its part of the files: the leaves it
writes and their tensor names, its adapter_config.json fields and the settings they give
back, and AdaLoRA's pruned ranks (sliced off each layer on save, put back as zeros on load).
`io.save_adapter` / `load_adapter` ask the record; neither branches on a variant.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lora_jax.config import AdaLora, LoraConfig
from lora_jax.models.naming import ADALORA_LEAVES, Naming
from lora_jax.tree import LORA_A, LORA_B, LORA_E, LORA_M, Params, as_dict, path_str
from lora_jax.variants import BASE_MODIFYING_INITS

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
UNSUPPORTED = ("lora_bias", "layers_to_transform")  # adapter_config.json fields we refuse


def params_of(tree: Params) -> Params:
    """A tree's params as nested dicts: an NNX State's pure dict, a variables dict's params."""
    tree = as_dict(tree)
    return tree.get("params", tree)


# ----------------------------------------------------------------------------- variants


class Plain:
    """Plain LoRA: A and B (Linear modules' weights in peft), peft_type LORA."""

    label: str | None = None  # the variant's name where vLLM does not serve it
    peft_type = "LORA"
    leaves = (LORA_A, LORA_B)
    experts = True  # peft adapts a mixture's experts (target_parameters) with it

    def trains(self, config: LoraConfig) -> bool:
        """Whether `config` trains this variant (plain LoRA: any the others leave)."""
        return True

    def written_in(self, peft_config: Mapping[str, Any]) -> bool:
        """Whether adapter_config.json describes this variant."""
        return peft_config.get("peft_type") == self.peft_type

    def tensor_name(self, naming: Naming, module: str, leaf: str) -> str:
        """peft's name for one of the module's leaves."""
        return naming.peft_name(module, leaf)

    def pruned(self, name: str, layer: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(one layer's tensors in peft's layout as the file holds them, rank_pattern entries
        they need); as they are."""
        return layer, {}

    def restored(self, name: str, module: str, leaf: str, tensor: Any, peft_config: dict) -> Any:
        """A file's tensor of torch module `module` as `pruned` took it: as it is."""
        return tensor

    def fields(self, config: LoraConfig, kept: dict[str, Any]) -> dict[str, Any]:
        """adapter_config.json's entries of this variant (over the plain ones)."""
        return {}

    def settings(self, peft_config: Mapping[str, Any]) -> dict[str, Any]:
        """The LoraConfig fields the variant's entries give back."""
        return {"rank": peft_config["r"]}


class DoRA(Plain):
    """DoRA: a learned magnitude per output unit beside A and B, `use_dora` in the config."""

    label = "DoRA"
    leaves = (LORA_A, LORA_B, LORA_M)
    experts = False

    def trains(self, config: LoraConfig) -> bool:
        return config.use_dora

    def written_in(self, peft_config: Mapping[str, Any]) -> bool:
        return super().written_in(peft_config) and bool(peft_config.get("use_dora"))

    def fields(self, config: LoraConfig, kept: dict[str, Any]) -> dict[str, Any]:
        return {"use_dora": True}

    def settings(self, peft_config: Mapping[str, Any]) -> dict[str, Any]:
        return {"rank": peft_config["r"], "use_dora": True}


class AdaLoRA(Plain):
    """AdaLoRA (peft_type ADALORA): A, B and E as bare parameters; each layer's pruned ranks
    (E = 0) are sliced off, the kept ones listed per module in rank_pattern; a convolution's
    factors are matrices, as peft's SVDConv2d holds them: A (r, in·kh·kw), B (out, r)."""

    label = "AdaLoRA"
    peft_type = "ADALORA"
    leaves = (LORA_A, LORA_B, LORA_E)
    experts = False

    def trains(self, config: LoraConfig) -> bool:
        return config.adalora is not None

    def tensor_name(self, naming: Naming, module: str, leaf: str) -> str:
        return naming.peft_name(module, leaf, adalora=True)

    def pruned(self, name: str, layer: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        keep = np.asarray(layer[LORA_E]).reshape(-1) != 0
        index = np.flatnonzero(keep)
        a, b, e = layer[LORA_A][index], layer[LORA_B][:, index], layer[LORA_E][index]
        flat_a = a.reshape(len(index), math.prod(a.shape[1:]))  # a layer may keep no rank
        out = {LORA_A: flat_a, LORA_B: b.reshape(b.shape[:2]), LORA_E: e}
        return out, {f"{name}.{ADALORA_LEAVES[LORA_E]}": keep.tolist()}

    def restored(self, name: str, module: str, leaf: str, tensor: Any, peft_config: dict) -> Any:
        """The pruned ranks put back as zeros where rank_pattern says, so every layer has
        init_r ranks again (as in training)."""
        rank = peft_config["init_r"]
        pattern = (peft_config.get("rank_pattern") or {}).get(f"{module}.{ADALORA_LEAVES[LORA_E]}")
        keep = np.ones(rank, bool) if pattern is None else np.asarray(pattern, bool)
        axis = 1 if leaf == LORA_B else 0  # peft's layout: A (r, in), B (out, r), E (r, 1)
        if keep.shape != (rank,) or tensor.ndim <= axis or tensor.shape[axis] != keep.sum():
            got = tensor.shape[axis] if tensor.ndim > axis else tensor.shape
            raise ValueError(f"{name}: {got} ranks, but adapter_config.json's rank_pattern "
                             f"keeps {int(keep.sum())} of {keep.size} for {module} (init_r "
                             f"{rank}).")  # fmt: skip
        full = np.zeros((rank, *np.delete(tensor.shape, axis)), tensor.dtype)
        full[keep] = np.moveaxis(tensor, axis, 0)
        return np.moveaxis(full, 0, axis)

    def fields(self, config: LoraConfig, kept: dict[str, Any]) -> dict[str, Any]:
        """peft's AdaLoraConfig: the schedule, and the ranks kept per module in rank_pattern.
        peft ignores `r` (init_r is the rank) and warns unless it is its default, 8."""
        spec = config.adalora
        if spec.total_steps is None:
            raise ValueError("save_adapter: peft needs AdaLora.total_steps (> 0) in the config.")
        return {"peft_type": self.peft_type, "r": 8, "init_r": config.rank,
                "target_r": spec.target_rank, "tinit": spec.tinit, "tfinal": spec.tfinal,
                "deltaT": spec.delta_t, "beta1": spec.beta1, "beta2": spec.beta2,
                "orth_reg_weight": spec.orth_reg_weight, "total_step": spec.total_steps,
                "rank_pattern": kept}  # fmt: skip

    def settings(self, peft_config: Mapping[str, Any]) -> dict[str, Any]:
        """`fields` inverted: the rank and the schedule the file was trained with."""
        spec = AdaLora(target_rank=peft_config["target_r"], total_steps=peft_config["total_step"],
                       tinit=peft_config["tinit"], tfinal=peft_config["tfinal"],
                       delta_t=peft_config["deltaT"], beta1=peft_config["beta1"],
                       beta2=peft_config["beta2"],
                       orth_reg_weight=peft_config["orth_reg_weight"])  # fmt: skip
        return {"rank": peft_config["init_r"], "adalora": spec}


# peft's target_modules for every linear layer but the output layer (a head it leaves out).
ALL_LINEAR = "all-linear"
OUTPUT_LAYERS = ("lm_head", "score", "classifier")

# Every variant's record; the first that claims a config or a file is its variant.
VARIANTS = (AdaLoRA(), DoRA(), Plain())


def variant_of(config: LoraConfig) -> Plain:
    """The record of the variant a config trains."""
    return next(v for v in VARIANTS if v.trains(config))


def check_file(
    peft_config: Mapping[str, Any], ranks: dict[str, int], leaves: dict[str, set[str]],
    names: dict[str, set[str]],
) -> None:  # fmt: skip
    """A ValueError naming the key where adapter_config.json contradicts the tensors it came
    with (the tensors are the truth): a missing key its variant needs, a pattern that is no
    regex, `r` / `rank_pattern` giving a module another rank than its A has, `use_dora`
    without (or tensors with) DoRA's magnitudes, a module `target_modules` does not pick.
    `ranks`, `leaves` and `names`: each adapted module's rank, leaves and torch names."""
    variant = file_variant(peft_config)
    _check_types(peft_config, variant)
    for key in ("rank_pattern", "alpha_pattern"):
        for pattern in peft_config.get(key) or {}:
            try:
                re.compile(rf"(.*\.)?({pattern})$")
            except re.error as err:
                raise ValueError(f"{key} {pattern!r} is not a regex ({err}).") from None
    try:
        rank = variant.settings(peft_config)["rank"]
        for key, value in (("r", rank), ("lora_alpha", peft_config.get("lora_alpha"))):
            if value is None:  # absent, or null (peft never writes either)
                raise KeyError(key)
    except KeyError as err:
        raise ValueError(f"no {err.args[0]!r}, which a {variant.peft_type} adapter "
                         "needs.") from None  # fmt: skip
    targets, by_parameter = peft_config.get("target_modules"), peft_config.get("target_parameters")
    kind = f"{variant.label or 'LoRA'} adapter (use_dora {bool(peft_config.get('use_dora'))})"
    for module, found in ranks.items():
        name = min(names[module])
        if extra := leaves[module] - set(variant.leaves):
            raise ValueError(f"a {kind}, but {name} has {sorted(extra)} tensors too.")
        if missing := set(variant.leaves) - leaves[module]:
            raise ValueError(f"a {kind}, but {name} has no {sorted(missing)} tensors.")
        if (
            not isinstance(variant, AdaLoRA)
            and (given := peft_value(peft_config.get("rank_pattern") or {}, name, rank)) != found
        ):
            raise ValueError(f"r / rank_pattern give {name} rank {given}, but its lora_A "
                             f"has rank {found}.")  # fmt: skip
        if (targets is not None and not by_parameter
                and not all(_targets(targets, n) for n in names[module])):  # fmt: skip
            raise ValueError(f"target_modules {targets!r} does not pick {name}, which holds "
                             "adapter tensors.")  # fmt: skip


def _check_types(peft_config: Mapping[str, Any], variant: Plain) -> None:
    """A ValueError naming the first key whose value has a type peft never writes there (a
    rank of "8", a rank_pattern list): read as it stands, it would be a traceback, or a
    comparison that calls 8 and "8" different ranks."""
    count = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1  # noqa: E731
    alpha = lambda v: (isinstance(v, int | float) and not isinstance(v, bool)  # noqa: E731
                       and math.isfinite(v) and v > 0)  # fmt: skip
    ranks = (lambda v: True) if isinstance(variant, AdaLoRA) else count  # AdaLoRA's: masks
    types = {
        "r": (count, "a whole number >= 1"),
        "init_r": (count, "a whole number >= 1"),
        "target_r": (count, "a whole number >= 1"),
        "lora_alpha": (alpha, "a number > 0"),
        "use_dora": (lambda v: isinstance(v, bool), "true or false"),
        "rank_pattern": (lambda v: isinstance(v, dict) and all(map(ranks, v.values())),
                         "an object of module patterns and ranks"),
        "alpha_pattern": (lambda v: isinstance(v, dict) and all(map(alpha, v.values())),
                          "an object of module patterns and alphas"),
        "target_modules": (lambda v: isinstance(v, str) or (isinstance(v, list) and all(
                           isinstance(n, str) for n in v)), "a name pattern or a list of names"),
    }  # fmt: skip
    for key, (valid, what) in types.items():
        if (value := peft_config.get(key)) is not None and not valid(value):
            raise ValueError(f"{key} is {json.dumps(value)[:60]}, not {what}.")


def _targets(target_modules: str | list[str], name: str) -> bool:
    """peft's rule: a string full-matches the module's name ("all-linear": every linear
    layer but the output layer); a list picks it by its last parts."""
    if target_modules == ALL_LINEAR:
        return not name.endswith(OUTPUT_LAYERS)
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in target_modules)


def file_variant(peft_config: Mapping[str, Any]) -> Plain:
    """The record of the variant an adapter_config.json describes; ValueError for a
    peft_type none writes."""
    if variant := next((v for v in VARIANTS if v.written_in(peft_config)), None):
        return variant
    types = sorted({v.peft_type for v in VARIANTS})
    raise ValueError(f"peft_type {peft_config.get('peft_type')!r}, not {' or '.join(types)}.")


# ----------------------------------------------------------------------------- init conversions


def for_original_base(
    adapter: Params, config: LoraConfig, initial: Params | None, leads: dict[tuple, int]
) -> tuple[Params, LoraConfig]:
    """(adapter, config) as peft saves them: a PiSSA/OLoRA adapter, whose init rewrote the
    base, as a plain one on the original W0 (given its `initial` value: the update
    s·(A·B − A0·B0) is the rank-2r adapter [A, A0], [B; −B0] with alpha doubled, ×√2 with
    rsLoRA, so the scale and the model are unchanged); any other as it is. `leads`: each
    adapted module's leading axes."""
    if config.init not in BASE_MODIFYING_INITS:
        return adapter, config
    if initial is None:
        warnings.warn(f"init={config.init!r} rewrote the base kernels, so this adapter fits only "
                      "that residual base, not the original model that peft and vLLM load. Pass "
                      "initial_adapter= (lj.split's adapter right after lj.init) to convert it.",
                      stacklevel=3)  # fmt: skip
        return adapter, config
    if config.use_dora:
        raise ValueError("save_adapter: converting a DoRA adapter with a PiSSA/OLoRA init is "
                         "not supported; merge it instead.")  # fmt: skip
    flat = traverse_util.flatten_dict(params_of(adapter))
    first = traverse_util.flatten_dict(params_of(initial))
    out = {}
    for keys, value in flat.items():
        if keys[-1] not in (LORA_A, LORA_B):
            out[keys] = value
            continue
        if keys not in first or first[keys].shape != value.shape:
            raise ValueError(f"{path_str(keys)}: initial_adapter does not match the adapter.")
        rank_axis = -1 if keys[-1] == LORA_A else leads[keys[:-1]]
        start = first[keys] if keys[-1] == LORA_A else -first[keys]
        out[keys] = jnp.concatenate([value, start.astype(value.dtype)], axis=rank_axis)
    return traverse_util.unflatten_dict(out), converted_config(config)


def converted_config(config: LoraConfig) -> LoraConfig:
    """The config of a PiSSA/OLoRA adapter saved for the original base (`save_adapter` with
    `initial_adapter`): a plain init, rank doubled, alpha doubled (×√2 with rsLoRA), so every
    scale is unchanged; what a run uses to read such an adapter back onto that base."""
    factor = math.sqrt(2) if config.use_rslora else 2.0
    return dataclasses.replace(
        config,
        init="gaussian",
        rank=2 * config.rank,
        alpha=factor * config.alpha,
        rank_pattern={p: 2 * r for p, r in config.rank_pattern},
        alpha_pattern={p: factor * a for p, a in config.alpha_pattern},
    )


# ----------------------------------------------------------------------------- adapter_config.json


@dataclasses.dataclass(frozen=True)
class Entry:
    """One adapted module as the file holds it: its tensors, and what adapter_config.json
    says of it."""

    tensors: dict[str, Any]
    modules: list[str]  # torch module names it targets (none: a target parameter's)
    parameter: str | None  # its torch parameter, where peft targets it by target_parameters
    pattern: str  # the regex rank_pattern / alpha_pattern would key it by
    rank: int
    alpha: float
    kept: dict[str, Any]  # the variant's rank_pattern entries (AdaLoRA's kept ranks)


def exact(names: list[str]) -> str:
    """A regex matching exactly these strings, with layer indices generalised to \\d+."""
    alternatives = sorted({re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(n)) for n in names})
    return alternatives[0] if len(alternatives) == 1 else "(" + "|".join(alternatives) + ")"


def peft_value(pattern: dict[str, Any], name: str, default: Any) -> Any:
    """peft's rule: the first key k with (.*\\.)?(k)$ matching the module name."""
    return next((v for k, v in pattern.items() if re.match(rf"(.*\.)?({k})$", name)), default)


def adapter_config(
    config: LoraConfig, naming: Naming, entries: list[Entry], saved: list[str],
    base: Params, base_model_id: str | None,
) -> dict[str, Any]:  # fmt: skip
    """adapter_config.json for the adapted modules' `entries` and the fully trained tensors
    `saved` (torch names) on `base` (params or their shapes), warning where vLLM could not
    serve the adapter (a causal LM's: the only kind vLLM serves)."""
    variant, parameters = variant_of(config), sorted({e.parameter for e in entries} - {None})
    ranks = {e.pattern: e.rank for e in entries}
    if naming.task_type == "CAUSAL_LM":
        _vllm_warnings(set(ranks.values()), saved, variant.label)
    kernels, names = _base_modules(naming, base)
    adapted = [m for e in entries for m in e.modules]
    fields = {
        "peft_type": variant.peft_type,
        "task_type": naming.task_type,
        "base_model_name_or_path": base_model_id,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "target_modules": _target_modules(adapted, kernels),
        "rank_pattern": {k: r for k, r in ranks.items() if r != config.rank},
        "alpha_pattern": {e.pattern: e.alpha for e in entries if e.alpha != config.alpha},
        "modules_to_save": _saved_modules(saved, names),
        "lora_dropout": config.dropout,
        "fan_in_fan_out": naming.fan_in_fan_out,
        "bias": "none",
        "use_rslora": config.use_rslora,
        "use_dora": False,
        "init_lora_weights": config.init if config.init in BASE_MODIFYING_INITS else True,
        "inference_mode": True,
    }
    if parameters:  # bare weights (a mixture's experts and router): peft >= 0.17
        fields["target_parameters"] = parameters
        if config.dropout:
            warnings.warn(f"peft refuses lora_dropout={config.dropout} on target_parameters "
                          f"({parameters}): to load this adapter there, set lora_dropout to 0 in "
                          "its adapter_config.json (dropout does not act at inference).",
                          stacklevel=3)  # fmt: skip
    return fields | variant.fields(config, {k: v for e in entries for k, v in e.kept.items()})


def lora_config(
    peft_config: Mapping[str, Any], ranks: dict[str, int], alphas: dict[str, float],
    saved: list[str],
) -> LoraConfig:  # fmt: skip
    """The LoraConfig that explains a file: adapter_config.json's settings with the adapted
    modules' `ranks` and `alphas` and the fully trained leaves `saved` (our paths)."""
    settings = file_variant(peft_config).settings(peft_config)
    rank, alpha = settings["rank"], peft_config["lora_alpha"]
    return LoraConfig(
        **settings,
        alpha=alpha,
        targets=("^(" + "|".join(re.escape(p) for p in ranks) + ")$",),
        rank_pattern={f"^{re.escape(p)}$": r for p, r in ranks.items() if r != rank},
        alpha_pattern={f"^{re.escape(p)}$": a for p, a in alphas.items() if a != alpha},
        modules_to_save=tuple(f"^{re.escape(p)}$" for p in saved),
        dropout=peft_config.get("lora_dropout") or 0.0,
        use_rslora=bool(peft_config.get("use_rslora")),
    )


def _base_modules(naming: Naming, base: Params) -> tuple[list[str], list[str]]:
    """(torch names of the base's Linear modules, of all its tensors): what target_modules
    and modules_to_save are chosen among."""
    flat = traverse_util.flatten_dict(base)
    layers = lambda k, s: s.shape[0] if naming.stacked(k) else 1  # noqa: E731
    kernels = [n for k, s in flat.items() if k[-1] == "kernel" and naming.parameter(k[:-1]) is None
               for n in naming.modules(k[:-1], layers(k, s))]  # fmt: skip
    return kernels, [n for k, s in flat.items() for n in naming.names(k, layers(k, s))]


def _target_modules(adapted: list[str], all_modules: list[str]) -> list[str] | str:
    """peft's target_modules: module suffixes when they pick exactly the adapted modules (what
    vLLM and most tools expect), else a regex that peft full-matches."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    picked = {n for n in all_modules if n.rsplit(".", 1)[-1] in suffixes}
    return suffixes if picked == set(adapted) else exact(adapted)


def _saved_modules(saved: list[str], base_names: list[str]) -> list[str] | None:
    """peft's modules_to_save: for each saved tensor, its largest enclosing module whose tensors
    are all saved (e.g. "classifier", the name peft itself uses for a sequence-classification
    head, rather than "classifier.dense" and "classifier.out_proj")."""
    done, modules = set(saved), set()
    for name in saved:
        parts = name.split(".")[:-1]
        for k in range(1, len(parts) + 1):
            prefix = ".".join(parts[:k]) + "."
            if all(n in done for n in base_names if n.startswith(prefix)):
                modules.add(prefix[:-1])
                break
    return sorted(modules) or None


def _vllm_warnings(ranks: set[int], saved: list[str], variant: str | None) -> None:
    if variant:
        warnings.warn(f"vLLM does not serve {variant} adapters; serve a merged model instead.",
                      stacklevel=4)  # fmt: skip
    if bad := sorted(r for r in ranks if r not in VLLM_RANKS):
        warnings.warn(f"vLLM serves LoRA ranks {VLLM_RANKS}; this adapter has ranks {bad}.",
                      stacklevel=4)  # fmt: skip
    if saved:
        biases = " (including trained biases)" if any(n.endswith(".bias") for n in saved) else ""
        warnings.warn(f"vLLM does not load fully trained modules (modules_to_save){biases}: "
                      f"{saved}; serve a merged model instead.", stacklevel=4)  # fmt: skip
