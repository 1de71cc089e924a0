"""What a training run leaves behind: progress bar, metrics (JSONL + TensorBoard), the
adapter in peft format, sizes on disk and a PNG loss curve."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
from etils import epath
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from lora_jax.adalora import adalora_ranks
from lora_jax.config import LOFTQ, LoraConfig
from lora_jax.files import atomic, is_remote, path, upload, write_text

METRICS, TENSORBOARD = "metrics.jsonl", "tensorboard"


class Writer:
    """Metrics of process 0: one JSON line per step and TensorBoard scalars. On resume the
    lines after the restored step are dropped, so the file holds one curve. In a bucket,
    where an object cannot be appended to, both are written to a local mirror and uploaded
    every `sync_every` steps (the checkpoints') and at the end."""

    def __init__(self, out: epath.Path, start: int, enabled: bool, sync_every: int = 0):
        self.enabled, self.out, self.sync_every, self.tb = enabled, out, sync_every, None
        self.local = out
        if not enabled:
            return
        if is_remote(out):
            self.local = Path(tempfile.mkdtemp(prefix="lora_jax-"))
        self.path = self.local / METRICS
        self.local.mkdir(parents=True, exist_ok=True)
        kept = [r for r in _rows(out / METRICS) if r["step"] <= start]
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(self.local / TENSORBOARD), purge_step=start + 1)

    def progress(self, start: int, total: int) -> tqdm:
        return tqdm(
            total=total, initial=start, disable=not self.enabled, desc="train", dynamic_ncols=True
        )

    def log(self, step: int, metrics: Mapping[str, float], bar: tqdm) -> None:
        bar.update(1)
        if not self.enabled:
            return
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for name, value in metrics.items():
            self.tb.add_scalar(f"train/{name}", value, step)
        if self.sync_every and step % self.sync_every == 0:
            self.sync()

    def sync(self) -> None:
        """The local mirror's files uploaded to the bucket, each whole (nothing to do for a
        local output_dir)."""
        if self.local == self.out or self.tb is None:
            return
        self.tb.flush()
        for file in sorted(f for f in self.local.rglob("*") if f.is_file()):
            upload(file, self.out / file.relative_to(self.local).as_posix())

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.sync()
            if self.local != self.out:
                shutil.rmtree(self.local, ignore_errors=True)


def _rows(path: epath.Path) -> list[dict[str, Any]]:
    """The metrics lines of a run (none if the file is absent), or a ValueError naming the
    file and the line that is not a JSON object with a step."""
    rows = []
    for n, line in enumerate(path.read_text().splitlines() if path.exists() else [], 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}:{n}: not a JSON line ({err.msg}); this run's metrics "
                "are damaged: start it fresh (without --resume)."
            ) from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ValueError(f"{path}:{n}: not a metrics row (no step).")
        rows.append(row)
    return rows


def weights_bytes(directory: str | os.PathLike) -> int:
    """Bytes of a model or adapter directory's safetensors files, as stored."""
    return sum(f.stat().length for f in path(directory).glob("*.safetensors"))


def loss_curve(metrics_file: epath.Path, png: epath.Path) -> None:
    """Training loss against step, as a PNG. Drawn on a bare Figure: no pyplot backend is
    chosen or changed, so a notebook's inline plots keep working after a run."""
    from matplotlib.figure import Figure

    rows = _rows(metrics_file)
    fig = Figure(figsize=(6, 3.5), dpi=100, layout="tight")
    ax = fig.subplots()
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set(xlabel="step", ylabel="training loss", title=png.parent.name)
    ax.grid(alpha=0.3)
    save_figure(fig, png)


def save_figure(fig: Any, png: str | os.PathLike) -> epath.Path:
    """Writes a matplotlib Figure as a PNG atomically (a temporary name, then a rename), so
    an interrupted run never leaves a truncated image."""
    with atomic(png) as tmp:
        fig.savefig(tmp, format="png")
    return path(png)


def finish(
    out: epath.Path,
    adapter: Any,
    metrics: Mapping[str, float],
    config: LoraConfig,
    hf_config: dict[str, Any],
    model_dir: str,
    log: Callable[[str], None],
    initial_adapter: Any = None,
) -> None:
    """Saves the adapter (peft format, for the base in `model_dir`) and its final eval
    metrics (eval.json) in `out`, compares sizes on disk, plots the loss curve. Called on
    every process: the adapter is gathered whole first; process 0 writes. A PiSSA/OLoRA
    run passes its `initial_adapter` (gathered), so the adapter is saved for the original
    base, as peft converts it."""
    from lora_jax.io import save_adapter

    host_adapter = multihost_utils.process_allgather(adapter, tiled=True)  # whole, every host
    if jax.process_index() != 0:
        return
    adapter_dir = out / "adapter"
    write_text(out / "eval.json", json.dumps(dict(metrics), indent=1))
    save_adapter(adapter_dir, host_adapter, config, hf_config=hf_config, base_model_id=model_dir,
                 initial_adapter=initial_adapter)  # fmt: skip
    small, big = weights_bytes(adapter_dir), weights_bytes(model_dir)
    log(
        f"adapter {adapter_dir}: {small / 2**20:.2f} MiB on disk; base {big / 2**20:.1f} MiB "
        f"({100 * small / max(big, 1):.1f}%)"
    )
    if (spec := config.adalora) is not None:
        ranks = adalora_ranks(host_adapter).values()
        kept, layers = sum(int(r.sum()) for r in ranks), sum(r.size for r in ranks)
        log(
            f"AdaLoRA: {kept} ranks kept of {layers * config.rank} ({layers} module layers, "
            f"target {spec.target_rank} each: {layers * spec.target_rank})"
        )
    if config.init == LOFTQ:
        log(
            "lora.init=loftq: the adapter fits the LoftQ-quantized base (lj.loftq recomputes it "
            "from this base and the run's model settings, as lora-jax eval does), not the "
            "float checkpoint peft and vLLM would put it on"
        )
    loss_curve(out / "metrics.jsonl", out / "loss.png")
    log(f"loss curve: {out / 'loss.png'}; metrics: {out / 'metrics.jsonl'}")
