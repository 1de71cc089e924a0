"""The training loop behind `lora-jax train`: a config (`lora_jax.settings`) in, a trained
adapter and its metrics out. `lora_jax.run` builds the run (splits, mesh, base, adapter,
step); this runs it: the output directory held (`lora_jax.rundir`), checkpoints
(`lora_jax.checkpoint`), metrics and end-of-run outputs (`lora_jax.report`), and a stop on a
signal (`lora_jax.signals`) or a bad row only after a checkpoint, every process together.
"""

from __future__ import annotations

import math
import re
import signal
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from lora_jax import data as data_lib
from lora_jax import files, hosts
from lora_jax.checkpoint import Checkpoints
from lora_jax.run import Run, evaluate, make_train_step, run_tx, start_distributed, step_shardings
from lora_jax.rundir import RunDir
from lora_jax.settings import RunConfig
from lora_jax.signals import Stopped, StopRequests
from lora_jax.sources import BadRow, version_of
from lora_jax.variants import BASE_MODIFYING_INITS

PASS = "in the pass over the training rows before the first step"


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
    # Joined first: jax.distributed's preemption notifier takes SIGTERM, which ours replaces.
    start_distributed(settings.distributed)
    timeout = settings.distributed.timeout_s
    rundir = open_rundir(settings, resume, timeout)
    stop = StopRequests()
    try:
        rundir.check_shared(timeout)  # before anything loads: a pod's hosts have own disks
        run = Run.start(settings)  # every input checked
        rundir.check_data(version_of(run.examples["train"].rows), log, timeout)
        rundir.begin()
        hosts.barrier("process 0 cleared the output directory", timeout)  # no write before
        return _loop(run, resume, log, stop)
    finally:
        stop.restore()
        rundir.close()


def open_rundir(settings: RunConfig, resume: bool, timeout_s: float) -> RunDir:
    """The run's directory, locked by process 0 (`RunDir`). With several processes, its
    refusal (a held lock, other settings on --resume) is raised on every process, which
    would otherwise wait for process 0 at their first meeting."""
    refusal, error = "", None
    try:
        rundir = RunDir(settings, resume, main=jax.process_index() == 0)
    except (ValueError, OSError) as err:
        refusal, error = str(err), err
    refusal = hosts.from_process_0(refusal, "process 0 opened the output directory", timeout_s)
    if error is not None:
        raise error
    if refusal:
        raise ValueError(f"process 0: {refusal}")
    return rundir


def _loop(run: Run, resume: bool, log: Callable, stop: StopRequests) -> dict:
    """The run trained from its first step (or its newest checkpoint), evaluated, saved."""
    from lora_jax.report import Writer, finish  # plotting and files: only when training

    train_cfg = run.config.train
    out = files.path(run.config.output_dir)
    main = jax.process_index() == 0
    head_steps = train_cfg.head_only_steps
    txs = {f: run_tx(run, f) for f in {head_steps > 0, False}}
    shardings = step_shardings(run, txs[False])
    opt_state = jax.jit(txs[False].init, out_shardings=shardings.opt_state)(run.adapter)
    ckpt_cfg = run.config.checkpoint
    timeout = run.config.distributed.timeout_s
    # The task's pass over the training rows, where it has one (DPO's reference log-probs):
    # made anew on --resume (from the base alone, they come out the same).
    values = run.task.row_values(run, lambda: _stop_in_setup(stop, timeout, PASS))
    if values:
        log(f"{' and '.join(values)} of the {len(run.examples['train'])} training rows "
            "computed (one forward pass)")  # fmt: skip
        run = run.with_values(values)
    checkpoints = Checkpoints(out / "checkpoints", ckpt_cfg.every, ckpt_cfg.keep, timeout)
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
    elif resume:
        log(f"--resume: no checkpoint in {out / 'checkpoints'} yet: starting at step 1")
    writer = Writer(out, start, enabled=main, sync_every=ckpt_cfg.every)
    steps = {f: make_train_step(run, tx, shardings) for f, tx in txs.items()}
    if run.router_aux:
        log(f"the router is trained: the loss adds its load-balancing loss x {run.router_aux:g} "
            "(router_aux_loss_coef)")  # fmt: skip
    if start == 0 and run.task.reports_probe:
        log(f"eval before training: {_fmt(evaluate(run, adapter))}")
    bar = writer.progress(start, train_cfg.steps)
    try:
        _stop_in_setup(stop, timeout, f"before step {start + 1}")  # asked in setup
        data_state = batches.get_state()  # what a checkpoint of the newest step holds
        for step in range(start, train_cfg.steps):
            t0 = time.perf_counter()
            bad, local = _next(batches)
            doing = f"reading step {step + 1}'s batch"
            stopping, bad_anywhere = _anywhere(stop, timeout, doing, bad is not None)
            if stopping:
                if step > start:
                    checkpoints.save(step, (adapter, opt_state), data_state, force=True)
                saved = (f"checkpoint written in {out / 'checkpoints'}" if step else
                         "nothing trained")  # fmt: skip
                if isinstance(bad, WorkerLost):
                    raise WorkerLost(f"{bad} (stopped at step {step}: {saved}; --resume "
                                     "continues)")  # fmt: skip
                if bad_anywhere:
                    why, then = (bad, "fix the row") if bad else (
                        "another process stopped on its data", "see its line")  # fmt: skip
                    raise BadRow(f"{why} (stopped at step {step}: {saved}; {then}, then "
                                 "--resume)")  # fmt: skip
                raise stop.stopped(step, saved)
            batch = run.batch(local, train_cfg.batch_size)
            adapter, opt_state, metrics = steps[step < head_steps](
                adapter, opt_state, run.base, batch, jnp.int32(step)
            )
            metrics = {k: float(v) for k, v in metrics.items()}
            if not metrics.pop("targets"):
                raise ValueError(
                    f"step {step + 1}: its batch keeps no token to learn from within "
                    f"data.max_length {run.config.data.max_length} (each prompt fills it); "
                    "stopped before saving anything from it (the newest checkpoint in "
                    f"{out / 'checkpoints'} is the last good state). Raise data.max_length, "
                    "or shorten the prompts."
                )
            if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                raise FloatingPointError(
                    f"step {step + 1}: loss {metrics['loss']}, gradient norm "
                    f"{metrics['grad_norm']}; stopped before saving anything from it (the "
                    f"newest checkpoint in {out / 'checkpoints'} is the last good state). "
                    "Lower train.learning_rate, or check the data."
                )
            metrics["tokens_per_s"] = metrics.pop("tokens") / (time.perf_counter() - t0)
            metrics["padding"] = data_lib.padding_share(local[run.task.real_tokens])
            writer.log(step + 1, metrics, bar)
            data_state = batches.get_state()
            checkpoints.save(step + 1, (adapter, opt_state), data_state)
            if step + 1 == head_steps and run.task.reports_probe:
                log(f"eval after training the head alone: {_fmt(evaluate(run, adapter))}")
        if _anywhere(stop, timeout, "training's last step")[0]:  # asked during it
            checkpoints.save(train_cfg.steps, (adapter, opt_state), data_state, force=True)
            raise stop.stopped(train_cfg.steps, f"checkpoint written in {out / 'checkpoints'}")
        try:
            metrics = evaluate(run, adapter)
        except BadRow as err:  # a bad eval row found now: the training is kept for --resume
            checkpoints.save(train_cfg.steps, (adapter, opt_state), data_state, force=True)
            kept = f"checkpoint written in {out / 'checkpoints'}"
            raise BadRow(f"{err} (in the eval after the last step: {kept}; fix the row, then "
                         "--resume)") from None  # fmt: skip
    finally:
        batches.close()  # its reader threads and worker processes stop now, not at exit
        bar.close()
        checkpoints.close()
        writer.close()
    log(f"eval after LoRA: {_fmt(metrics)}")
    run.task.finish(run, adapter, log)
    # Every process: it gathers the adapter first.
    finish(out, adapter, metrics, run.lora, run.hf_config, run.model_dir, log, initial)
    return metrics


def _stop_in_setup(stop: StopRequests, timeout_s: float, when: str) -> None:
    """`Stopped` on every process where any was asked to stop (`when`: before which step,
    or in which phase of the setup)."""
    if _anywhere(stop, timeout_s, when)[0]:
        raise Stopped(stop.signum, f"stopped by {signal.Signals(stop.signum).name} {when}; "
                      "nothing trained")  # fmt: skip


def _anywhere(
    stop: StopRequests, timeout_s: float, doing: str, bad_row: bool = False
) -> tuple[bool, bool]:
    """(whether to stop, whether a bad row was read), the same on every process: a signal to
    any process, or a bad row read by any (`bad_row`: this one read one), stops them all
    after the same step. Each step they share their flags (`hosts.gather`, with the run's
    deadline), so none is left waiting in a collective."""
    flags = hosts.gather(f"{int(stop.requested)}{int(bad_row)}", doing, timeout_s)
    bad = any(f[1] == "1" for f in flags)
    return bad or any(f[0] == "1" for f in flags), bad


class WorkerLost(OSError):
    """A data.workers process ended under the run (killed by the OS, as for memory)."""


def _next(batches: Any) -> tuple[BadRow | WorkerLost | None, data_lib.Batch | None]:
    """(None, the next batch), or (why there is none, None): a bad row, or a data worker
    lost; the loop saves a checkpoint before it stops (with several processes, all stop
    together)."""
    try:
        return None, next(batches)
    except BadRow as err:
        return err, None
    except RuntimeError as err:  # grain's words for a worker that died
        if not (found := re.match(r"Worker process was terminated .*exit code (-?\d+)", str(err))):
            raise
        code = int(found[1])
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        return WorkerLost(f"a data.workers process ended ({how}; the OS ends one that runs "
                          "out of memory)"), None  # fmt: skip


def _continue(batches: Any, state: Mapping[str, Any], out: epath.Path) -> None:
    """The batch iterator set to a checkpoint's data state."""
    try:
        batches.set_state(state)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{out / 'checkpoints'}: the data state ({list(state)}) is not this "
                         f"version's stream state ({type(err).__name__}: {err}); start a fresh "
                         "run.") from None  # fmt: skip


def _fmt(metrics: Mapping[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
