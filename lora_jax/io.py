"""Adapter files in peft's format, both ways: adapter_config.json + adapter_model.safetensors.

peft stores A as (r, in), B as (out, r); ours are (in, r) and (r, out) with stacked layers
on axis 0; for a convolution peft's are (r, in, *spatial) and (out, r, 1, ...), ours
(*spatial, in, r) and (r, out). AdaLoRA's files (peft_type ADALORA) add E (r, 1) and slice
off each layer's pruned ranks, listing the kept ones in rank_pattern. Tensor names come from
a `models.Naming` (the only home of names and torch layouts, both ways).
Files are read from safetensors only: a pickle file can run code when loaded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.flax import save_file

from lora_jax.config import AdaLora, LoraConfig
from lora_jax.files import atomic_dir, check_finite, read_json
from lora_jax.models.hub import build, config_of, from_pretrained, naming_of
from lora_jax.models.naming import ADALORA_LEAVES, Naming, from_torch, to_torch
from lora_jax.tree import (
    ADAPTER_LEAVES,
    KERNEL,
    LORA_A,
    LORA_B,
    LORA_E,
    ConvLayout,
    Layouts,
    Params,
    as_dict,
    combine,
    kernel_layout,
    path_str,
    sites,
)
from lora_jax.variants import BASE_MODIFYING_INITS

# What a peft adapter directory holds (peft writes a model card; `lora-jax inspect` figures):
# an earlier adapter's, which a save replaces whole.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin",
                 "README.md", "*.png")  # fmt: skip
ADALORA = "ADALORA"
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
UNSUPPORTED = ("lora_bias", "layers_to_transform")


def _params(tree: Params) -> Params:
    tree = as_dict(tree)  # an NNX State: its pure dict
    return tree.get("params", tree)


def _exact(names: list[str]) -> str:
    """A regex matching exactly these strings, with layer indices generalised to \\d+."""
    alternatives = sorted({re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(n)) for n in names})
    return alternatives[0] if len(alternatives) == 1 else "(" + "|".join(alternatives) + ")"


def _target_modules(adapted: list[str], all_modules: list[str]) -> list[str] | str:
    """peft's target_modules: module suffixes when they pick exactly the adapted modules (what
    vLLM and most tools expect), else a regex that peft full-matches."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    picked = {n for n in all_modules if n.rsplit(".", 1)[-1] in suffixes}
    return suffixes if picked == set(adapted) else _exact(adapted)


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
                      stacklevel=3)  # fmt: skip
    if bad := sorted(r for r in ranks if r not in VLLM_RANKS):
        warnings.warn(f"vLLM serves LoRA ranks {VLLM_RANKS}; this adapter has ranks {bad}.",
                      stacklevel=3)  # fmt: skip
    if saved:
        biases = " (including trained biases)" if any(n.endswith(".bias") for n in saved) else ""
        warnings.warn(f"vLLM does not load fully trained modules (modules_to_save){biases}: "
                      f"{saved}; serve a merged model instead.", stacklevel=3)  # fmt: skip


def _relative_to_original(
    adapter: Params, initial: Params, config: LoraConfig, leads: dict[tuple, int]
) -> tuple[dict[str, Any], LoraConfig]:
    """A PiSSA/OLoRA adapter as a plain one on the original W0, as peft converts it: the update
    s·(A·B − A0·B0) is the rank-2r adapter [A, A0], [B; −B0] with alpha doubled (×√2 with
    rsLoRA), so the scale and the model are unchanged."""
    if config.use_dora:
        raise ValueError("save_adapter: converting a DoRA adapter with a PiSSA/OLoRA init is "
                         "not supported; merge it instead.")  # fmt: skip
    flat, first = traverse_util.flatten_dict(_params(adapter)), traverse_util.flatten_dict(
        _params(initial))  # fmt: skip
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


def save_adapter(
    out_dir: str | Path,
    adapter: Params,
    config: LoraConfig,
    *,
    hf_config: dict[str, Any] | None = None,
    naming: Naming | None = None,
    base: Params | None = None,
    base_model_id: str | None = None,
    initial_adapter: Params | None = None,
    layouts: Layouts | None = None,
) -> Path:
    """Writes the adapter as peft does for the matching torch model.

    For a zoo model, `hf_config` is the base's config.json (from `lj.models.from_pretrained`):
    it fixes the tensor names, the task type and GPT-2's fan_in_fan_out. For your own Linen
    model, pass its `naming` (`lora_jax.models.Naming`) and its `base` params (or their
    abstract shapes), which give every module's layout and name, and for a model with
    convolutions its `layouts` (`lj.kernel_layouts`), which say which kernels are
    convolutions: peft stores their factors as convolution weights. Warns when vLLM could not
    serve it (a causal LM's adapter: the only kind vLLM serves). PiSSA/OLoRA inits rewrote
    the base, so pass `initial_adapter` (the adapter of the tree `lj.init` returned) to save
    the adapter relative to the original model, as peft does.
    """
    if hf_config is not None:
        naming = naming_of(hf_config)
        if base is None:
            model = build(hf_config)
            base = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
    if naming is None or base is None:
        raise ValueError("save_adapter: pass hf_config= (a zoo model), or naming= and base= "
                         "(your own Linen model).")  # fmt: skip
    base = _params(base)
    flat = traverse_util.flatten_dict(_params(adapter))
    factors = {k: v for k, v in flat.items() if k[-1] in ADAPTER_LEAVES}
    found = sites(combine(traverse_util.unflatten_dict(factors), base), config, "save_adapter")
    if not found:
        raise ValueError("save_adapter: the tree holds no lora_a/lora_b leaves.")
    for site in found:
        grouped = naming.expert(site.keys)
        if site.lead != int(naming.stacked(site.keys)) + grouped:
            raise ValueError(f"save_adapter: {site.path} has {site.lead} leading axes, but the "
                             f"naming numbers layers under {naming.layers!r}"
                             + (" and it holds experts." if grouped else "."))  # fmt: skip
        if grouped and (config.adalora is not None or config.use_dora):
            raise ValueError(
                f"save_adapter: {site.path}: peft adapts experts "
                "(target_parameters) with plain LoRA only, not DoRA or AdaLoRA."
            )
    if config.init in BASE_MODIFYING_INITS and initial_adapter is not None:
        leads = {site.keys: site.lead for site in found}
        adapter, config = _relative_to_original(adapter, initial_adapter, config, leads)
        flat = traverse_util.flatten_dict(_params(adapter))
    elif config.init in BASE_MODIFYING_INITS:
        warnings.warn(f"init={config.init!r} rewrote the base kernels, so this adapter fits only "
                      "that residual base, not the original model that peft and vLLM load. Pass "
                      "initial_adapter= (lj.split's adapter right after lj.init) to convert it.",
                      stacklevel=2)  # fmt: skip
    tensors: dict[str, jax.Array] = {}
    adapted, parameters, ranks, alphas, kept = [], [], {}, {}, {}
    ada = config.adalora is not None
    for site in found:
        module, stacked, grouped = site.keys, naming.stacked(site.keys), naming.expert(site.keys)
        a = flat[(*module, LORA_A)]
        rank = a.shape[-1]
        names = naming.modules(module, a.shape[0] if stacked else 1)
        keys = [naming.pattern_key(module, n) for n in names]  # rank_pattern's, alpha_pattern's
        if (parameter := naming.parameter(module)) is not None:  # peft's target_parameters
            parameters.append(parameter)
        if grouped:  # peft names the wrapper of each expert parameter, nested in their order
            targeted = [p for p in naming.experts
                        if any(s.keys == (*module[:-1], p) for s in found)]  # fmt: skip
            names = [naming.peft_module(n, targeted) for n in names]
        # One entry per layer: unstacked leaves get a leading axis of one.
        present = [n for n in ADAPTER_LEAVES if (*module, n) in flat]
        layered = {n: flat[(*module, n)] if stacked else flat[(*module, n)][None] for n in present}
        conv = site.n_in - 1 if isinstance((layouts or {}).get(site.path), ConvLayout) else 0
        for i, name in enumerate(names):
            if ada:  # as peft: pruned ranks (E = 0) sliced off, the kept ones listed
                keep = np.asarray(layered[LORA_E][i]) != 0
                kept[f"{name}.{ADALORA_LEAVES[LORA_E]}"] = keep.tolist()
                index = np.flatnonzero(keep)
            for leaf in present:
                factor = _to_peft(leaf, layered[leaf][i], rank, conv, grouped)
                if ada:
                    factor = _pruned(leaf, factor, index, conv)
                tensors[naming.peft_name(name, leaf, ada)] = jnp.asarray(factor)
        adapted += [] if parameter else names
        ranks[_exact(keys)], alphas[_exact(keys)] = rank, config.alpha_for(site.path)
    full = {k: v for k, v in flat.items() if k[-1] not in ADAPTER_LEAVES}
    saved = []
    for name, tensor in naming.tensors(traverse_util.unflatten_dict(full)):
        tensors[naming.peft_name(name)] = jnp.array(tensor, copy=True)
        saved.append(name)
    if naming.task_type == "CAUSAL_LM":  # what vLLM would be asked to serve
        variant = "DoRA" if config.use_dora else "AdaLoRA" if ada else None
        _vllm_warnings(set(ranks.values()), saved, variant)

    base_flat = traverse_util.flatten_dict(base)
    layers = lambda k, s: s.shape[0] if naming.stacked(k) else 1  # noqa: E731
    kernel_modules = [n for k, s in base_flat.items() if k[-1] == KERNEL
                      and naming.parameter(k[:-1]) is None
                      for n in naming.modules(k[:-1], layers(k, s))]  # fmt: skip
    base_names = [n for k, s in base_flat.items() for n in naming.names(k, layers(k, s))]
    peft_config = {
        "peft_type": "LORA",
        "task_type": naming.task_type,
        "base_model_name_or_path": base_model_id,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "target_modules": _target_modules(adapted, kernel_modules),
        "rank_pattern": {k: r for k, r in ranks.items() if r != config.rank},
        "alpha_pattern": {k: a for k, a in alphas.items() if a != config.alpha},
        "modules_to_save": _saved_modules(saved, base_names),
        "lora_dropout": config.dropout,
        "fan_in_fan_out": naming.fan_in_fan_out,
        "bias": "none",
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "init_lora_weights": config.init if config.init in BASE_MODIFYING_INITS else True,
        "inference_mode": True,
    }
    if parameters:  # bare weights (a mixture's experts and router): peft >= 0.17
        peft_config["target_parameters"] = sorted(set(parameters))
        if config.dropout:
            warnings.warn(f"peft refuses lora_dropout={config.dropout} on target_parameters "
                          f"({sorted(set(parameters))}): to load this adapter there, set "
                          "lora_dropout to 0 in its adapter_config.json (dropout does not act "
                          "at inference).", stacklevel=2)  # fmt: skip
    if ada:
        peft_config.update(_adalora_fields(config, kept))
    check_finite(tensors, out_dir)
    with atomic_dir(out_dir, "peft adapter", ADAPTER_FILES) as tmp:
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(peft_config, indent=2, sort_keys=True))
    return Path(out_dir)


def _adalora_fields(config: LoraConfig, kept: dict[str, list[bool]]) -> dict[str, Any]:
    """adapter_config.json's AdaLoRA entries (peft's AdaLoraConfig): the schedule, and the
    ranks kept per module in `rank_pattern`. peft ignores `r` (init_r is the rank) and warns
    unless it is its default, 8."""
    spec = config.adalora
    if spec.total_steps is None:
        raise ValueError("save_adapter: peft needs AdaLora.total_steps (> 0) in the config.")
    return {"peft_type": ADALORA, "r": 8, "init_r": config.rank, "target_r": spec.target_rank,
            "tinit": spec.tinit, "tfinal": spec.tfinal, "deltaT": spec.delta_t,
            "beta1": spec.beta1, "beta2": spec.beta2, "orth_reg_weight": spec.orth_reg_weight,
            "total_step": spec.total_steps, "rank_pattern": kept}  # fmt: skip


def _pruned(leaf: str, factor: Any, index: np.ndarray, conv: int) -> Any:
    """An AdaLoRA factor in peft's layout (`_to_peft`) with only the kept ranks `index`; a
    convolution's as peft's SVDConv2d holds them: A (r, in·kh·kw), B (out, r)."""
    factor = factor[:, index] if leaf == LORA_B else factor[index]
    if not conv or leaf == LORA_E:
        return factor
    return factor.reshape(factor.shape[:2]) if leaf == LORA_B else factor.reshape(len(index), -1)


def _to_peft(leaf: str, factor: Any, rank: int, conv: int, grouped: bool = False) -> Any:
    """One layer's factor as peft stores it: A (r, in), B (out, r), DoRA's magnitude (out,),
    several input or output axes flattened row-major as peft's Linear sees them; for a
    convolution of `conv` spatial axes A (r, in, *spatial), B (out, r, 1, ...), the
    magnitude (1, out, 1, ...). Experts' (`grouped`, ours (E, in, r) and (E, r, out)) as
    peft's ParamWrapper stacks them: A (E·r, in) expert-major, B (out, r·E) rank-major."""
    if grouped:
        if leaf == LORA_A:
            return factor.transpose(0, 2, 1).reshape(-1, factor.shape[1])
        return factor.transpose(2, 1, 0).reshape(factor.shape[2], -1)
    ones = (1,) * conv
    if leaf == LORA_A:
        return to_torch(factor) if conv else factor.reshape(-1, rank).T
    if leaf == LORA_B:
        return factor.reshape(rank, -1).T.reshape(-1, rank, *ones)
    if leaf == LORA_E:  # AdaLoRA's singular values, (r, 1)
        return factor.reshape(-1, 1)
    return factor.reshape(1, -1, *ones) if conv else factor.reshape(-1)


def _from_peft(name: str, leaf: str, tensor: np.ndarray, rank: int = 0) -> np.ndarray:
    """`_to_peft` inverted: A (.., in, r), B (r, out), the magnitude (out,); a convolution's
    factors are told by their extra axes; experts' (a `rank` given) are (E, in, r) and
    (E, r, out), E from the stacked axis's size over the rank."""
    if rank:
        if tensor.ndim != 2 or tensor.shape[leaf == LORA_B] % rank:
            raise ValueError(
                f"{name}: shape {tensor.shape}; an expert parameter's lora_A is "
                f"(E·r, in), lora_B (out, E·r) with r = {rank}."
            )
        if leaf == LORA_A:
            return tensor.reshape(-1, rank, tensor.shape[1]).transpose(0, 2, 1)
        return tensor.reshape(tensor.shape[0], rank, -1).transpose(2, 1, 0)
    if leaf == LORA_A:
        return from_torch(tensor)
    if leaf == LORA_B and tensor.ndim > 2 and any(n != 1 for n in tensor.shape[2:]):
        raise ValueError(f"{name}: shape {tensor.shape}; a convolution's lora_B is (out, r, 1, "
                         "...), a 1x1 convolution.")  # fmt: skip
    return tensor.reshape(tensor.shape[:2]).T if leaf == LORA_B else tensor.reshape(-1)


def _peft_factor(
    name: str, leaf: str, module: str, tensor: np.ndarray, peft_config: dict, grouped: bool
) -> Any:
    """`_from_peft` (`grouped`: an expert parameter's, of the rank the file gives the module),
    and for an AdaLoRA file the pruned ranks put back as zeros where its rank_pattern says,
    so every layer has init_r ranks again (as in training)."""
    rank = grouped and _peft_value(peft_config.get("rank_pattern") or {}, module, peft_config["r"])
    factor = _from_peft(name, leaf, tensor, rank)
    if peft_config.get("peft_type") != ADALORA:
        return factor
    rank = peft_config["init_r"]
    pattern = (peft_config.get("rank_pattern") or {}).get(f"{module}.{ADALORA_LEAVES[LORA_E]}")
    keep = np.ones(rank, bool) if pattern is None else np.asarray(pattern, bool)
    axis = factor.ndim - 1 if leaf == LORA_A else 0
    if keep.shape != (rank,) or factor.shape[axis] != keep.sum():
        raise ValueError(f"{name}: {factor.shape[axis]} ranks, but adapter_config.json's "
                         f"rank_pattern keeps {int(keep.sum())} of {keep.size} for {module} "
                         f"(init_r {rank}).")  # fmt: skip
    full = np.zeros((rank, *np.delete(factor.shape, axis)), factor.dtype)
    full[keep] = np.moveaxis(factor, axis, 0)
    return np.moveaxis(full, 0, axis)


def _read_tensors(directory: Path) -> dict[str, np.ndarray]:
    path = directory / "adapter_model.safetensors"
    if not path.exists():
        if (directory / "adapter_model.bin").exists():
            raise ValueError(
                f"{directory}/adapter_model.bin is a pickle file, and unpickling can run "
                "arbitrary code, so lora_jax reads adapters from safetensors only. Convert it "
                'once where you trust it: python -c "import torch; from safetensors.torch import '
                "save_file; save_file(torch.load('adapter_model.bin'), "
                "'adapter_model.safetensors')\""
            )
        raise FileNotFoundError(f"{directory}: no adapter_model.safetensors.")
    try:
        with safe_open(path, "flax") as f:
            tensors = {name: np.asarray(f.get_tensor(name)) for name in f.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise ValueError(f"{path}: not a readable safetensors file (truncated or damaged? "
                         f"{type(err).__name__}: {err}).") from None  # fmt: skip
    for name, tensor in tensors.items():
        if not np.issubdtype(tensor.dtype, np.floating) and tensor.dtype.name != "bfloat16":
            raise ValueError(f"{path}: {name} is {tensor.dtype}; adapter tensors are floats.")
        if not np.all(np.isfinite(tensor.astype(np.float32))):
            raise ValueError(f"{path}: {name} holds non-finite values (NaN or inf).")
    return tensors


def _peft_value(pattern: dict[str, Any], name: str, default: Any) -> Any:
    """peft's rule: the first key k with (.*\\.)?(k)$ matching the module name."""
    return next((v for k, v in pattern.items() if re.match(rf"(.*\.)?({k})$", name)), default)


def _peft_files(directory: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The tensors and adapter_config.json of a peft LoRA directory."""
    tensors = _read_tensors(directory)
    path = directory / "adapter_config.json"
    peft_config = read_json(path)
    kind = peft_config.get("peft_type")
    if kind not in ("LORA", ADALORA):
        raise ValueError(f"{path}: peft_type {kind!r}, not LORA or ADALORA.")
    if flags := [f for f in UNSUPPORTED if peft_config.get(f)]:
        raise ValueError(f"{directory}: adapters with {flags} are not supported yet.")
    return tensors, peft_config


def _file_naming(
    directory: Path,
    tensors: dict[str, np.ndarray],
    peft_config: dict[str, Any],
    naming: Naming | None,
    hf_config: dict[str, Any] | None,
) -> Naming:
    """The Naming to read a file by: the zoo's for `hf_config`, else `naming`, else the one
    its tensor names and target_parameters imply, checked against the file's own
    fan_in_fan_out."""
    fan_in_fan_out = bool(peft_config.get("fan_in_fan_out"))
    naming = naming_of(hf_config) if hf_config is not None else naming
    if naming is None:  # bare weights peft adapted as parameters: a MoE router's
        parameters = peft_config.get("target_parameters") or ()
        bare = {p.split(".")[-2] for p in parameters if p.count(".") and p.endswith(".weight")}
        return Naming.implied(tensors, fan_in_fan_out=fan_in_fan_out, bare=tuple(sorted(bare)))
    if naming.fan_in_fan_out != fan_in_fan_out:
        raise ValueError(f"{directory}/adapter_config.json: fan_in_fan_out is {fan_in_fan_out}, "
                         f"but the naming given has {naming.fan_in_fan_out}: an adapter for "
                         "another model?")  # fmt: skip
    return naming


def _assemble(
    lora: dict[tuple, dict[str, dict]],
    dotted: dict[str, set[str]],
    full: dict[tuple, dict],
    peft_config: dict[str, Any],
) -> tuple[dict[tuple, np.ndarray], LoraConfig]:
    """Per-layer tensors stacked into our leaves (flat), and the LoraConfig that explains them.
    lora: module -> lora_a/lora_b/LORA_M -> layer -> array (A as (in, r), B as (r, out));
    dotted: module path -> its transformers names; full: fully trained leaf -> layer -> array."""
    flat, ranks, alphas = {}, {}, {}
    for keys, parts in lora.items():
        path = path_str(keys)
        if not all(n in parts for n in (LORA_A, LORA_B)):
            raise ValueError(f"{path}: the file holds {sorted(parts)}; lora_A and lora_B needed.")
        for leaf, per_layer in parts.items():
            flat[(*keys, leaf)] = _stack(per_layer, f"{path}/{leaf}")
        ranks[path] = flat[(*keys, LORA_A)].shape[-1]
        alphas[path] = _peft_value(peft_config.get("alpha_pattern") or {}, min(dotted[path]),
                                   peft_config["lora_alpha"])  # fmt: skip
    for keys, per_layer in full.items():
        flat[keys] = _stack(per_layer, path_str(keys))
    ada = peft_config.get("peft_type") == ADALORA
    rank, alpha = peft_config["init_r" if ada else "r"], peft_config["lora_alpha"]
    config = LoraConfig(
        rank=rank,
        alpha=alpha,
        targets=("^(" + "|".join(re.escape(p) for p in ranks) + ")$",),
        rank_pattern={f"^{re.escape(p)}$": r for p, r in ranks.items() if r != rank},
        alpha_pattern={f"^{re.escape(p)}$": a for p, a in alphas.items() if a != alpha},
        modules_to_save=tuple(f"^{re.escape(path_str(k))}$" for k in full),
        dropout=peft_config.get("lora_dropout") or 0.0,
        use_rslora=bool(peft_config.get("use_rslora")),
        use_dora=bool(peft_config.get("use_dora")),
        adalora=_adalora_spec(peft_config) if ada else None,
    )
    return flat, config


def _adalora_spec(peft_config: dict[str, Any]) -> AdaLora:
    """`_adalora_fields` inverted: the schedule an AdaLoRA file was trained with."""
    return AdaLora(target_rank=peft_config["target_r"], total_steps=peft_config["total_step"],
                   tinit=peft_config["tinit"], tfinal=peft_config["tfinal"],
                   delta_t=peft_config["deltaT"], beta1=peft_config["beta1"],
                   beta2=peft_config["beta2"],
                   orth_reg_weight=peft_config["orth_reg_weight"])  # fmt: skip


def _fit_factor(
    name: str, keys: tuple, layer: int | None, factor: np.ndarray, base: dict,
    layouts: Layouts | None, grouped: bool,
) -> np.ndarray:  # fmt: skip
    """peft's A (in, r), B (r, out) or DoRA magnitude (out,) of the leaf at `keys` (from
    `_from_peft`), checked against the base kernel before anything is stacked or attached,
    and shaped like it: a kernel of several input or output axes (DenseGeneral,
    LinearGeneral) has them flattened row-major in peft's Linear; a convolution's A comes
    as (*spatial, in, r); experts' (`grouped`) have the experts' axis first."""
    module, leaf = keys[:-1], keys[-1]
    path = path_str(keys)
    if (*module, KERNEL) not in base:
        raise ValueError(f"{name} ({path}): the base has no kernel at {path_str(module)}.")
    shape = tuple(base[(*module, KERNEL)].shape)
    try:
        stacked = int(layer is not None) + grouped
        lead, n_in, _ = kernel_layout(path_str(module), shape, layouts, stacked)
    except ValueError as err:
        raise ValueError(f"{name} ({path}): {err}") from None
    groups = shape[lead - 1 : lead] if grouped else ()
    if grouped and factor.shape[:1] != groups:
        raise ValueError(
            f"{name} ({path}): {factor.shape[0]} experts' factors, but the base "
            f"kernel {shape} holds {groups[0]}."
        )
    ins, outs = shape[lead : lead + n_in], shape[lead + n_in :]
    want, form = {
        LORA_A: ((math.prod(ins), None), "(in, r)"),
        LORA_B: ((None, math.prod(outs)), "(r, out)"),
        LORA_E: ((None,), "(r,)"),
    }.get(leaf, ((math.prod(outs),), "(out,)"))
    if leaf == LORA_A and factor.ndim - len(groups) > 2:
        want, form = (*ins, None), "(*spatial, in, r), a convolution's"
    elif (leaf == LORA_A and factor.shape[0] == math.prod(ins)
          and isinstance((layouts or {}).get(path_str(module)), ConvLayout)):  # fmt: skip
        # AdaLoRA's SVDConv2d: A (r, in·kh·kw), its columns in torch's (in, *spatial) order
        factor = np.moveaxis(factor.reshape(ins[-1], *ins[:-1], -1), 0, -2)
        want, form = (*ins, None), "(*spatial, in, r), a convolution's"
    each = factor.shape[len(groups) :]  # one expert's
    if len(each) != len(want) or any(w not in (None, n) for w, n in zip(want, each, strict=True)):
        raise ValueError(f"{name} ({path}): shape {factor.shape} does not fit the base kernel "
                         f"{shape[lead:]} (expected {form}).")  # fmt: skip
    if leaf == LORA_A:
        return factor.reshape(*groups, *ins, -1)
    if leaf == LORA_E:
        return factor
    return factor.reshape(*groups, -1, *outs) if leaf == LORA_B else factor.reshape(outs)


def _stack(per_layer: dict[int | None, np.ndarray], what: str) -> np.ndarray:
    if None in per_layer:
        return per_layer[None]
    if sorted(per_layer) != list(range(len(per_layer))):
        raise ValueError(f"{what}: the file holds layers {sorted(per_layer)}, not 0..n-1.")
    if len(shapes := {a.shape for a in per_layer.values()}) > 1:
        raise ValueError(f"{what}: layers differ in shape: {sorted(shapes)}.")
    return np.stack([per_layer[i] for i in range(len(per_layer))])


def load_adapter(
    directory: str | Path,
    base_params: Params,
    layouts: Layouts | None = None,
    *,
    naming: Naming | None = None,
    hf_config: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], LoraConfig]:
    """(adapter tree, LoraConfig) from a peft LoRA directory, checked against `base_params`.

    Tensor names are read by `naming` (your own Linen model's `models.Naming`, the one
    `save_adapter` took), by the zoo's for `hf_config`, or else by the one the file's names
    imply (layers numbered under one key). Kernels of more than two axes per layer
    (DenseGeneral, LinearGeneral, Einsum) need `layouts` (`lj.kernel_layouts(model, ...)`)
    to unflatten peft's (in, out) factors.

    Every tensor's shape is checked against the base before anything is returned; the base is
    never modified. Put it on the base with `lj.combine(adapter, base_params)`.
    """
    directory = Path(directory)
    tensors, peft_config = _peft_files(directory)
    naming = _file_naming(directory, tensors, peft_config, naming, hf_config)
    targeted = naming.targeted(peft_config.get("target_parameters") or ())
    base = traverse_util.flatten_dict(_params(base_params))
    known: dict[tuple, set[str]] = {}  # the base's modules and their leaves
    for keys in base:
        known.setdefault(keys[:-1], set()).add(keys[-1])
    lora: dict[tuple, dict[str, dict]] = {}  # module -> lora_a/lora_b/magnitude -> layer -> array
    dotted: dict[str, set[str]] = {}  # our module path -> transformers module names
    full: dict[tuple, dict] = {}  # leaf -> layer -> array
    saved = peft_config.get("modules_to_save") or []
    for name, tensor in tensors.items():
        keys, layer, module_name = naming.peft_entry(name, known, targeted)
        if keys[-1] in ADAPTER_LEAVES:
            grouped = naming.expert(keys[:-1])
            factor = _peft_factor(name, keys[-1], module_name, tensor, peft_config, grouped)
            factor = _fit_factor(name, keys, layer, factor, base, layouts, grouped)
            lora.setdefault(keys[:-1], {}).setdefault(keys[-1], {})[layer] = factor
            dotted.setdefault(path_str(keys[:-1]), set()).add(
                naming.pattern_key(keys[:-1], module_name)
            )
            continue
        if not any(re.search(rf"(^|\.){re.escape(m)}(\.|$)", module_name) for m in saved):
            raise ValueError(f"{directory}: {name} is a full tensor of {module_name}, which "
                             "adapter_config.json's modules_to_save does not list; a peft "
                             "adapter holds only what its config explains.")  # fmt: skip
        full.setdefault(keys, {})[layer] = naming.our_layout(keys, tensor)
    flat, config = _assemble(lora, dotted, full, peft_config)
    adapter = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()})
    adapter = {"params": adapter} if "params" in base_params else adapter
    combine(adapter, base_params)  # every path and shape checked against the base
    return adapter, config


def read_adapter(
    directory: str | Path, *, naming: Naming | None = None, hf_config: dict[str, Any] | None = None
) -> tuple[dict[str, Any], LoraConfig]:
    """(adapted tree, LoraConfig) of a peft LoRA directory alone, for reading what it holds
    (`lora_jax.analysis`, `lora-jax inspect`) rather than running it; names read as
    `load_adapter` reads them.

    Each adapted module gets lora_a (layers, in, r), lora_b (layers, r, out) (DoRA: its
    magnitude) and an abstract `kernel` (a jax.ShapeDtypeStruct (layers, in, out)) that gives
    the layout without any base weights; modules without a layer index have no layer axis.
    A convolution's A is (layers, *spatial, in, r) and its kernel (layers, *spatial, in, out).
    Fully trained modules (modules_to_save) are left out: they are not low-rank updates.
    """
    directory = Path(directory)
    tensors, peft_config = _peft_files(directory)
    naming = _file_naming(directory, tensors, peft_config, naming, hf_config)
    targeted = naming.targeted(peft_config.get("target_parameters") or ())
    lora: dict[tuple, dict[str, dict]] = {}
    dotted: dict[str, set[str]] = {}
    for name, tensor in tensors.items():
        keys, layer, module_name = naming.peft_entry(name, targeted=targeted)
        if keys[-1] in ADAPTER_LEAVES:
            grouped = naming.expert(keys[:-1])
            factor = _peft_factor(name, keys[-1], module_name, tensor, peft_config, grouped)
            lora.setdefault(keys[:-1], {}).setdefault(keys[-1], {})[layer] = factor
            dotted.setdefault(path_str(keys[:-1]), set()).add(
                naming.pattern_key(keys[:-1], module_name)
            )
    if not lora:
        raise ValueError(f"{directory}: the file holds no lora_A/lora_B tensors.")
    flat, config = _assemble(lora, dotted, {}, peft_config)
    for keys in lora:
        a, b = flat[(*keys, LORA_A)], flat[(*keys, LORA_B)]
        if a.shape[: b.ndim - 2] != b.shape[:-2] or a.shape[-1] != b.shape[-2]:
            raise ValueError(
                f"{directory}: {path_str(keys)}: lora_A {a.shape} and lora_B "
                f"{b.shape} do not fit (expected (.., in, r) and (.., r, out))."
            )
        kernel_shape = (*a.shape[:-1], b.shape[-1])
        flat[(*keys, KERNEL)] = jax.ShapeDtypeStruct(kernel_shape, np.result_type(a, b))
    tree = {k: v if k[-1] == KERNEL else jnp.asarray(v) for k, v in flat.items()}
    return traverse_util.unflatten_dict(tree), config


def base_for(adapter_dir: str | Path, base: str | Path, dtype: Any = jnp.float32):
    """(model, params, config.json) of the model an adapter was trained on, from `base`. A
    classifier adapter (peft task SEQ_CLS) on a bare encoder checkpoint (the quickstart's
    all-MiniLM-L6-v2) gets the encoder with a head of the adapter's label count, as training
    built it: the adapter carries the trained head (modules_to_save)."""
    tensors, peft_config = _peft_files(Path(adapter_dir))
    hf_config = config_of(base)
    arch = (hf_config.get("architectures") or [""])[0]
    if peft_config.get("task_type") != "SEQ_CLS" or arch.endswith("SequenceClassification"):
        return from_pretrained(base, dtype)
    heads = [t for n, t in tensors.items() if re.search(r"classifier(\.out_proj)?\.weight$", n)]
    if not heads:
        raise ValueError(f"{adapter_dir}: a SEQ_CLS adapter for the bare encoder {base}, but it "
                         "holds no classifier weights to put on it.")  # fmt: skip
    return from_pretrained(base, dtype, num_labels=min(h.shape[0] for h in heads))
