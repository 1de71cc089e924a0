"""A run's output directory: held by one run at a time, and recording the settings it ran
with, so `--resume` continues only the run it would continue.

- A lock (`.lock`, an flock that the OS drops when the process dies, even on kill -9) refuses
  a second run in the same directory.
- `config.json` holds the settings. `--resume` compares them and refuses a change that would
  alter what the checkpoints mean (the model, the adapter, the data, the optimizer), naming
  the keys, before anything is touched; `train.steps`, checkpointing, the mesh, the
  processes and the eval split may change.
- Nothing is changed until the run is sure to start (`begin`, once its settings, data and
  model are checked): a refused run leaves the directory as it found it, and a directory it
  had to create is removed again.
- A fresh run (no `--resume`) replaces an earlier run in the directory: its checkpoints,
  metrics, adapter and eval results are removed, so re-running a notebook cell starts over
  cleanly and never leaves two runs' outputs side by side. It clears only a directory a run
  owns (one holding a run's `config.json`, or empty): other files are never removed.
- A resumed run removes the earlier end-of-run outputs (adapter, eval results, loss curve)
  before it trains on, so they never sit beside newer checkpoints; it writes them again
  when it finishes.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import socket
from pathlib import Path
from typing import Any

import jax

from lora_jax import hosts
from lora_jax.files import read_json, write_text
from lora_jax.settings import RunConfig

CONFIG = "config.json"
# Settings a resumed run may change: they do not change what a checkpoint holds or means.
RESUMABLE = ("train.steps", "checkpoint.", "mesh.", "distributed.", "data.eval", "output_dir")
# What a run leaves in its directory; a fresh run removes an earlier run's first, so its own
# outputs are never mixed with another run's (TensorBoard's events are purged by the writer).
OUTPUTS = ("checkpoints", "metrics.jsonl", "adapter", "eval.json", "loss.png")
FINAL = ("adapter", "eval.json", "loss.png")  # written when a run finishes
LOCK = ".lock"
RECORD_KEYS = {"model", "lora", "data", "train"}  # what makes a config.json a run's record


def _dotted(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A settings tree's values by dotted key ("train.steps"); a pattern dict is one value."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and not key.endswith("_pattern"):
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) of each setting that differs and that a resumed run may
    not change."""
    old, new = _dotted(before), _dotted(after)
    keys = sorted(set(old) | set(new))
    return [(k, old.get(k), new.get(k)) for k in keys
            if old.get(k) != new.get(k) and not k.startswith(RESUMABLE)]  # fmt: skip


class RunDir:
    """The output directory of one run (process 0 holds it; the others only read)."""

    def __init__(self, settings: RunConfig, resume: bool, main: bool):
        self.path, self.lock, self.resume = Path(settings.output_dir), None, resume
        self.settings, self.created = settings.to_dict(), False
        if not main:
            return
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"output_dir {self.path} is a file, not a directory.")
        record = self.path / CONFIG
        if foreign := _foreign(self.path):
            raise ValueError(f"output_dir {self.path} holds files no lora_jax run wrote "
                             f"({', '.join(foreign[:4])}); choose a new or empty "
                             "directory.")  # fmt: skip
        self.created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock = open(self.path / LOCK, "a+")  # noqa: SIM115 (held for the run)
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.lock.seek(0)
            holder = self.lock.read().strip() or "another process"
            self.lock.close()
            self.lock = None
            raise ValueError(f"output_dir {self.path} is in use by another run ({holder}); wait "
                             "for it to end, or choose another output_dir.") from None  # fmt: skip
        self.lock.seek(0)
        self.lock.truncate()
        # Which run holds it, told apart from a run of the same pid on another host.
        self.lock.write(f"pid {os.getpid()} on {socket.gethostname()} ({secrets.token_hex(6)})")
        self.lock.flush()
        differences = changed(_record(record), self.settings) if resume and record.exists() else []
        if differences:
            self.close()
            diffs = ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in differences[:6])
            raise ValueError(f"--resume: {record} records other settings ({diffs}); resume "
                             "with those, or start fresh (without --resume, or in another "
                             "output_dir).")  # fmt: skip

    def check_shared(self, timeout_s: float) -> None:
        """A ValueError on every process unless each sees the lock process 0 holds: the
        processes of a pod run on hosts with their own disks, where each would write its
        checkpoint shards into its own copy of the directory, and orbax would wait for the
        shards to meet forever."""
        if jax.process_count() == 1:
            return
        held = self._lock_text() if self.lock else ""
        held = hosts.from_process_0(held, "process 0 locked the output directory", timeout_s)
        seen = hosts.gather(str(int(self._lock_text() == held)),
                            "the processes looked for process 0's lock", timeout_s)  # fmt: skip
        if blind := [i for i, s in enumerate(seen) if s != "1"]:  # `close` removes what it made
            raise ValueError(
                f"output_dir {self.path} is not one directory the run's processes share: "
                f"process {', '.join(map(str, blind))} cannot see the lock process 0 holds "
                "there (each host of a pod has its own disk). Give every process one "
                "directory they all see: a shared mount (NFS, Filestore, a gcsfuse bucket)."
            )

    def _lock_text(self) -> str:
        """What the lock file says here (empty where there is none)."""
        try:
            return (self.path / LOCK).read_text()
        except OSError:
            return ""

    def begin(self) -> None:
        """The run is sure to start: a fresh run clears an earlier run's outputs, a resumed
        one its end-of-run outputs; the settings are recorded."""
        if self.lock is None:
            return
        for name in FINAL if self.resume else OUTPUTS:
            earlier = self.path / name
            if earlier.is_dir():
                shutil.rmtree(earlier)
            else:
                earlier.unlink(missing_ok=True)
        write_text(self.path / CONFIG, json.dumps(self.settings, indent=1, sort_keys=True))
        self.created = False

    def close(self) -> None:
        """Releases the directory for the next run; one this run created and never began
        in is removed."""
        if self.lock is not None:
            self.lock.close()
            self.lock = None
            if self.created and [p.name for p in self.path.iterdir()] == [LOCK]:
                (self.path / LOCK).unlink()
                self.path.rmdir()


def _record(path: Path) -> dict[str, Any]:
    """A run directory's settings record, or a ValueError naming the file."""
    record = read_json(path)
    if not set(record) >= RECORD_KEYS:
        raise ValueError(f"{path}: not a run's settings record (no model, lora, data, train).")
    return record


def _foreign(path: Path) -> list[str]:
    """The entries of an existing directory that show it is not a run's: anything, unless a
    run's settings record is there (a damaged record is a ValueError naming it)."""
    if not path.is_dir():
        return []
    record = path / CONFIG
    if record.is_file() and set(read_json(record)) >= RECORD_KEYS:
        return []
    return sorted(p.name for p in path.iterdir() if p.name != LOCK)
