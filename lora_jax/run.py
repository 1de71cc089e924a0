"""The pieces that build a run from its settings (`lora_jax.settings`), shared by the training
loop (`lora_jax.train`), `lora-jax eval` and `lora-jax compile` (`lora_jax.aot`): the splits,
the mesh, the base checked and loaded, the adapter added, the shardings, the optimizer and the
task's train step.

Setup is a few named steps (read the splits, build the mesh, load and shard the base, add the
adapter) into a `Setup` (what the step is built from: arrays in a `Run`, shapes only for
`compile`); the step itself is `lora_jax.step.make_step` on the task's loss, one `jax.jit`
over a (data, fsdp, expert, tensor) mesh: the base split by its family's rules, each adapter
leaf like its kernel, the batch over (data, fsdp, expert).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
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
from lora_jax import hosts, sharding
from lora_jax.adalora import adalora_allocator, adalora_penalty
from lora_jax.apply import kernel_layouts, lora_apply
from lora_jax.config import LOFTQ, LoraConfig
from lora_jax.files import resolve
from lora_jax.models import moe
from lora_jax.models.options import DTYPES
from lora_jax.quant import loftq, quantize
from lora_jax.settings import DistributedSettings, MeshSettings, RunConfig, TrainSettings
from lora_jax.sources import BadRow, open_rows
from lora_jax.step import StepShardings, factors_only, make_step, opt_state_shardings
from lora_jax.tasks import TASKS, Encoder, Task
from lora_jax.tree import as_dict, combine, init, sites, split
from lora_jax.variants import BASE_MODIFYING_INITS


def start_distributed(dist: DistributedSettings) -> None:
    """Joins the other processes (`hosts.join`: as `distributed.*` names them, or as the
    launcher's variables show them), once; a single process has nothing to do."""
    hosts.join(dist.coordinator, dist.num_processes, dist.process_id)


def open_splits(cfg: RunConfig, tokenizer: data_lib.Tokenizer) -> dict[str, data_lib.Encode]:
    """The train and eval splits as the task's examples by index (`data_lib.Encode`), each
    file opened (a JSONL file indexed) and its first rows checked and encoded: a wrong field
    or template is refused before anything compiles; a later bad row, when it is read."""
    data, splits = cfg.data, {}
    classes = len(data.labels) or cfg.model.num_labels
    task = TASKS[data.task]
    for name in ("train", "eval"):
        rows = open_rows(resolve(getattr(data, name)))
        splits[name] = data_lib.Encode(rows, Encoder(task, tokenizer, data, classes))
        if (first := splits[name].check_first()) and not sum(map(task.targets, first)):
            raise ValueError(f"{getattr(data, name)}: none of the first {len(first)} rows keeps "
                             f"a token to learn from within data.max_length {data.max_length} "
                             "(each prompt fills it): raise data.max_length, or shorten the "
                             "prompts.")  # fmt: skip
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
    if mesh.devices > len(devices):
        kind = devices[0].device_kind
        raise ValueError(f"mesh.devices {mesh.devices}: there are {len(devices)} devices "
                         f"({kind}); give at most that, or -1 for all.")  # fmt: skip
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


def load_base(cfg: RunConfig, model_dir: str, mesh: jax.sharding.Mesh) -> tuple[Any, Any, dict]:
    """(model, params, hf_config) of the base checkpoint, the task and sequence length checked
    against it first (before any weight is read), each param built in its sharding over
    `mesh` from the slices this process's devices hold."""
    from lora_jax.models.hub import config_of, from_pretrained

    check_base(cfg, config_of(model_dir), model_dir)
    return from_pretrained(model_dir, **model_options(cfg), mesh=mesh)


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


def on_mesh(params: Any, mesh: jax.sharding.Mesh, rules: sharding.Rules, lora: LoraConfig,
            put: bool = True) -> tuple[Any, Any, Any, Any]:  # fmt: skip
    """(adapter, base, adapter shardings, base shardings) of adapted `params`: shardings by
    the family's `rules` (each adapter leaf like its kernel), the params placed in them
    (`put`; shapes only are not), split into the trained adapter and the frozen base."""
    shardings = sharding.param_shardings(params, mesh, rules)
    params = jax.device_put(params, shardings) if put else params
    return (*split(params, lora), *split(shardings, lora))


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
        """The task's behaviour (`lora_jax.tasks`), with its settings: loss terms, evals
        reported, checks."""
        return TASKS[self.config.data.task].bound(self.config)

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
        model, params, hf_config = load_base(cfg, model_dir, mesh)
        example = jnp.asarray(data_lib.first_batch(examples["train"])["input_ids"])
        params = adapted(cfg, model, params, example)
        parts = on_mesh(params, mesh, family_of(hf_config)[0].rules, cfg.lora)
        return cls(cfg, mesh, model, *parts, hf_config, model_dir, examples,
                   sharding.local_rows(mesh, cfg.train.batch_size))  # fmt: skip

    def batch(self, local: data_lib.Batch, size: int) -> dict[str, jax.Array]:
        """This process's rows as the global batch (every process's padded alike)."""
        local = agreed(local, self.examples["train"].encoder.pad)
        return sharding.global_batch(self.mesh, local, size)

    def eval_batches(self, split: str = "eval") -> Iterator[tuple[data_lib.Batch, int]]:
        """A split's examples once, in order (`data_lib.eval_batches`): this process's rows
        of each global batch, and the number of real rows in it."""
        size = self.config.train.batch_size
        return data_lib.eval_batches(self.examples[split], size, self.rows)

    def stream(self) -> Any:
        """The training batches (`data_lib.train_stream`): this process's rows, packed where
        the task packs, read ahead by data.workers processes (0: threads)."""
        cfg = self.config
        return data_lib.train_stream(self.examples["train"], cfg.train.batch_size,
                                     cfg.train.seed, self.rows, self.task.packs(cfg.data),
                                     workers=cfg.data.workers)  # fmt: skip

    def per_row(self, split: str, fn: Callable, desc: str,
                between: Callable[[], None] = lambda: None) -> np.ndarray:  # fmt: skip
        """fn(base, batch)'s rows over a split's rows in order (each process reads its own), as
        one (rows, ...) array on every process; `between` runs after each batch (a stop
        request's check)."""
        compiled = jax.jit(fn, out_shardings=sharding.replicated(self.mesh))
        parts = []
        with contextlib.closing(self.in_order(split, desc)) as batches:
            for batch, real in batches:
                parts.append(np.asarray(compiled(self.base, batch))[:real])
                between()
        return np.concatenate(parts)

    def in_order(self, split: str, desc: str) -> Iterator[tuple[dict[str, jax.Array], int]]:
        """A split's global batches once, in order (`eval_batches`), read by every process
        before any computes (`_read_together`), and the real rows in each; a progress bar
        that closes with the generator (close it: a bar left open prints past the run's
        last line)."""
        size, timeout = self.config.train.batch_size, self.config.distributed.timeout_s
        bar = tqdm(total=len(self.examples[split]), desc=desc, unit="ex", leave=False, delay=1,
                   disable=jax.process_index() != 0)  # fmt: skip
        try:
            for local, real in _read_together(self.eval_batches(split), split, timeout):
                yield self.batch(local, size), real
                bar.update(real)
        finally:
            bar.close()

    def with_values(self, values: Mapping[str, np.ndarray]) -> Run:
        """The run whose training examples carry `values` (the task's `row_values`)."""
        train = data_lib.WithValues(self.examples["train"], values)
        return dataclasses.replace(self, examples={**self.examples, "train": train})

    @functools.cached_property
    def eval_terms(self) -> Callable:
        """(adapter, base, batch) -> loss_terms, compiled once for every evaluation."""
        return jax.jit(lambda adapter, base, batch: loss_terms(self, combine(adapter, base), batch))


# ----------------------------------------------------------------------------- the step


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
    """(summed loss, count, summed correct, {metric: sum}) of a batch by the run's task
    (`lora_jax.tasks`): per example for classification, per response token for SFT, per
    pair for DPO; float32 logits and loss."""
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

    total, count, _, sums = run.task.loss_terms(apply, params, batch, rngs)
    logits = moe.sown_router_logits(sown[0])
    real = batch[run.task.real_tokens].reshape(-1) > 0
    aux = moe.load_balancing_loss(logits, run.model.config.experts_per_token, real)
    return total + run.router_aux * aux * count, count, sums


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
            total, count, _, sums = loss_terms(run, params, batch, rngs)
            return total, count, sums
        return with_router_loss(run, params, batch, rngs)

    def metrics(batch, step):
        return {"lr": lr(step), "tokens": jnp.sum(batch[run.task.real_tokens] > 0)}

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
    """Mean loss and accuracy (per example, per response token or per pair), and the task's
    other metrics, over a whole split, read in order (each process its own rows), with a
    progress bar."""
    sums, more = np.zeros(3), {}
    with contextlib.closing(run.in_order(split_name, split_name)) as batches:
        for batch, _ in batches:
            *terms, extra = run.eval_terms(adapter, run.base, batch)
            sums += np.asarray([float(t) for t in terms])
            for name, value in extra.items():
                more[name] = more.get(name, 0.0) + float(value)
    if not sums[1]:  # a mean of nothing: said, not written as NaN
        data = run.config.data
        raise ValueError(f"{getattr(data, split_name)}: no row keeps a token to evaluate "
                         f"within data.max_length {data.max_length} (each prompt fills it): "
                         "raise data.max_length, or shorten the prompts.")  # fmt: skip
    return {"loss": float(sums[0] / sums[1]), "accuracy": float(sums[2] / sums[1]),
            **{name: value / sums[1] for name, value in more.items()}}  # fmt: skip


def _read_together(batches: Iterator[Any], split_name: str, timeout_s: float) -> Iterator[Any]:
    """`batches`, each read by every process before any evaluates it: a bad row read by one
    process stops them all, each with a line (one stopping alone would leave the others
    waiting for it in the eval step's collectives). One process: no wait."""
    while True:
        bad = None
        try:
            item = next(batches)
        except StopIteration:  # on every process at once: each reads as many batches
            return
        except BadRow as err:
            bad = err
        doing = f"reading the {split_name} split"
        flags = hosts.gather(str(int(bad is not None)), doing, timeout_s)
        if bad is not None:
            raise bad
        if "1" in flags:
            raise BadRow(f"process {flags.index('1')} read a bad row of the {split_name} split "
                         "(see its line)")  # fmt: skip
        yield item
