"""A run's output directory: held by one run at a time, and recording the settings it ran
with, so `--resume` continues only the run it would continue.

- A lock (`.lock`) refuses a second run in the same directory: locally an flock, which the
  OS drops when the process dies, even on kill -9; in a bucket an object created only where
  none is, removed when the run ends.
- `config.json` holds the settings. `--resume` compares them and refuses a change that would
  alter what the checkpoints mean (the model, the adapter, the data, the optimizer), naming
  the keys, before anything is touched; `train.steps`, checkpointing, the mesh, the
  processes and the eval split may change.
- Nothing is changed until the run is sure to start (`begin`, once its settings, data and
  model are checked): a refused run leaves the directory as it found it, and a directory it
  had to create is removed again.
- A fresh run (no `--resume`) replaces an earlier run in the directory: its checkpoints,
  metrics, adapter, eval results and settings are moved aside (`.replaced`), so re-running a
  notebook cell starts over cleanly and never leaves two runs' outputs side by side. It
  clears only a directory a run owns (one holding a run's `config.json`, or empty): other
  files are never removed.
- A resumed run moves the earlier end-of-run outputs (adapter, eval results, loss curve)
  aside before it trains on, so they never sit beside newer checkpoints; it writes them
  again when it finishes.
- What was moved aside is dropped only once the new run has something to replace it with
  (a checkpoint of its own, or its adapter); a run that stops before that (a refusal found
  late, a failure, Ctrl-C or SIGTERM during setup) puts it back when it ends, and so does
  the next run where a process was killed outright in between.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import socket
import warnings
from collections.abc import Callable
from typing import Any

import jax
from etils import epath

from lora_jax import files, hosts
from lora_jax.files import is_remote, read_json, write_text
from lora_jax.settings import RunConfig

CONFIG = "config.json"
# Settings a resumed run may change: they do not change what a checkpoint holds or means.
RESUMABLE = ("train.steps", "checkpoint.", "mesh.", "distributed.", "data.eval", "output_dir",
             "data_version")  # fmt: skip
DATA_VERSION = "data_version"  # the record's note of the training rows (`check_data`)
# What a run leaves in its directory; a fresh run moves an earlier run's aside first, so its
# own outputs are never mixed with another run's (a resumed run's TensorBoard events past its
# step are purged by the writer).
OUTPUTS = ("checkpoints", "metrics.jsonl", "tensorboard", "adapter", "eval.json", "loss.png")
FINAL = ("adapter", "eval.json", "loss.png")  # written when a run finishes
LOCK = ".lock"
ASIDE = ".replaced"  # an earlier run's outputs, kept until this run has its own
BEFORE = "steps.json"  # in ASIDE: the checkpoints' steps when they were moved aside
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
    not change. A key the record lacks (a setting added since it was written) counts as its
    default, which is what that run ran with."""
    old, new = _dotted(before), _dotted(after)
    old = {**{k: v for k, v in _dotted(RunConfig().to_dict()).items() if k not in old}, **old}
    keys = sorted(set(old) | set(new))
    return [(k, old.get(k), new.get(k)) for k in keys
            if old.get(k) != new.get(k) and not k.startswith(RESUMABLE)]  # fmt: skip


class RunDir:
    """The output directory of one run (process 0 holds it; the others only read)."""

    def __init__(self, settings: RunConfig, resume: bool, main: bool):
        self.path, self.lock, self.resume = files.path(settings.output_dir), None, resume
        self.settings, self.created = settings.to_dict(), False
        self.train_file = settings.data.train
        self.replacing: tuple[str, ...] = ()  # what `begin` moves aside for this run's own
        self.aside = False  # whether it moved anything
        self.data_version: dict[str, Any] | None = None  # the training rows' (`check_data`)
        if not main:
            return
        try:
            self._hold()
        except OSError as err:  # the store's own errors: no permission, no answer
            with contextlib.suppress(OSError):
                self.close()
            raise ValueError(
                f"output_dir {self.path}: cannot use it ({files.failure(err)})."
            ) from None

    def _hold(self) -> None:
        """Checks the directory (a run's or none), locks it, and checks a resumed run's
        settings against those it records."""
        resume = self.resume
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"output_dir {self.path} is a file, not a directory.")
        record = self.path / CONFIG
        if resume and not record.exists():
            raise ValueError(f"--resume: output_dir {self.path} holds no run to resume (no "
                             f"{CONFIG}); run without --resume to start one.")  # fmt: skip
        if foreign := _foreign(self.path):
            raise ValueError(f"output_dir {self.path} holds files no lora_jax run wrote "
                             f"({', '.join(foreign[:4])}); choose a new or empty "
                             "directory.")  # fmt: skip
        self.created = not self.path.exists()
        # Which run holds it, told apart from a run of the same pid on another host.
        holder = f"pid {os.getpid()} on {socket.gethostname()} ({secrets.token_hex(6)})"
        self.lock = (ObjectLock if is_remote(self.path) else FileLock)(self.path / LOCK, holder)
        # What a run killed outright (kill -9, the OOM killer) left aside goes back before
        # its record is read: that run's record is not the one a --resume continues.
        self._settle(())
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
                "place they all see: a bucket (output_dir=gs://...) or a shared mount."
            )

    def _lock_text(self) -> str:
        """What the lock file says here (empty where there is none)."""
        return _text(self.path / LOCK)

    def check_data(
        self, version: dict[str, Any], log: Callable[[str], None], timeout_s: float
    ) -> None:
        """A resumed run's training rows against those its run began with
        (`sources.version_of`), by process 0 (the record is its to read: it rewrites it in
        `begin`), its refusal raised on every process. Rows added or removed are refused (a
        checkpoint's place in the data, a row index, would mean other rows); the same count
        with other contents (a bad row fixed, rows replaced) is said and resumed, each row
        read as it is now."""
        self.data_version, refusal = version, ""
        if self.lock is not None:
            try:
                refusal = self._data_refusal(version, log)
            except (ValueError, OSError) as err:  # an unreadable record: said on every process
                refusal = str(err)
        refusal = hosts.from_process_0(refusal, "process 0 checked the training rows", timeout_s)
        if refusal:
            raise ValueError(refusal if self.lock is not None else f"process 0: {refusal}")

    def _data_refusal(self, version: dict[str, Any], log: Callable[[str], None]) -> str:
        """`check_data`'s refusal (empty where there is none), on process 0."""
        record = self.path / CONFIG
        began = _record(record).get(DATA_VERSION) if self.resume and record.exists() else None
        if began is None or began == version:
            return ""
        if began["rows"] != version["rows"]:
            return (f"--resume: {self.train_file} has {version['rows']} rows, the run began "
                    f"on {began['rows']}: a checkpoint's place in it would mean other rows "
                    "now. Restore the file, or start fresh (without --resume, or in another "
                    "output_dir).")  # fmt: skip
        log(f"--resume: {self.train_file} changed since the run began (the same "
            f"{version['rows']} rows, other contents): each row is read as it is now, from "
            "the same place in the data.")  # fmt: skip
        return ""

    def begin(self) -> None:
        """The run is sure to start: a fresh run moves an earlier run's outputs aside, a
        resumed one its end-of-run outputs (`_settle` drops or restores them at the end);
        the settings and the training rows' version are recorded."""
        if self.lock is None:
            return
        self.replacing = (*FINAL, CONFIG) if self.resume else (*OUTPUTS, CONFIG)
        aside = self.path / ASIDE
        if earlier := [n for n in self.replacing if (self.path / n).exists()]:
            # The checkpoints there now, first: what this run adds to them is its own, even
            # when a later run has to tell (this process killed outright).
            aside.mkdir(parents=True, exist_ok=True)
            write_text(aside / BEFORE, json.dumps(sorted(_committed(self.path))))
            self.aside = True
        for name in earlier:
            files.move(self.path / name, aside / name)
        record = {**self.settings, DATA_VERSION: self.data_version}
        write_text(self.path / CONFIG, json.dumps(record, indent=1, sort_keys=True))
        self.created = False

    def _settle(self, replacing: tuple[str, ...]) -> None:
        """Drops the earlier outputs moved aside where this run has its own (a checkpoint
        of a step it wrote, or its adapter), else puts them back in place of `replacing`
        (this run's partial ones)."""
        aside = self.path / ASIDE
        if not aside.exists():
            return
        before = set(json.loads(_text(aside / BEFORE) or "[]"))
        if _committed(self.path) - before or (self.path / "adapter").exists():
            aside.rmtree()
            return
        for name in {*replacing, *(p.name for p in aside.iterdir())} - {BEFORE}:
            if (partial := self.path / name).is_dir():
                partial.rmtree()
            elif partial.exists():
                partial.unlink()
            if (earlier := aside / name).exists():
                files.move(earlier, partial)
        aside.rmtree()

    def close(self) -> None:
        """Releases the directory for the next run; one this run created and never began
        in is removed."""
        if self.lock is not None:
            try:
                if self.aside:  # what `begin` moved aside is dropped or put back
                    self._settle(self.replacing)
            except OSError as err:  # the store gone (the run's own error says so): kept
                why = files.failure(err)
                warnings.warn(f"{self.path / ASIDE} is left as it is ({why}); the next run "
                              "there puts it back or drops it.", stacklevel=2)  # fmt: skip
            self.lock.release()
            self.lock = None
            if self.created and not is_remote(self.path) and [
                p.name for p in self.path.iterdir()
            ] == [LOCK]:  # fmt: skip
                (self.path / LOCK).unlink()
                self.path.rmdir()


class FileLock:
    """A local directory's lock: an flock, which the OS drops when the process dies, even on
    kill -9; the file says who holds it."""

    def __init__(self, file: epath.Path, holder: str):
        file.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(file, "a+")  # noqa: SIM115 (held for the run)
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            held = self.handle.read().strip() or "another process"
            self.handle.close()
            raise _in_use(file, held) from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(holder)
        self.handle.flush()

    def release(self) -> None:
        self.handle.close()


class ObjectLock:
    """A bucket folder's lock: an object created only where none is (the store's own
    create-if-absent), saying who holds it; removed when the run ends. One left by an ended
    process of this host is taken over; one of another host that vanished without a SIGTERM
    stays: the refusal says how to remove it."""

    def __init__(self, file: epath.Path, holder: str):
        self.file, self.holder = file, holder
        held = _text(file)
        if held and _gone(held):  # left by a process of this host that has ended
            file.unlink()
            held = ""
        if not held:
            try:
                if not files.create(file, holder.encode()):  # a race lost: held
                    held = _text(file) or "another process"
            except Exception as err:  # the store's own errors: no bucket, no permission, no server
                raise _unwritable(file, err) from None
        if held:
            raise _in_use(file, held, f" If that run is gone (its host lost without a "
                                      f"SIGTERM), remove {file}.")  # fmt: skip

    def release(self) -> None:
        if _text(self.file) == self.holder:
            self.file.unlink()


def _unwritable(lock: epath.Path, err: Exception) -> ValueError:
    """The refusal of a bucket folder the lock could not be written in: the bucket missing
    (a refused upload may answer "not found" too, so the bucket itself is asked), or the
    store's own error (no permission, no answer)."""
    fs, name = files.client(lock)
    bucket = name.split("/")[0]
    with contextlib.suppress(Exception):  # the same store failing again: its first error
        if isinstance(err, FileNotFoundError) and not fs.exists(bucket):
            return ValueError(f"output_dir {lock.parent}: the bucket {bucket} does not exist "
                              "(or these credentials cannot see it).")  # fmt: skip
    return ValueError(f"output_dir {lock.parent}: cannot write there ({files.failure(err)}).")


def _in_use(lock: epath.Path, held: str, more: str = "") -> ValueError:
    """The refusal of a run whose directory another run's lock holds."""
    return ValueError(f"output_dir {lock.parent} is in use by another run ({held}); wait for "
                      f"it to end, or choose another output_dir.{more}")  # fmt: skip


def _gone(holder: str) -> bool:
    """Whether a lock's holder was a process of this host that no longer runs (one that lost
    its bucket mid-run could not remove its lock)."""
    found = re.fullmatch(r"pid (\d+) on (\S+) \(\w+\)", holder.strip())
    if not found or found[2] != socket.gethostname():
        return False
    try:
        os.kill(int(found[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's: alive
        pass
    return False


def _text(file: epath.Path) -> str:
    """What a lock says (empty where there is none)."""
    try:
        return file.read_text()
    except OSError:
        return ""


def _record(path: epath.Path) -> dict[str, Any]:
    """A run directory's settings record, or a ValueError naming the file."""
    record = read_json(path)
    if not set(record) >= RECORD_KEYS:
        raise ValueError(f"{path}: not a run's settings record (no model, lora, data, train).")
    if bad := sorted(k for k in RECORD_KEYS if not isinstance(record[k], dict)):
        raise ValueError(f"{path}: not a run's settings record ({bad[0]} is not an object).")
    return record


def _foreign(path: epath.Path) -> list[str]:
    """The entries of an existing directory that show it is not a run's: anything, unless a
    run's settings record is there (a damaged record is a ValueError naming it)."""
    if not path.is_dir():
        return []
    record = path / CONFIG
    if record.is_file() and set(read_json(record)) >= RECORD_KEYS:
        return []
    return sorted(p.name for p in path.iterdir() if p.name not in (LOCK, ASIDE))


def _committed(path: epath.Path) -> set[int]:
    """The steps of a run directory's whole checkpoints (orbax's: a step's folder appears
    under its number once committed locally; in a bucket, once it holds its marker)."""
    folder = path / "checkpoints"
    if not folder.is_dir():
        return set()
    return {int(p.name) for p in folder.iterdir() if p.name.isdigit() and
            (not is_remote(p) or (p / "commit_success.txt").exists())}  # fmt: skip
