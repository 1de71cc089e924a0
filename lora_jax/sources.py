"""Where a split's rows come from, read one at a time by index: a JSONL file (through an index
of line offsets), an Arrow file (memory-mapped), a Parquet file (through an Arrow copy), a
prepared TFDS split, or rows in memory. What is built (an index, a conversion) is built once
per version of the file and kept in the cache directory, so memory and the time to the first
row do not grow with the number of rows. A source knows nothing of tasks or tokens: a row is
a dict, and `where` names its file and row for every error about it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from lora_jax import files
from lora_jax.files import is_remote

_RECORD = np.dtype([("start", "<i8"), ("end", "<i8"), ("line", "<i8")])  # one per row
_CHUNK = 1 << 22  # bytes read at a time while indexing (peak memory: a few times this)


class BadRow(ValueError):
    """A row that cannot be read, lacks a field or has a value of the wrong type; the
    message starts with the file and the row."""


class Rows(Protocol):
    """Rows read by index: what a split is, whatever its file format."""

    def __len__(self) -> int: ...

    def read(self, index: int) -> tuple[dict[str, Any], str]:
        """(row, where): the row and a place that names it ("train.jsonl:17")."""
        ...


def version_of(rows: Rows, sample: int = 64) -> dict[str, Any]:
    """What a resumed run checks its rows against: their count (a row added or removed
    moves every later one) and a hash of `sample` rows spread over them (a row replaced is
    seen where the sample reads it). Any format alike; a few reads, not the whole file."""
    count, digest = len(rows), hashlib.sha256()
    picks = {i * (count - 1) // max(sample - 1, 1) for i in range(sample)} if count else set()
    for index in sorted(picks):
        try:
            row = json.dumps(rows.read(index)[0], sort_keys=True, default=str)
        except BadRow as err:  # hashed as it reads now: a later fix shows as a change
            row = str(err)
        digest.update(row.encode())
    return {"rows": count, "sample": digest.hexdigest()[:16]}


CACHE = "LORA_JAX_CACHE"  # the variable naming the cache folder


def cache_dir() -> Path:
    """Where indexes and conversions of data files are kept: $LORA_JAX_CACHE, else
    ~/.cache/lora_jax."""
    return Path(os.environ.get(CACHE) or Path.home() / ".cache" / "lora_jax")


def _cached(path: Path, kind: str, suffix: str, build: Callable[[Any, Path], None]) -> Path:
    """The file `build(path, target)` makes from `path` (an index, a conversion, a bucket
    object's copy), kept in the cache under a name from the path and its version (size and
    mtime; an object's generation), so it is built once per version of the file; in this
    machine's temporary directory when the cache is read-only. Written whole: several
    processes may build the same file, each writes its own and renames it."""
    key = f"{_version(path)}\0v1".encode()
    name = f"{hashlib.sha256(key).hexdigest()[:32]}{suffix}"
    for folder in (cache_dir() / kind, Path(tempfile.gettempdir()) / f"lora_jax-{os.getuid()}"):
        target = folder / name
        if target.is_file():
            return target
        partial = target.with_name(f"{name}.{os.getpid()}.partial")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            partial.touch()
        except OSError as err:
            if os.environ.get(CACHE) and folder == cache_dir() / kind:  # the user's choice
                why = f"{type(err).__name__}: {err.strerror or err}"
                raise OSError(f"{CACHE}={os.environ[CACHE]}: cannot keep {path}'s {kind} "
                              f"there ({why}).") from None  # fmt: skip
            continue  # the default cache unusable (read-only): the temporary directory
        try:
            build(path, partial)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        return target
    raise PermissionError(f"{path}: neither {cache_dir()} nor {tempfile.gettempdir()} is "
                          "writable (set LORA_JAX_CACHE).")  # fmt: skip


def _version(file: Any) -> str:
    """What changes when a file does: a local file's path, size and mtime; a bucket object's
    URL, size and generation (or ETag)."""
    if not is_remote(file):
        stat = os.stat(file)
        return f"{Path(file).resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    fs, name = files.client(file)
    info = fs.info(name)
    return f"{file}\0{info.get('size')}\0{info.get('generation') or info.get('ETag')}"


def local(file: Any) -> Path:
    """A data file as a local path: a bucket's object fetched into the cache once per
    version (rows are then read in place, not a request each); a local file as it is."""
    if not is_remote(file):
        return Path(file)
    return _cached(file, "objects", file.suffix, files.download)


class JsonlRows:
    """A JSONL file's rows by index, through an index of (start, end, line) of every
    non-blank line. The index lives in a file of its own (24 bytes a row, read with
    `pread`, never loaded), so it costs no memory; it is rebuilt when the data file changes.
    Picklable: each process (grain worker) opens the files itself."""

    def __init__(self, source: str | os.PathLike):
        self.name = files.path(source)  # what errors name: the file or the bucket's object
        if not self.name.is_file():
            raise FileNotFoundError(f"data file {self.name} does not exist.")
        self.path = local(self.name)
        self.index = _cached(self.path, "jsonl-index", ".idx", _write_index)
        self.size = self.index.stat().st_size // _RECORD.itemsize
        if not self.size:
            raise ValueError(f"{self.name}: no rows.")
        self._files: tuple[int, int, int] | None = None  # (pid, data fd, index fd)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.size

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_files", "_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _files=None, _lock=threading.Lock())

    def _fds(self) -> tuple[int, int]:
        """This process's open data and index files (opened once, by the first reader, and
        closed when this object goes, or at exit: a finalizer, which runs before shutdown)."""
        with self._lock:
            if self._files is None or self._files[0] != os.getpid():
                fds = os.open(self.path, os.O_RDONLY), os.open(self.index, os.O_RDONLY)
                weakref.finalize(self, _close, *fds)
                self._files = (os.getpid(), *fds)
            return self._files[1], self._files[2]

    def read(self, index: int) -> tuple[dict[str, Any], str]:
        data, idx = self._fds()
        size = _RECORD.itemsize
        start, end, line = np.frombuffer(os.pread(idx, size, index * size), _RECORD)[0].tolist()
        where = f"{self.name}:{line}"
        raw = os.pread(data, end - start, start)
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise BadRow(f"{where}: not UTF-8 text ({err.reason} at byte {err.start}).") from None
        except json.JSONDecodeError as err:
            raise BadRow(f"{where}: not a JSON object ({err.msg}).") from None
        if not isinstance(row, dict):
            raise BadRow(f"{where}: a JSON {type(row).__name__}, not an object.")
        return row, where


def _close(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


def _write_index(path: Path, target: Path) -> None:
    """The (start, end, line) records of `path`'s non-blank lines, written to `target`."""
    with path.open("rb") as source, target.open("wb") as out, \
            tqdm(total=path.stat().st_size, unit="B", unit_scale=True, delay=1, leave=False,
                 desc=f"indexing {path.name}") as bar:  # fmt: skip
        offset, line, rest = 0, 1, b""
        while True:
            chunk = source.read(_CHUNK)
            text = rest + chunk
            if chunk:  # complete lines only; the rest waits for the next chunk
                cut = text.rfind(b"\n") + 1
                text, rest = text[:cut], text[cut:]
            ends = np.flatnonzero(np.frombuffer(text, np.uint8) == 10)
            if not chunk and text:  # a last line without a newline
                ends = np.append(ends, len(text))
            starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)[: len(ends)]
            lines = line + np.arange(len(ends))
            keep = np.ones(len(ends), bool)  # blank lines skipped (only short ones can be)
            for i in np.flatnonzero(ends - starts <= 8):
                keep[i] = bool(text[starts[i] : ends[i]].strip())
            records = np.empty(int(keep.sum()), _RECORD)
            records["start"], records["end"] = starts[keep] + offset, ends[keep] + offset
            records["line"] = lines[keep]
            out.write(records.tobytes())
            offset, line = offset + len(text), line + len(ends)
            bar.update(len(chunk))
            if not chunk:
                break


_ARROW_SUFFIXES = (".arrow", ".parquet")


class ArrowRows:
    """Rows of an Arrow or Parquet file, or of a directory of them (shards in name order, as
    `datasets.save_to_disk` and the hub's Parquet exports hold a split). Arrow files (IPC
    stream or file format) are memory-mapped and read in place; a Parquet file is converted
    once to an Arrow file in the cache (a bar while it is), since a shuffled read of Parquet
    would decode a whole row group for each row. Picklable, like `JsonlRows`."""

    def __init__(self, source: str | os.PathLike):
        self.path = files.path(source)
        if not self.path.exists():
            raise FileNotFoundError(f"data file {self.path} does not exist.")
        _pyarrow(self.path)
        self.shards = ([p for p in sorted(self.path.iterdir()) if p.suffix in _ARROW_SUFFIXES]
                       if self.path.is_dir() else [self.path])  # fmt: skip
        if not self.shards:
            raise FileNotFoundError(f"{self.path}: a directory with no .arrow or .parquet files.")
        self.files = [_cached(local(p), "parquet-as-arrow", ".arrow", _parquet_to_arrow)
                      if p.suffix == ".parquet" else local(p) for p in self.shards]  # fmt: skip
        self._tables: tuple[int, list[Any]] | None = None  # (pid, one table a shard)
        self._lock = threading.Lock()
        self.ends = np.cumsum([t.num_rows for t in self._open()])
        if not self.ends[-1]:
            raise ValueError(f"{self.path}: no rows.")

    def __len__(self) -> int:
        return int(self.ends[-1])

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_tables", "_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _tables=None, _lock=threading.Lock())

    def _open(self) -> list[Any]:
        """This process's tables, memory-mapped (opened once, by the first reader)."""
        with self._lock:
            if self._tables is None or self._tables[0] != os.getpid():
                pairs = zip(self.files, self.shards, strict=True)
                self._tables = (os.getpid(), [_read_arrow(f, shown) for f, shown in pairs])
            return self._tables[1]

    def read(self, index: int) -> tuple[dict[str, Any], str]:
        shard = int(np.searchsorted(self.ends, index, side="right"))
        row = index - (int(self.ends[shard - 1]) if shard else 0)
        table = self._open()[shard]
        return table.slice(row, 1).to_pylist()[0], f"{self.shards[shard]}: row {row + 1}"


def _pyarrow(path: Path) -> Any:
    try:
        import pyarrow
    except ImportError:
        raise ImportError(f"{path}: Arrow and Parquet files need pyarrow: pip install "
                          "'lora_jax[arrow]'.") from None  # fmt: skip
    return pyarrow


def _read_arrow(path: Path, shown: Path) -> Any:
    """An Arrow IPC file (stream or file format) as a table, memory-mapped, not read."""
    pa = _pyarrow(path)
    for open_ in (pa.ipc.open_stream, pa.ipc.open_file):
        try:
            return open_(pa.memory_map(str(path))).read_all()
        except pa.ArrowInvalid:
            continue
    raise ValueError(f"{shown}: not an Arrow IPC file (stream or file format).")


def _parquet_to_arrow(path: Path, target: Path) -> None:
    """A Parquet file rewritten as an Arrow IPC stream, a few thousand rows at a time."""
    pa = _pyarrow(path)
    from pyarrow import parquet

    try:
        source = parquet.ParquetFile(path)
        with pa.OSFile(str(target), "wb") as sink, \
                pa.ipc.new_stream(sink, source.schema_arrow) as out, \
                tqdm(total=source.metadata.num_rows, unit=" rows", delay=1, leave=False,
                     desc=f"converting {path.name}") as bar:  # fmt: skip
            for batch in source.iter_batches(batch_size=4096):
                out.write_batch(batch)
                bar.update(batch.num_rows)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise ValueError(f"{path}: not a readable Parquet file ({err}).") from None


class TfdsRows:
    """A prepared TFDS split by index (`tfds.data_source`: ArrayRecord files, random
    access), from $TFDS_DATA_DIR or ~/tensorflow_datasets. Nothing is downloaded: a pod's
    hosts would each fetch the set; prepare it once with `tfds build`."""

    def __init__(self, spec: str):
        name, _, split = spec[len("tfds:") :].partition(":")
        self.spec, split = spec, split or "train"
        try:
            import tensorflow_datasets as tfds
        except ImportError:
            raise ImportError(f"'{spec}' needs tensorflow-datasets: pip install "
                              "'lora_jax[tfds]'.") from None  # fmt: skip
        absl, level = logging.getLogger("absl"), logging.getLogger("absl").level
        absl.setLevel(logging.ERROR)  # tfds's warning of a folder it fails to read: ours below
        try:
            self.source = tfds.data_source(name, split=split, download=False)
        except Exception as err:  # tfds raises many kinds; all mean "not available here"
            why = str(err).strip().splitlines()[0] if str(err).strip() else ""  # not its list
            raise OSError(f"{spec}: split {split!r} could not be loaded ({type(err).__name__}: "
                          f"{why}) from {tfds.core.constants.DATA_DIR}. Prepare it once, with "
                          f"network: `tfds build {name} --file_format=array_record`, or use a "
                          "JSONL file.") from err  # fmt: skip
        finally:
            absl.setLevel(level)

    def __len__(self) -> int:
        return len(self.source)

    def read(self, index: int) -> tuple[dict[str, Any], str]:
        decode = lambda v: v.decode() if isinstance(v, bytes) else np.asarray(v).item()  # noqa: E731
        row = {k: decode(v) for k, v in self.source[index].items()}
        return row, f"{self.spec}: row {index + 1}"


class ListedRows:
    """Rows already in memory, named by their number."""

    def __init__(self, rows: Sequence[Mapping[str, Any]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, index: int) -> tuple[dict[str, Any], str]:
        return dict(self.rows[index]), f"row {index + 1}"


def open_rows(source: str | Path) -> Rows:
    """The rows of a split: a JSONL file; an Arrow or Parquet file, or a directory of them;
    or a TFDS split ("tfds:name[/config][:split]", e.g. "tfds:glue/sst2:validation")."""
    if isinstance(source, str) and source.startswith("tfds:"):
        return TfdsRows(source)
    where = files.path(source)
    if where.suffix in _ARROW_SUFFIXES or where.is_dir():
        return ArrowRows(where)
    return JsonlRows(where)


def read_rows(source: str | Path, fields: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Every row of a small split as a list (a notebook's prompts, a run's metrics.jsonl),
    each checked to hold `fields`; training streams instead (`train_stream`)."""
    rows, out = open_rows(source), []
    for index in range(len(rows)):
        row, where = rows.read(index)
        if missing := [f for f in fields if f not in row]:
            raise BadRow(f"{where}: no field {missing[0]!r} (the row has {sorted(row)}).")
        out.append(row)
    return out
