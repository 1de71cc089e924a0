"""Hugging Face checkpoints in and out, without torch: each family's model classes, its
`Naming` (our paths <-> torch names, `lora_jax.models.naming`), sharding rules and buffers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from etils import epath
from flax import traverse_util
from jax.sharding import Mesh
from safetensors.flax import save_file
from tqdm.auto import tqdm

from lora_jax.files import atomic_dir, check_finite, is_remote, path, read_json
from lora_jax.models.bert import BertConfig, BertForSequenceClassification, BertModel
from lora_jax.models.gpt2 import GPT2Config, GPT2LMHeadModel
from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM
from lora_jax.models.moe import ROUTER
from lora_jax.models.naming import TRANSFORMERS_EXPERTS, ExpertFiles, Naming
from lora_jax.models.reading import Checkpoint, Leaf, Tensor, permutation
from lora_jax.sharding import EXPERT, FSDP, TENSOR, Rules, param_shardings

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
    "vocab.json", "merges.txt", "tokenizer.model", "generation_config.json",
)  # fmt: skip
# What a model directory holds: an earlier model's files, which a save replaces whole.
MODEL_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
               *TOKENIZER_FILES)  # fmt: skip
MODEL_MARKER = "config.json"  # written last: a model directory is whole once it is there


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


def load_params(
    model: nn.Module, directory: Path, hf_config: dict, dtype: Any, new_head: bool = False,
    shardings: Any = None,
) -> dict[str, Any]:  # fmt: skip
    """The model's params tree filled from the checkpoint, every name and shape checked (from
    the files' headers) before any tensor is read.

    shardings: a NamedSharding per param (`lora_jax.sharding.param_shardings`): each param
    is built in its sharding from the slices this process's devices hold, read alone
    (`models.reading`); without, each is read whole onto the default device.
    new_head: the checkpoint is the bare encoder of a classification model; its tensors lack
    the encoder's prefix ("bert.") and the classifier starts from a seeded random init.
    """
    checkpoint = Checkpoint(directory)
    expected, leaves = plan(model, checkpoint, hf_config, new_head)
    flat_shardings = traverse_util.flatten_dict(shardings) if shardings is not None else {}
    dummy = jnp.zeros((1, 2), jnp.int32)
    params = _new_head(model, dummy, dtype, flat_shardings) if new_head else {}
    bar = tqdm(leaves.items(), desc="loading", unit="tensor", leave=False, delay=1)
    for keys, leaf in bar:
        if keys not in flat_shardings:
            params[keys] = jnp.asarray(leaf.read(checkpoint, dtype=dtype))
            continue
        read = functools.partial(leaf.read, checkpoint, dtype=dtype)
        shape = expected[keys].shape
        params[keys] = jax.make_array_from_callback(shape, flat_shardings[keys], read)
    return traverse_util.unflatten_dict(params)


def plan(
    model: nn.Module, checkpoint: Checkpoint, hf_config: dict, new_head: bool = False
) -> tuple[dict[tuple, Any], dict[tuple, Leaf]]:
    """(the model's param shapes, where each param lies in the checkpoint), flat by keys;
    every name and shape checked (from the files' headers), nothing read. A new head's
    params (`new_head`) have no place in the files."""
    family, _ = family_of(hf_config)
    dummy = jnp.zeros((1, 2), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), dummy)["params"]
    expected = traverse_util.flatten_dict(shapes)
    leaves, used, missing = {}, set(), []
    for keys, spec in expected.items():
        if new_head and keys[0] == "classifier":
            continue
        layers, absent = _layers(checkpoint, family.naming, keys, spec.shape, new_head)
        used.update(n for layer in layers if layer is not None for n in layer.names())
        if absent:
            missing += absent
            continue
        leaves[keys] = _leaf(checkpoint, family.naming, keys, spec.shape, layers)
    ignored = family.buffers + (r"|^(lm_head|cls)\." if new_head else "")  # a dropped MLM head
    unexpected = sorted(n for n in checkpoint.files if n not in used and not re.search(ignored, n))
    if missing or unexpected:
        raise ValueError(
            f"{checkpoint.directory} does not match {type(model).__name__}: missing tensors "
            f"{missing}, unexpected tensors {unexpected}."
        )
    return expected, leaves


def _new_head(model: nn.Module, dummy: jax.Array, dtype: Any, shardings: dict) -> dict:
    """A new classifier's params, seeded (only they are computed), in their shardings."""
    init = jax.jit(lambda key: model.init(key, dummy)["params"]["classifier"])
    head = traverse_util.flatten_dict({"classifier": init(jax.random.key(0))})
    return {k: jax.device_put(jnp.asarray(v, dtype), shardings.get(k)) for k, v in head.items()}


def _layers(
    checkpoint: Checkpoint, naming: Naming, keys: tuple, shape: tuple[int, ...], new_head: bool
) -> tuple[list[Tensor | None], list[str]]:
    """Where each layer of the param at `keys` (of `shape`) lies in the checkpoint (None
    where absent), and the torch names absent."""
    names = naming.names(keys, shape[0])
    if new_head and names[0] not in checkpoint.files:  # a bare encoder: no "bert." prefix
        names = naming.names(keys[1:], shape[0])
    want = shape[1:] if naming.stacked(keys) else shape
    layers = [_tensor(checkpoint, naming.files, name, want[0]) for name in names]
    return layers, [n for n, t in zip(names, layers, strict=True) if t is None]


def _leaf(
    checkpoint: Checkpoint, naming: Naming, keys: tuple, shape: tuple[int, ...], layers: list
) -> Leaf:
    """The param at `keys` as a `Leaf` of its `layers`, its shape checked against `shape`."""
    stacked = naming.stacked(keys)
    want = tuple(shape[1:] if stacked else shape)
    layout = functools.partial(naming.our_layout, keys)
    leaf = Leaf(tuple(layers), stacked, permutation(layout, len(want)))
    for layer in layers:  # each layer's: a stacked leaf's may differ one from another
        if (got := tuple(layer.shape(checkpoint)[a] for a in leaf.axes)) != want:
            raise ValueError(f"{layer.names()[0]}: checkpoint shape {got} (after layout "
                             f"change) != model shape {want}; is config.json the "
                             "checkpoint's?")  # fmt: skip
    return leaf


def _tensor(checkpoint: Checkpoint, files: ExpertFiles | None, name: str, experts: int):
    """Where torch's tensor `name` lies, or None where absent: as the checkpoint holds it, or
    as its files name it (`ExpertFiles`: an expert parameter assembled from each expert's
    parts)."""
    if name in checkpoint.files:
        return Tensor.one(name)
    if files is None:
        return None
    sources = files.sources(name, experts)
    if sources is None:  # not an expert parameter: at most renamed
        renamed = files.renamed(name)
        return Tensor.one(renamed) if renamed in checkpoint.files else None
    if any(n not in checkpoint.files for part in sources for n in part):
        return None
    return Tensor(tuple(tuple(part) for part in sources), experts=True)


def checkpoint_dir(path_or_repo_id: str | os.PathLike, patterns: list[str] | None = None) -> Any:
    """A checkpoint directory, local or in a bucket (read in place, by range), or a hub id
    fetched into the local cache (clear error offline): its configs, weights and tokenizer,
    or the files `patterns` match."""
    where = path(path_or_repo_id)
    if where.is_dir():
        return where
    text = str(path_or_repo_id)
    if is_remote(text) or where.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", text):
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


def config_of(path_or_repo_id: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's config.json, alone: from a directory (no weights needed there), or just
    that file of a hub id (clear error offline). What sizing a model needs."""
    where = path(path_or_repo_id)
    if where.is_dir():
        file = where / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"{where}: no config.json.")
    else:
        directory = checkpoint_dir(path_or_repo_id, patterns=["config.json"])
        file = directory / "config.json"
    hf_config = read_json(file)
    try:
        check_sizes(hf_config)
    except ValueError as err:
        raise ValueError(f"{file}: {err}") from None
    return hf_config


# A model's sizes, by each family's names: whole numbers >= 1 that fit token ids and
# indices (int32). A config that gives 0 heads or layers, a string, or 10^12 is no model.
SIZES = (
    *("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "head_dim"),
    *("num_attention_heads", "num_key_value_heads", "max_position_embeddings"),
    *("moe_intermediate_size", "n_embd", "n_layer", "n_head", "n_positions", "n_inner"),
)


def check_sizes(hf_config: dict[str, Any]) -> None:
    """A ValueError naming the first size of a config.json that is not a whole number in
    [1, 2^31), that its family needs and it lacks, or a setting of another type than its
    family reads (`check_kinds`)."""

    def check(name: str, value: Any) -> None:
        if value is not None and not (type(value) is int and 1 <= value < 2**31):
            raise ValueError(f"{name} is {value!r}: a model size is a whole number from 1 to "
                             "2^31 - 1.")  # fmt: skip

    for name in SIZES:
        check(name, hf_config.get(name))
    family, _ = family_of(hf_config)
    try:
        config = family.config.from_hf(hf_config)
    except KeyError as err:
        raise ValueError(f"no {err.args[0]!r}, which a {hf_config['model_type']} model "
                         "needs.") from None  # fmt: skip
    for name in SIZES:
        check(name, getattr(config, name, None))
    check_kinds(config)


def check_kinds(config: Any) -> None:
    """A ValueError naming the first field of a family's config (as read from config.json)
    whose value is not of its declared kind: a finite number for a float (a rope factor of
    "x" would fail deep in the rotary tables), true or false for a bool (the string "false"
    would tie the embeddings), a whole number for an int, text for a str."""
    kinds = {"float": _is_number, "bool": lambda v: isinstance(v, bool),
             "int": lambda v: type(v) is int, "str": lambda v: isinstance(v, str)}  # fmt: skip
    for field in dataclasses.fields(config):
        kind, optional, _ = str(field.type).partition(" | None")
        value = getattr(config, field.name)
        if kind in kinds and not (value is None and optional) and not kinds[kind](value):
            raise ValueError(f"{field.name} is {value!r} (from config.json), not "
                             f"{KIND_NAMES[kind]}.")  # fmt: skip


KIND_NAMES = {"float": "a finite number", "bool": "true or false", "int": "a whole number",
              "str": "text"}  # fmt: skip


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def from_pretrained(
    path_or_repo_id: str | Path,
    dtype: Any = jnp.float32,
    *,
    compute_dtype: Any = None,
    remat: str = "none",
    attention_impl: str | None = None,
    num_labels: int | None = None,
    mesh: Mesh | None = None,
) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """(model, {"params": ...}, config.json dict) from a Hugging Face checkpoint directory or id.

    Params are stored in `dtype`; the model computes in `compute_dtype` (default: the params').
    `num_labels` turns a bare BERT/RoBERTa encoder checkpoint into a sequence classifier with
    a new, randomly initialised head (as transformers' AutoModelForSequenceClassification).
    With a `mesh` (`lora_jax.sharding.make_mesh`), each param is built split by its family's
    sharding rules, every process reading only the slices its devices hold: no host reads,
    and no device holds, the whole model.
    """
    directory = checkpoint_dir(path_or_repo_id)
    hf_config = config_of(directory)
    model, hf_config = _model(hf_config, compute_dtype=compute_dtype, remat=remat,
                              attention_impl=attention_impl, num_labels=num_labels)  # fmt: skip
    shardings = None
    if mesh is not None:
        shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
        shardings = param_shardings(shapes["params"], mesh, family_of(hf_config)[0].rules)
    params = load_params(model, directory, hf_config, dtype, num_labels is not None, shardings)
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
) -> epath.Path:
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
    with atomic_dir(out_dir, "model", MODEL_FILES, MODEL_MARKER) as tmp:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / MODEL_MARKER).write_text(json.dumps(config, indent=2, sort_keys=True))
        if copy_from:
            copy_tokenizer(copy_from, tmp)
    return path(out_dir)


def copy_tokenizer(source: str | os.PathLike, into: Path) -> None:
    """The tokenizer files a checkpoint directory (local or in a bucket) holds, copied."""
    for name in TOKENIZER_FILES:
        if (file := path(source) / name).exists():
            (into / name).write_bytes(file.read_bytes())


def _file_tensors(naming: Naming, tree: dict[str, Any]) -> Iterator[tuple[str, jax.Array]]:
    """The tensors a checkpoint file holds, named as transformers writes them."""
    for name, tensor in naming.tensors(tree):
        yield from file_tensors(naming, name, tensor)


def file_tensors(naming: Naming, name: str, tensor: Any) -> list[tuple[str, Any]]:
    """One tensor (torch's run-time name and layout) as checkpoint files hold it: a mixture's
    expert parameter as each expert's parts (`ExpertFiles`), else as it is."""
    return naming.files.split(name, tensor) if naming.files else [(name, tensor)]


def random_checkpoint(
    out_dir: str | Path,
    hf_config: dict[str, Any],
    *,
    copy_from: str | Path | None = None,
    seed: int = 0,
) -> epath.Path:
    """A randomly initialised checkpoint of `hf_config`, written as `save_pretrained` writes
    one: a stand-in with the real file layout for smoke runs (the notebooks' SMALL mode).
    `copy_from`: a directory whose tokenizer files are copied alongside."""
    model = build(hf_config)
    params = model.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))
    return save_pretrained(params, hf_config, out_dir, copy_from=copy_from)
