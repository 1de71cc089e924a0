"""A run's output directory: held by one run at a time, and recording the settings it ran
with, so `--resume` continues only the run it would continue.

- A lock (`.lock`, an flock that the OS drops when the process dies, even on kill -9) refuses
  a second run in the same directory.
- `config.json` holds the settings. `--resume` compares them and refuses a change that would
  alter what the checkpoints mean (the model, the adapter, the data, the optimizer), naming
  the keys, before anything is touched; `train.steps`, checkpointing, the mesh, the
  processes and the eval split may change.
- A fresh run (no `--resume`) replaces an earlier run in the directory: its checkpoints,
  metrics, adapter and eval results are removed first, so re-running a notebook cell starts
  over cleanly and never leaves two runs' outputs side by side.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any

from lora_jax.files import write_text
from lora_jax.settings import RunConfig

CONFIG = "config.json"
# Settings a resumed run may change: they do not change what a checkpoint holds or means.
RESUMABLE = ("train.steps", "checkpoint.", "mesh.", "distributed.", "data.eval", "output_dir")
# What a run leaves in its directory; a fresh run removes an earlier run's first, so its own
# outputs are never mixed with another run's (TensorBoard's events are purged by the writer).
OUTPUTS = ("checkpoints", "metrics.jsonl", "adapter", "eval.json", "loss.png")


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and not key.endswith("_pattern"):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) of each setting that differs and that a resumed run may
    not change."""
    old, new = _flat(before), _flat(after)
    keys = sorted(set(old) | set(new))
    return [(k, old.get(k), new.get(k)) for k in keys
            if old.get(k) != new.get(k) and not k.startswith(RESUMABLE)]  # fmt: skip


class RunDir:
    """The output directory of one run (process 0 holds it; the others only read)."""

    def __init__(self, settings: RunConfig, resume: bool, main: bool):
        self.path, self.lock = Path(settings.output_dir), None
        if not main:
            return
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"output_dir {self.path} is a file, not a directory.")
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock = open(self.path / ".lock", "a+")  # noqa: SIM115 (held for the run)
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.lock.seek(0)
            holder = self.lock.read().strip() or "another process"
            self.lock.close()
            raise ValueError(f"output_dir {self.path} is in use by another run ({holder}); wait "
                             "for it to end, or choose another output_dir.") from None  # fmt: skip
        self.lock.seek(0)
        self.lock.truncate()
        self.lock.write(f"pid {os.getpid()}")
        self.lock.flush()
        record, settings_dict = self.path / CONFIG, settings.to_dict()
        if resume and record.exists():
            before = json.loads(record.read_text())
            if differences := changed(before, settings_dict):
                self.close()
                diffs = ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in differences[:6])
                raise ValueError(f"--resume: {record} records other settings ({diffs}); resume "
                                 "with those, or start fresh (without --resume, or in another "
                                 "output_dir).")  # fmt: skip
        if not resume:  # a fresh run replaces what an earlier one left
            for name in OUTPUTS:
                earlier = self.path / name
                if earlier.is_dir():
                    shutil.rmtree(earlier)
                else:
                    earlier.unlink(missing_ok=True)
        write_text(record, json.dumps(settings_dict, indent=1, sort_keys=True))

    def close(self) -> None:
        """Releases the directory for the next run."""
        if self.lock is not None:
            self.lock.close()
            self.lock = None
