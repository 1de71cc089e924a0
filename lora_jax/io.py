"""Adapter files in peft's format, both ways: adapter_config.json + adapter_model.safetensors.

Each adapted module's factors are written per layer (stacked layers are our axis 0), laid
out as peft lays out its kind of kernel (`lora_jax.kinds`: Linear, convolution, experts) and
as its variant writes them (`lora_jax.peft_format`: plain, DoRA, AdaLoRA's pruned ranks);
tensor names come from a `models.Naming` (the only home of names, both ways). The loops here
ask those records and never branch on a kind or a variant. Files are read from safetensors
only: a pickle file can run code when loaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from etils import epath
from flax import traverse_util
from safetensors.flax import save_file

from lora_jax.config import LoraConfig
from lora_jax.files import atomic_dir, check_finite, path, read_json
from lora_jax.kinds import Grouped, Kind, Linear
from lora_jax.models.hub import build, config_of, from_pretrained, naming_of
from lora_jax.models.naming import Naming
from lora_jax.peft_format import (
    UNSUPPORTED,
    Entry,
    adapter_config,
    check_file,
    converted_config,
    exact,
    file_variant,
    for_original_base,
    lora_config,
    params_of,
    peft_value,
    variant_of,
)
from lora_jax.tree import (
    ADAPTER_LEAVES,
    KERNEL,
    LORA_A,
    LORA_B,
    Layouts,
    Params,
    Site,
    combine,
    kernel_layout,
    path_str,
    sites,
)

__all__ = ["base_for", "converted_config", "load_adapter", "read_adapter", "save_adapter"]

# What a peft adapter directory holds (peft writes a model card; `lora-jax inspect` figures):
# an earlier adapter's, which a save replaces whole.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin",
                 "README.md", "*.png")  # fmt: skip
ADAPTER_CONFIG = "adapter_config.json"  # written last: an adapter is whole once it is there
Layers = dict[int | None, np.ndarray]  # one leaf's arrays by layer index (None: unstacked)


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
) -> epath.Path:
    """Writes the adapter as peft does for the matching torch model.

    A zoo model's `hf_config` (its config.json, from `lj.models.from_pretrained`) fixes the
    tensor names, the task type and GPT-2's fan_in_fan_out. For your own Linen model, pass
    its `naming` (`lora_jax.models.Naming`) and its `base` params (or their abstract shapes),
    and for a model with convolutions its `layouts` (`lj.kernel_layouts`): peft stores their
    factors as convolution weights. Warns where vLLM could not serve it. PiSSA/OLoRA rewrote
    the base: pass `initial_adapter` (the adapter of the tree `lj.init` returned) to save the
    adapter for the original model, as peft does."""
    naming, base = _naming_and_base(hf_config, naming, base)
    found = _checked_sites(adapter, base, config, naming)
    leads = {site.keys: site.lead for site in found}
    adapter, config = for_original_base(adapter, config, initial_adapter, leads)
    flat = traverse_util.flatten_dict(params_of(adapter))
    entries = [_entry(site, flat, config, naming, layouts, found) for site in found]
    tensors = {name: t for entry in entries for name, t in entry.tensors.items()}
    saved = _full_tensors(flat, naming, tensors)
    peft_config = adapter_config(config, naming, entries, saved, base, base_model_id)
    check_finite(tensors, out_dir)
    with atomic_dir(out_dir, "peft adapter", ADAPTER_FILES, ADAPTER_CONFIG) as tmp:
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2, sort_keys=True))
    return path(out_dir)


def _naming_and_base(
    hf_config: dict[str, Any] | None, naming: Naming | None, base: Params | None
) -> tuple[Naming, Params]:
    """The Naming and base params (or shapes) a save reads: a zoo model's from its config."""
    if hf_config is not None:
        naming = naming_of(hf_config)
        if base is None:
            model = build(hf_config)
            base = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
    if naming is None or base is None:
        raise ValueError("save_adapter: pass hf_config= (a zoo model), or naming= and base= "
                         "(your own Linen model).")  # fmt: skip
    return naming, params_of(base)


def _checked_sites(adapter: Params, base: Params, config: LoraConfig, naming: Naming) -> list[Site]:
    """The adapted modules (`lj.sites`) of the adapter on `base`, each checked to be what the
    naming and the config's variant can write."""
    variant = variant_of(config)
    flat = traverse_util.flatten_dict(params_of(adapter))
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
        if grouped and not variant.experts:
            raise ValueError(f"save_adapter: {site.path}: peft adapts experts (target_parameters) "
                             "with plain LoRA only, not DoRA or AdaLoRA.")  # fmt: skip
        if (held := {n for n in ADAPTER_LEAVES if (*site.keys, n) in flat}) != set(variant.leaves):
            raise ValueError(f"save_adapter: {site.path} holds {sorted(held)}, but the config's "
                             f"variant ({variant.label or 'plain LoRA'}) writes "
                             f"{sorted(variant.leaves)}: set use_dora / adalora as the adapter "
                             "was trained.")  # fmt: skip
    return found


def _kind(naming: Naming, keys: tuple, kind: Kind) -> Kind:
    """The kind of the kernel at `keys`: a mixture's experts where the naming says so (the
    files name them, so no layouts are needed), else `kind` (from layouts or the shapes)."""
    return Grouped() if naming.expert(keys) else kind


def _entry(site: Site, flat: dict, config: LoraConfig, naming: Naming, layouts: Layouts | None,
           found: list[Site]) -> Entry:  # fmt: skip
    """One adapted module's tensors and config entries: each layer's leaves laid out by its
    kind, as its variant writes them, named by the naming."""
    module, variant = site.keys, variant_of(config)
    given = (layouts or {}).get(site.path)
    kind = _kind(
        naming, module, given if isinstance(given, Linear) else Linear(site.n_in, site.n_out)
    )
    # One entry per layer: unstacked leaves get a leading axis of one.
    one = not naming.stacked(module)
    layered = {n: flat[(*module, n)][None] if one else flat[(*module, n)] for n in variant.leaves}
    names = naming.modules(module, len(layered[LORA_A]))
    patterns = [naming.pattern_key(module, n) for n in names]  # rank_pattern's, alpha_pattern's
    if kind.groups:  # peft names the wrapper of each expert parameter, nested in their order
        targeted = [p for p in naming.experts if any(s.keys == (*module[:-1], p) for s in found)]
        names = [naming.peft_module(n, targeted) for n in names]
    tensors, kept = {}, {}
    for i, name in enumerate(names):
        layer = {leaf: kind.to_peft(leaf, layered[leaf][i]) for leaf in variant.leaves}
        layer, pattern = variant.pruned(name, layer)
        kept |= pattern
        tensors |= {variant.tensor_name(naming, name, leaf): jnp.asarray(t)
                    for leaf, t in layer.items()}  # fmt: skip
    parameter = naming.parameter(module)  # peft's target_parameters (None: target_modules)
    return Entry(tensors, [] if parameter else names, parameter, exact(patterns),
                 layered[LORA_A].shape[-1], config.alpha_for(site.path), kept)  # fmt: skip


def _full_tensors(flat: dict, naming: Naming, tensors: dict[str, Any]) -> list[str]:
    """The fully trained leaves (modules_to_save) added to `tensors` under peft's names, in
    torch's layout; their torch names."""
    full = {k: v for k, v in flat.items() if k[-1] not in ADAPTER_LEAVES}
    saved = []
    for name, tensor in naming.tensors(traverse_util.unflatten_dict(full)):
        tensors[naming.peft_name(name)] = jnp.array(tensor, copy=True)
        saved.append(name)
    return saved


# ----------------------------------------------------------------------------- reading


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
    (DenseGeneral, LinearGeneral, Einsum, Conv) need `layouts` (`lj.kernel_layouts(model,
    ...)`) to unflatten peft's (in, out) factors. Every tensor's shape is checked against the
    base before anything is returned; the base is never modified. Put it on the base with
    `lj.combine(adapter, base_params)`."""
    directory = path(directory)
    tensors, peft_config = _peft_files(directory)
    naming = _file_naming(directory, tensors, peft_config, naming, hf_config)
    base = traverse_util.flatten_dict(params_of(base_params))
    flat, config = _assembled(*_read(directory, tensors, peft_config, naming, base, layouts),
                              peft_config, directory)  # fmt: skip
    adapter = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()})
    adapter = {"params": adapter} if "params" in base_params else adapter
    combine(adapter, base_params)  # every path and shape checked against the base
    return adapter, config


def _read(
    directory: Path, tensors: dict[str, np.ndarray], peft_config: dict[str, Any], naming: Naming,
    base: dict[tuple, Any] | None = None, layouts: Layouts | None = None,
) -> tuple[dict[tuple, dict[str, Layers]], dict[str, set[str]], dict[tuple, Layers]]:  # fmt: skip
    """A file's tensors in our layout, by module and layer: (module -> leaf -> layer ->
    factor, our module path -> its torch names, fully trained leaf -> layer -> tensor).
    With the flat `base`, each factor is checked and shaped against its kernel and the full
    tensors are read too (checked to be in modules_to_save); without, they are left out."""
    variant = file_variant(peft_config)
    targeted = naming.targeted(peft_config.get("target_parameters") or ())
    known: dict[tuple, set[str]] | None = None if base is None else {}
    for keys in base or ():  # the base's modules and their leaves
        known.setdefault(keys[:-1], set()).add(keys[-1])
    lora: dict[tuple, dict[str, Layers]] = {}
    dotted: dict[str, set[str]] = {}
    full: dict[tuple, Layers] = {}
    for name, tensor in tensors.items():
        keys, layer, module_name = naming.peft_entry(name, known, targeted)
        module, leaf = keys[:-1], keys[-1]
        if leaf not in ADAPTER_LEAVES:
            if base is not None:
                _check_saved(directory, name, module_name, peft_config)
                full.setdefault(keys, {})[layer] = naming.our_layout(keys, tensor)
            continue
        kind = _kind(naming, module, Linear(1, 1))
        rank = kind.groups and peft_value(peft_config.get("rank_pattern") or {}, module_name,
                                          peft_config["r"])  # fmt: skip
        tensor = variant.restored(name, module_name, leaf, tensor, peft_config)
        factor = kind.from_peft(name, leaf, tensor, rank)
        if base is not None:
            factor = _fitted(name, keys, layer, factor, base, layouts, naming)
        lora.setdefault(module, {}).setdefault(leaf, {})[layer] = factor
        dotted.setdefault(path_str(module), set()).add(naming.pattern_key(module, module_name))
    return lora, dotted, full


def _check_saved(directory: Path, name: str, module: str, peft_config: dict[str, Any]) -> None:
    """A ValueError unless the full tensor `name` (of torch module `module`) is one of
    adapter_config.json's modules_to_save: a peft adapter holds only what its config says."""
    saved = peft_config.get("modules_to_save") or []
    if not any(re.search(rf"(^|\.){re.escape(m)}(\.|$)", module) for m in saved):
        raise ValueError(f"{directory}: {name} is a full tensor of {module}, which "
                         "adapter_config.json's modules_to_save does not list; a peft "
                         "adapter holds only what its config explains.")  # fmt: skip


def _fitted(name: str, keys: tuple, layer: int | None, factor: np.ndarray, base: dict,
            layouts: Layouts | None, naming: Naming) -> np.ndarray:  # fmt: skip
    """A factor (our layout, one layer) checked against its base kernel, before anything is
    stacked or attached, and shaped like it (`Kind.fit`)."""
    module, path = keys[:-1], path_str(keys)
    if (*module, KERNEL) not in base:
        raise ValueError(f"{name} ({path}): the base has no kernel at {path_str(module)}.")
    shape = tuple(base[(*module, KERNEL)].shape)
    try:
        stacked = int(layer is not None) + naming.expert(module)
        lead, kind = kernel_layout(path_str(module), shape, layouts, stacked)
        kind = _kind(naming, module, kind)
        return kind.fit(keys[-1], factor, shape[lead - kind.groups :])
    except ValueError as err:
        raise ValueError(f"{name} ({path}): {err}") from None


def _assembled(
    lora: dict[tuple, dict[str, Layers]], dotted: dict[str, set[str]],
    full: dict[tuple, Layers], peft_config: dict[str, Any], directory: Path,
) -> tuple[dict[tuple, np.ndarray], LoraConfig]:  # fmt: skip
    """`_read`'s per-layer arrays stacked into our leaves (flat), and the LoraConfig that
    explains them, adapter_config.json checked against them (`check_file`)."""
    flat, ranks = {}, {}
    for keys, parts in lora.items():
        path = path_str(keys)
        if not all(n in parts for n in (LORA_A, LORA_B)):
            raise ValueError(f"{path}: the file holds {sorted(parts)}; lora_A and lora_B needed.")
        for leaf, per_layer in parts.items():
            flat[(*keys, leaf)] = _stack(per_layer, f"{path}/{leaf}")
        ranks[path] = flat[(*keys, LORA_A)].shape[-1]
    leaves = {path_str(k): set(parts) for k, parts in lora.items()}
    for keys, per_layer in full.items():
        flat[keys] = _stack(per_layer, path_str(keys))
    try:  # the settings it gives (LoraConfig's own checks: a zero alpha) name the file too
        check_file(peft_config, ranks, leaves, dotted)
        alphas = {p: peft_value(peft_config.get("alpha_pattern") or {}, min(dotted[p]),
                                peft_config["lora_alpha"]) for p in ranks}  # fmt: skip
        return flat, lora_config(peft_config, ranks, alphas, [path_str(k) for k in full])
    except ValueError as err:
        raise ValueError(f"{directory}/adapter_config.json: {err}") from None


def _stack(per_layer: dict[int | None, np.ndarray], what: str) -> np.ndarray:
    if None in per_layer:
        return per_layer[None]
    if sorted(per_layer) != list(range(len(per_layer))):
        raise ValueError(f"{what}: the file holds layers {sorted(per_layer)}, not 0..n-1.")
    if len(shapes := {a.shape for a in per_layer.values()}) > 1:
        raise ValueError(f"{what}: layers differ in shape: {sorted(shapes)}.")
    return np.stack([per_layer[i] for i in range(len(per_layer))])


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
    try:  # read whole (an adapter is small), from a local file or a bucket alike
        tensors = safetensors.numpy.load(path.read_bytes())
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise ValueError(f"{path}: not a readable safetensors file (truncated or damaged? "
                         f"{type(err).__name__}: {err}).") from None  # fmt: skip
    if not tensors:
        raise ValueError(f"{path}: holds no tensors (an empty adapter).")
    for name, tensor in tensors.items():
        if not np.issubdtype(tensor.dtype, np.floating) and tensor.dtype.name != "bfloat16":
            raise ValueError(f"{path}: {name} is {tensor.dtype}; adapter tensors are floats.")
        if not np.all(np.isfinite(tensor.astype(np.float32))):
            raise ValueError(f"{path}: {name} holds non-finite values (NaN or inf).")
    return tensors


def _peft_files(directory: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The tensors and adapter_config.json of a peft LoRA directory."""
    tensors = _read_tensors(directory)
    path = directory / "adapter_config.json"
    peft_config = read_json(path)
    try:
        file_variant(peft_config)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
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
    directory = path(directory)
    tensors, peft_config = _peft_files(directory)
    naming = _file_naming(directory, tensors, peft_config, naming, hf_config)
    lora, dotted, _ = _read(directory, tensors, peft_config, naming)
    if not lora:
        raise ValueError(f"{directory}/adapter_model.safetensors: holds no lora_A/lora_B "
                         "tensors.")  # fmt: skip
    flat, config = _assembled(lora, dotted, {}, peft_config, directory)
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
    """(model, params, config.json) of the model an adapter was trained on, from `base`."""
    return from_pretrained(base, dtype, num_labels=head_for(adapter_dir, base))


def head_for(adapter_dir: str | Path, base: str | Path) -> int | None:
    """The label count of the head to put on `base` for this adapter, None for none: a
    classifier adapter (peft task SEQ_CLS) on a bare encoder checkpoint (the quickstart's
    all-MiniLM-L6-v2) gets the encoder with a head of the adapter's label count, as training
    built it; the adapter carries the trained head (modules_to_save)."""
    tensors, peft_config = _peft_files(path(adapter_dir))
    arch = (config_of(base).get("architectures") or [""])[0]
    if peft_config.get("task_type") != "SEQ_CLS" or arch.endswith("SequenceClassification"):
        return None
    heads = [t for n, t in tensors.items() if re.search(r"classifier(\.out_proj)?\.weight$", n)]
    if not heads:
        raise ValueError(f"{adapter_dir}: a SEQ_CLS adapter for the bare encoder {base}, but it "
                         "holds no classifier weights to put on it.")  # fmt: skip
    return min(h.shape[0] for h in heads)
