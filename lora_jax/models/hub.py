"""Hugging Face checkpoints in and out, without torch: each family's model classes, its
`Naming` (our paths <-> torch names, `lora_jax.models.naming`), sharding rules and buffers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.flax import save_file

from lora_jax.files import atomic_dir, check_finite, read_json
from lora_jax.models.bert import BertConfig, BertForSequenceClassification, BertModel
from lora_jax.models.gpt2 import GPT2Config, GPT2LMHeadModel
from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM
from lora_jax.models.moe import ROUTER
from lora_jax.models.naming import TRANSFORMERS_EXPERTS, ExpertFiles, Naming
from lora_jax.sharding import EXPERT, FSDP, TENSOR, Rules

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
    "vocab.json", "merges.txt", "tokenizer.model", "generation_config.json",
)  # fmt: skip
# What a model directory holds: an earlier model's files, which a save replaces whole.
MODEL_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
               *TOKENIZER_FILES)  # fmt: skip


# How every zoo family's params split over the (data, fsdp, expert, tensor) mesh (see
# lora_jax.sharding): column-parallel projections on their output axis, row-parallel ones on
# their input axis, in transformers' module names.
COLUMN = (
    r"(q_proj|k_proj|v_proj|qkv_proj|gate_proj|up_proj|gate_up_proj|query|key|value|c_attn"
    r"|c_fc|intermediate/dense)"
)
ROW = r"(o_proj|down_proj|c_proj|output/dense)"
# Dense kernels and tables split over fsdp and the expert axis together (MaxText's placement):
# the chips along the expert axis would otherwise each hold every dense layer whole.
DENSE = (FSDP, EXPERT)
SHARDING_RULES: Rules = (
    # A mixture's experts (E, in, out) split over the expert axis first, each like its twin.
    (r"experts/gate_up_proj/kernel$", (EXPERT, FSDP, TENSOR)),
    (r"experts/down_proj/kernel$", (EXPERT, TENSOR, FSDP)),
    (COLUMN + r"/kernel$", (DENSE, TENSOR)),
    (COLUMN + r"/bias$", (TENSOR,)),
    (ROW + r"/kernel$", (TENSOR, DENSE)),
    # Tables split on the hidden axis only: a row gather from a vocabulary-split table is
    # replicated by XLA's SPMD partitioner ("involuntary full rematerialization").
    (r"(embed_tokens|word_embeddings|wte)/embedding$", (None, DENSE)),
    (r"lm_head/kernel$", (DENSE, TENSOR)),
)


# peft's task_type by the ending of the transformers architecture name.
TASK_TYPES = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("Model", "FEATURE_EXTRACTION"),
)


@dataclasses.dataclass(frozen=True)
class Family:
    """How one `model_type` maps to our modules and to checkpoint tensor names."""

    config: type
    architectures: dict[str, type[nn.Module]]
    naming: Naming
    buffers: str = r"$^"  # checkpoint entries that are buffers, not params
    rules: Rules = SHARDING_RULES


def _llama(arch: str, files: ExpertFiles | None = None) -> Family:
    archs = {arch: LlamaForCausalLM}
    moe = {"experts": TRANSFORMERS_EXPERTS, "bare": (ROUTER,), "files": files} if files else {}
    naming = Naming("layers", **moe)
    return Family(LlamaConfig, archs, naming, buffers=r"rotary_emb\.inv_freq$")


# How checkpoint files name a mixture's experts.
MIXTRAL_FILES = ExpertFiles("block_sparse_moe", (("gate_up_proj", ("w1", "w3")),
                                                  ("down_proj", ("w2",))))  # fmt: skip
QWEN_MOE_FILES = ExpertFiles("mlp", (("gate_up_proj", ("gate_proj", "up_proj")),
                                     ("down_proj", ("down_proj",))))  # fmt: skip


def _bert(prefix: str) -> Family:
    archs = {
        f"{prefix}Model": BertModel,
        f"{prefix}ForSequenceClassification": BertForSequenceClassification,
    }
    return Family(BertConfig, archs, Naming("layer"), buffers=r"position_ids$")


FAMILIES = {
    "llama": _llama("LlamaForCausalLM"),
    "mistral": _llama("MistralForCausalLM"),
    "qwen2": _llama("Qwen2ForCausalLM"),
    "qwen3": _llama("Qwen3ForCausalLM"),
    "gemma": _llama("GemmaForCausalLM"),
    "gemma2": _llama("Gemma2ForCausalLM"),
    "gemma3_text": _llama("Gemma3ForCausalLM"),
    "phi3": _llama("Phi3ForCausalLM"),
    "mixtral": _llama("MixtralForCausalLM", MIXTRAL_FILES),
    "qwen3_moe": _llama("Qwen3MoeForCausalLM", QWEN_MOE_FILES),
    "gpt2": Family(
        GPT2Config,
        {"GPT2LMHeadModel": GPT2LMHeadModel},
        Naming("h", fan_in_fan_out=True),
        buffers=r"\.attn\.(masked_)?bias$",
    ),
    "bert": _bert("Bert"),
    "roberta": _bert("Roberta"),
}


def family_of(hf_config: dict[str, Any]) -> tuple[Family, str]:
    """(family, architecture name) for a config.json, or a ValueError listing what is supported."""
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} is not supported; supported: {sorted(FAMILIES)}"
        )
    family = FAMILIES[model_type]
    arch = (hf_config.get("architectures") or [next(iter(family.architectures))])[0]
    if arch not in family.architectures:
        raise ValueError(
            f"architecture {arch!r} is not supported for {model_type}; "
            f"supported: {sorted(family.architectures)}"
        )
    return family, arch


def build(hf_config: dict[str, Any], **options: Any) -> nn.Module:
    """Our Linen model for a config.json; options: dtype (compute), remat, attention_impl."""
    family, arch = family_of(hf_config)
    return family.architectures[arch](family.config.from_hf(hf_config), **options)


def max_positions(hf_config: dict[str, Any]) -> int:
    """The longest sequence the checkpoint's model takes (its config's `max_positions`)."""
    family, _ = family_of(hf_config)
    return family.config.from_hf(hf_config).max_positions


def naming_of(hf_config: dict[str, Any]) -> Naming:
    """The zoo's Naming for a config.json: its family's, with peft's task type."""
    family, arch = family_of(hf_config)
    task = next(t for suffix, t in TASK_TYPES if arch.endswith(suffix))
    return dataclasses.replace(family.naming, task_type=task)


class _Checkpoint:
    """The tensors of model.safetensors or a sharded model.safetensors.index.json, read lazily."""

    def __init__(self, directory: Path):
        index = directory / "model.safetensors.index.json"
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no weight_map.")
        elif (directory / "model.safetensors").exists():
            with _opened(directory / "model.safetensors") as f:
                weight_map = dict.fromkeys(f.keys(), "model.safetensors")
        elif any(directory.glob("pytorch_model*.bin")):
            raise ValueError(
                f"{directory}: only pickle checkpoints (pytorch_model.bin), which can "
                "run code when loaded; convert them to safetensors first."
            )
        else:
            raise FileNotFoundError(f"{directory}: no model.safetensors or its index.")
        self.files = {name: directory / file for name, file in weight_map.items()}

    def get(self, name: str) -> np.ndarray:
        with _opened(self.files[name]) as f:
            try:
                return np.asarray(f.get_tensor(name))
            except Exception as err:  # safetensors' own error types: a damaged file
                raise ValueError(f"{self.files[name]}: {name} cannot be read (truncated or "
                                 f"damaged? {err}).") from None  # fmt: skip


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[Any]:
    """A safetensors file opened for reading, or a ValueError naming it."""
    try:
        handle = safe_open(path, "flax")
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise ValueError(f"{path}: not a readable safetensors file (truncated or damaged? "
                         f"{err}).") from None  # fmt: skip
    with handle as f:
        yield f


def load_params(
    model: nn.Module, directory: Path, hf_config: dict, dtype: Any, new_head: bool = False
) -> dict[str, Any]:
    """The model's params tree filled from the checkpoint, every name and shape checked.

    new_head: the checkpoint is the bare encoder of a classification model; its tensors lack
    the encoder's prefix ("bert.") and the classifier starts from a seeded random init.
    """
    family, _ = family_of(hf_config)
    names_of = family.naming.names
    dummy = jnp.zeros((1, 2), jnp.int32)
    init = jax.jit(model.init) if new_head else functools.partial(jax.eval_shape, model.init)
    expected = traverse_util.flatten_dict(init(jax.random.key(0), dummy)["params"])
    checkpoint = _Checkpoint(directory)
    used, missing, params = set(), [], {}
    for keys, spec in expected.items():
        if new_head and keys[0] == "classifier":
            params[keys] = jnp.asarray(spec, dtype)
            continue
        names = names_of(keys, spec.shape[0])
        if new_head and names[0] not in checkpoint.files:  # a bare encoder: no "bert." prefix
            names = names_of(keys[1:], spec.shape[0])
        stacked = family.naming.stacked(keys)
        want = spec.shape[1:] if stacked else spec.shape
        found = [_read(checkpoint, family.naming.files, name, want[0]) for name in names]
        used.update(file for f in found if f is not None for file in f[1])
        if absent := [n for n, f in zip(names, found, strict=True) if f is None]:
            missing += absent
            continue
        arrays = []
        for name, (array, _) in zip(names, found, strict=True):
            array = family.naming.our_layout(keys, array)
            if array.shape != want:
                raise ValueError(
                    f"{name}: checkpoint shape {array.shape} (after layout change) "
                    f"!= model shape {want}; is config.json the checkpoint's?"
                )
            arrays.append(array.astype(dtype))
        params[keys] = jnp.asarray(np.stack(arrays) if stacked else arrays[0])
    ignored = family.buffers + (r"|^(lm_head|cls)\." if new_head else "")  # a dropped MLM head
    unexpected = sorted(n for n in checkpoint.files if n not in used and not re.search(ignored, n))
    if missing or unexpected:
        raise ValueError(
            f"{directory} does not match {type(model).__name__}: missing tensors "
            f"{missing}, unexpected tensors {unexpected}."
        )
    return traverse_util.unflatten_dict(params)


def _read(
    checkpoint: _Checkpoint, files: ExpertFiles | None, name: str, experts: int
) -> tuple[np.ndarray, list[str]] | None:
    """(torch's tensor `name`, the file entries it came from), or None where absent: as the
    checkpoint holds it, or as its files name it (`ExpertFiles`: an expert parameter
    assembled from each expert's parts)."""
    if name in checkpoint.files:
        return checkpoint.get(name), [name]
    if files is None:
        return None
    sources = files.sources(name, experts)
    if sources is None:  # not an expert parameter: at most renamed
        renamed = files.renamed(name)
        return (checkpoint.get(renamed), [renamed]) if renamed in checkpoint.files else None
    if any(n not in checkpoint.files for part in sources for n in part):
        return None
    parts = [np.stack([checkpoint.get(n) for n in part]) for part in sources]
    return np.concatenate(parts, axis=1), [n for part in sources for n in part]


def checkpoint_dir(path_or_repo_id: str | Path, patterns: list[str] | None = None) -> Path:
    """A local checkpoint directory, or a hub id fetched into the local cache (clear error
    offline): its configs, weights and tokenizer, or the files `patterns` match."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_repo_id)
    if path.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", text):
        raise FileNotFoundError(f"{text}: not a checkpoint directory (nor a hub id 'org/name').")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:  # pragma: no cover - huggingface_hub is a dependency
        raise ImportError(
            "loading a hub id needs huggingface_hub; pass a local directory."
        ) from err
    try:
        return Path(
            snapshot_download(
                text, allow_patterns=patterns or ["*.json", "*.safetensors", *TOKENIZER_FILES]
            )
        )
    except Exception as err:
        raise OSError(
            f"could not fetch {text!r} from the Hugging Face hub ({type(err).__name__}); "
            "offline? Pass a local directory holding config.json and model.safetensors."
        ) from err


def config_of(path_or_repo_id: str | Path) -> dict[str, Any]:
    """A checkpoint's config.json, alone: from a local directory (no weights needed there), or
    just that file of a hub id (clear error offline). What sizing a model needs."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        file = path / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"{path}: no config.json.")
    else:
        directory = checkpoint_dir(path_or_repo_id, patterns=["config.json"])
        file = directory / "config.json"
    return read_json(file)


def from_pretrained(
    path_or_repo_id: str | Path,
    dtype: Any = jnp.float32,
    *,
    compute_dtype: Any = None,
    remat: str = "none",
    attention_impl: str | None = None,
    num_labels: int | None = None,
) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """(model, {"params": ...}, config.json dict) from a Hugging Face checkpoint directory or id.

    Params are stored in `dtype`; the model computes in `compute_dtype` (default: the params').
    `num_labels` turns a bare BERT/RoBERTa encoder checkpoint into a sequence classifier with
    a new, randomly initialised head (as transformers' AutoModelForSequenceClassification).
    """
    directory = checkpoint_dir(path_or_repo_id)
    hf_config = config_of(directory)
    model, hf_config = _model(hf_config, compute_dtype=compute_dtype, remat=remat,
                              attention_impl=attention_impl, num_labels=num_labels)  # fmt: skip
    params = load_params(model, directory, hf_config, dtype, num_labels is not None)
    return model, {"params": params}, hf_config


def abstract_pretrained(
    hf_config: dict[str, Any], dtype: Any = jnp.float32, **options: Any
) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """What `from_pretrained(..., dtype, **options)` gives for a checkpoint with this
    config.json, its params as shapes only (`jax.ShapeDtypeStruct`): nothing read, nothing
    allocated, so a 70B model's step can be compiled ahead of time on a laptop."""
    model, hf_config = _model(hf_config, **options)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), shapes["params"])
    return model, {"params": params}, hf_config


def _model(
    hf_config: dict,
    *,
    compute_dtype: Any = None,
    remat: str = "none",
    attention_impl: str | None = None,
    num_labels: int | None = None,
) -> tuple[nn.Module, dict]:
    """The model for a config.json, with a new classifier of `num_labels` where one is asked."""
    if num_labels is not None:
        hf_config = _with_classifier(hf_config, num_labels)
    return build(hf_config, dtype=compute_dtype, remat=remat,
                 attention_impl=attention_impl), hf_config  # fmt: skip


def _with_classifier(hf_config: dict[str, Any], num_labels: int) -> dict[str, Any]:
    model_type = hf_config.get("model_type")
    prefix = {"bert": "Bert", "roberta": "Roberta"}.get(model_type)
    arch = (hf_config.get("architectures") or ["?"])[0]
    if prefix is None or arch not in (f"{prefix}Model", f"{prefix}ForMaskedLM") or num_labels < 1:
        raise ValueError(
            f"num_labels={num_labels} puts a new classifier (>= 1 label) on a BERT/RoBERTa "
            f"encoder or masked-LM checkpoint; this one is {model_type} {arch}."
        )
    labels = {str(i): f"LABEL_{i}" for i in range(num_labels)}
    return dict(hf_config, architectures=[f"{prefix}ForSequenceClassification"],
                id2label=labels, label2id={v: int(k) for k, v in labels.items()})  # fmt: skip


def save_pretrained(
    params: dict[str, Any],
    hf_config: dict[str, Any],
    out_dir: str | Path,
    *,
    copy_from: str | Path | None = None,
) -> Path:
    """Writes config.json and model.safetensors that transformers loads (e.g. a merged model),
    as a whole: built beside `out_dir`, then put in its place (an earlier model there is
    replaced, never mixed with the new files; other files there are refused).

    `copy_from`: a checkpoint directory whose tokenizer files are copied alongside.
    """
    family, _ = family_of(hf_config)
    tree = params.get("params", params)
    tensors = {name: jnp.array(t, copy=True) for name, t in _file_tensors(family.naming, tree)}
    dtypes = {str(t.dtype) for t in tensors.values()}
    config = dict(hf_config, dtype=dtypes.pop() if len(dtypes) == 1 else "float32")
    check_finite(tensors, out_dir)
    with atomic_dir(out_dir, "model", MODEL_FILES) as tmp:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        for name in TOKENIZER_FILES if copy_from else ():
            if (Path(copy_from) / name).exists():
                shutil.copy(Path(copy_from) / name, tmp / name)
    return Path(out_dir)


def _file_tensors(naming: Naming, tree: dict[str, Any]) -> Iterator[tuple[str, jax.Array]]:
    """The tensors a checkpoint file holds, named as transformers writes them."""
    for name, tensor in naming.tensors(tree):
        yield from naming.files.split(name, tensor) if naming.files else [(name, tensor)]


def random_checkpoint(
    out_dir: str | Path,
    hf_config: dict[str, Any],
    *,
    copy_from: str | Path | None = None,
    seed: int = 0,
) -> Path:
    """A randomly initialised checkpoint of `hf_config`, written as `save_pretrained` writes
    one: a stand-in with the real file layout for smoke runs (the notebooks' SMALL mode).
    `copy_from`: a directory whose tokenizer files are copied alongside."""
    model = build(hf_config)
    params = model.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))
    return save_pretrained(params, hf_config, out_dir, copy_from=copy_from)
