"""Training data, streamed: rows read by index from a JSONL, Arrow or Parquet file (or a
`tfds:` source), checked and encoded by the task (`lora_jax.tasks`), and batched by grain.

No split is ever held whole. A JSONL file is read through an index of line offsets, an
Arrow file memory-mapped, a Parquet file through an Arrow copy; what is built is built once
per version of the file and kept in the cache directory, so memory and the time to the
first step do not grow with the number of rows. Each process reads only its own rows of
every global batch, in an order reshuffled each epoch from (seed, epoch); the iterator's
state goes into the checkpoint, so a resumed run sees the batches an uninterrupted run
would have seen. SFT packs several examples into each row (grain's first-fit packing);
unpacked batches are padded only to their longest row, rounded up to one of a few bucket
lengths, so the step compiles a bounded number of times.
"""

from __future__ import annotations

import hashlib
import json
import os
import string
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import grain
import numpy as np
from grain import experimental as grain_x
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from lora_jax.settings import DataSettings
    from lora_jax.tasks import Task

Batch = dict[str, np.ndarray]
Example = dict[str, np.ndarray]

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


def cache_dir() -> Path:
    """Where indexes and conversions of data files are kept: $LORA_JAX_CACHE, else
    ~/.cache/lora_jax."""
    return Path(os.environ.get("LORA_JAX_CACHE") or Path.home() / ".cache" / "lora_jax")


def _cached(path: Path, kind: str, suffix: str, build: Callable[[Path, Path], None]) -> Path:
    """The file `build(path, target)` makes from `path` (an index, a conversion), kept in the
    cache under a name from the path, size and mtime, so it is built once per version of the
    file; in this machine's temporary directory when the cache is read-only. Written whole:
    several processes may build the same file, each writes its own and renames it."""
    stat = path.stat()
    key = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0v1".encode()
    name = f"{hashlib.sha256(key).hexdigest()[:32]}{suffix}"
    for folder in (cache_dir() / kind, Path(tempfile.gettempdir()) / f"lora_jax-{os.getuid()}"):
        target = folder / name
        if target.is_file():
            return target
        partial = target.with_name(f"{name}.{os.getpid()}.partial")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            partial.touch()
        except PermissionError:  # a read-only cache: the temporary directory instead
            continue
        try:
            build(path, partial)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        return target
    raise PermissionError(f"{path}: neither {cache_dir()} nor {tempfile.gettempdir()} is "
                          "writable (set LORA_JAX_CACHE).")  # fmt: skip


class JsonlRows:
    """A JSONL file's rows by index, through an index of (start, end, line) of every
    non-blank line. The index lives in a file of its own (24 bytes a row, read with
    `pread`, never loaded), so it costs no memory; it is rebuilt when the data file changes.
    Picklable: each process (grain worker) opens the files itself."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(f"data file {self.path} does not exist.")
        self.index = _cached(self.path, "jsonl-index", ".idx", _write_index)
        self.size = self.index.stat().st_size // _RECORD.itemsize
        if not self.size:
            raise ValueError(f"{self.path}: no rows.")
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
        where = f"{self.path}:{line}"
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

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise FileNotFoundError(f"data file {self.path} does not exist.")
        _pyarrow(self.path)
        self.shards = ([p for p in sorted(self.path.iterdir()) if p.suffix in _ARROW_SUFFIXES]
                       if self.path.is_dir() else [self.path])  # fmt: skip
        if not self.shards:
            raise FileNotFoundError(f"{self.path}: a directory with no .arrow or .parquet files.")
        self.files = [_cached(p, "parquet-as-arrow", ".arrow", _parquet_to_arrow)
                      if p.suffix == ".parquet" else p for p in self.shards]  # fmt: skip
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
        try:
            self.source = tfds.data_source(name, split=split, download=False)
        except Exception as err:  # tfds raises many kinds; all mean "not available here"
            why = str(err).strip().splitlines()[0] if str(err).strip() else ""  # not its list
            raise OSError(f"{spec}: split {split!r} could not be loaded ({type(err).__name__}: "
                          f"{why}) from {tfds.core.constants.DATA_DIR}. Prepare it once, with "
                          f"network: `tfds build {name} --file_format=array_record`, or use a "
                          "JSONL file.") from err  # fmt: skip

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
    path = Path(source).expanduser()
    if path.suffix in _ARROW_SUFFIXES or path.is_dir():
        return ArrowRows(path)
    return JsonlRows(path)


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


class Tokenizer:
    """A checkpoint's tokenizer.json (the Rust `tokenizers` library; no transformers)."""

    def __init__(self, directory: str | Path, hf_config: Mapping[str, Any]):
        from tokenizers import Tokenizer as Fast

        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the checkpoint has no tokenizer.json.")
        try:
            self.fast = Fast.from_file(str(path))
        except Exception as err:  # the tokenizers library raises its own plain Exception
            raise ValueError(f"{path}: not a readable tokenizer (truncated or damaged? "
                             f"{err}).") from None  # fmt: skip
        # Some tokenizer.json files pad or cut every encoding (all-MiniLM's: to 128 tokens);
        # the task cuts and `padded` pads, so the file's settings must not.
        self.fast.no_padding()
        self.fast.no_truncation()
        eos = hf_config.get("eos_token_id")
        self.eos = eos[0] if isinstance(eos, list) else eos
        self.pad = hf_config.get("pad_token_id") or 0

    def __call__(self, text: str, special: bool = True) -> list[int]:
        return self.fast.encode(text, add_special_tokens=special).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.fast.decode(list(ids), skip_special_tokens=True)


def pad(seqs: list[list[int]], length: int, value: int) -> np.ndarray:
    """Token lists as one (rows, length) int32 array, cut or filled with `value`."""
    out = np.full((len(seqs), length), value, np.int32)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s[:length]
    return out


def template_fields(template: str) -> list[str]:
    """The row fields a prompt template reads ("{prompt}" -> ["prompt"])."""
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


# ----------------------------------------------------------------------------- examples


class Encode:
    """Row index -> the task's example (1-D token arrays, cut at data.max_length; scalars),
    the row checked first: every field the task reads is there with its type, or `BadRow`
    names the file and the row. Picklable, for grain's worker processes."""

    def __init__(self, rows: Rows, task: Task, tokenizer: Tokenizer, data: DataSettings,
                 classes: int | None):  # fmt: skip
        self.rows, self.task, self.tokenizer, self.data = rows, task, tokenizer, data
        self.classes, self.fields = classes, task.fields(data)

    def __len__(self) -> int:
        return len(self.rows)

    def __call__(self, index: int) -> Example:
        row, where = self.rows.read(int(index))
        missing = [f for f in self.fields if f not in row]
        if missing:
            raise BadRow(f"{where}: no field {missing[0]!r} (the row has {sorted(row)}); set "
                         "data.text_field / label_field / response_field, or the template's "
                         "fields.")  # fmt: skip
        try:
            self.task.check_row(row, where, self.data, self.classes)
        except ValueError as err:
            raise BadRow(str(err)) from None
        return self.task.encode(row, self.tokenizer, self.data)

    def check_first(self, count: int = 256) -> None:
        """The first `count` rows read, checked and encoded: a wrong field name or template
        is refused before anything compiles (later rows are checked as they are read)."""
        for index in range(min(count, len(self))):
            self(index)


def buckets(max_length: int) -> list[int]:
    """The lengths an unpacked batch is padded to: max_length and its halves down to an
    eighth, each rounded up to a multiple of 8."""
    return sorted({min(max_length, -(-max_length // d // 8) * 8 or 8) for d in (1, 2, 4, 8)})


def bucket(longest: int, max_length: int) -> int:
    """The shortest bucket length that holds `longest` tokens."""
    return next(b for b in buckets(max_length) if b >= longest)


class Padded:
    """Examples -> one batch: token arrays padded (input_ids with the pad id, the rest with
    0) to the bucket of the longest, or to `length` when given; scalars stacked."""

    def __init__(self, pad_id: int, max_length: int, length: int | None = None):
        self.pad_id, self.max_length, self.length = pad_id, max_length, length

    def __call__(self, examples: Sequence[Example]) -> Batch:
        longest = max(len(e["input_ids"]) for e in examples)
        length = self.length or bucket(longest, self.max_length)
        batch = {}
        for key in examples[0]:
            if examples[0][key].ndim == 0:
                batch[key] = np.stack([e[key] for e in examples])
            else:
                value = self.pad_id if key == "input_ids" else 0
                batch[key] = pad([e[key] for e in examples], length, value)
        return batch


def widened(batch: Batch, length: int, pad_id: int) -> Batch:
    """`batch` with its token arrays padded on to `length` (processes agree on one length)."""
    out = {}
    for key, v in batch.items():
        extra = length - v.shape[1] if v.ndim == 2 else 0
        fill = pad_id if key == "input_ids" else 0
        out[key] = np.pad(v, ((0, 0), (0, extra)), constant_values=fill) if extra else v
    return out


def _from_packed(bin_: Example) -> Example:
    """grain's packed bin in this project's names: attention_mask holds the segment ids
    (1, 2, ... per example, 0 on padding) and positions restart with each example."""
    return {"input_ids": bin_["input_ids"], "attention_mask": bin_["input_ids_segment_ids"],
            "positions": bin_["input_ids_positions"], "loss_mask": bin_["loss_mask"]}  # fmt: skip


def _packable(example: Example) -> Example:
    return {"input_ids": example["input_ids"], "loss_mask": example["loss_mask"]}


# ----------------------------------------------------------------------------- streams


class Order:
    """This process's k-th example -> the row it reads. The global order is each epoch's
    shuffle (grain's index_shuffle from (seed, epoch): no permutation array, so nothing
    grows with the dataset), cut to whole global batches; process p reads the `rows` slice
    of every global batch of `batch_size`."""

    def __init__(self, size: int, batch_size: int, seed: int, rows: slice = slice(None)):
        if size < batch_size:
            raise ValueError(f"{size} examples, fewer than one batch of {batch_size}.")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start, stop, _ = rows.indices(batch_size)
        self.local = stop - self.start
        self.per_epoch = size // batch_size * batch_size  # the incomplete last batch is dropped

    def __call__(self, k: int) -> int:
        batch, offset = divmod(int(k), self.local)
        epoch, index = divmod(batch * self.batch_size + self.start + offset, self.per_epoch)
        seed = (self.seed + epoch) % 2**32
        return int(grain_x.index_shuffle(index, max_index=self.size - 1, seed=seed, rounds=4))


class Chunk:
    """Chunk b -> the examples of this process's b-th batch of rows (`Order`), encoded and
    joined into one element (`joined`): a worker process hands back one element a batch, not
    one a row. Picklable."""

    def __init__(self, order: Order, encode: Encode):
        self.order, self.encode = order, encode

    def __call__(self, b: int) -> dict[str, Any]:
        start = int(b) * self.order.local
        return joined([self.encode(self.order(k)) for k in range(start, start + self.order.local)])


def joined(examples: Sequence[Example]) -> dict[str, Any]:
    """Examples as one element: token arrays concatenated, scalars stacked, and each
    example's length (`unjoined` splits them again)."""
    first = examples[0]
    return {
        "tokens": {k: np.concatenate([e[k] for e in examples]) for k in first if first[k].ndim},
        "scalars": {k: np.stack([e[k] for e in examples]) for k in first if not first[k].ndim},
        "lengths": np.array([len(e["input_ids"]) for e in examples]),
    }


def unjoined(chunk: Mapping[str, Any]) -> list[Example]:
    """The examples `joined` put together."""
    cuts = np.cumsum(chunk["lengths"])[:-1]
    parts = {k: np.split(v, cuts) for k, v in chunk["tokens"].items()} | chunk["scalars"]
    return [{k: v[i] for k, v in parts.items()} for i in range(len(chunk["lengths"]))]


class _Unjoin(grain_x.FlatMapTransform):
    def __init__(self, fan_out: int):
        self.max_fan_out = fan_out

    def flat_map(self, chunk: Mapping[str, Any]) -> list[Example]:
        return unjoined(chunk)


def packed(examples: grain.IterDataset, bins: int, length: int,
           pad_id: int) -> grain.IterDataset:  # fmt: skip
    """Examples packed first-fit into rows of `length` tokens (grain's packing), `bins` rows
    at a time: each flush of `bins` rows is one batch, so no example crosses batches."""
    return grain_x.FirstFitPackIterDataset(
        examples.map(_packable),
        length_struct={"input_ids": length, "loss_mask": length},
        num_packing_bins=bins,
        shuffle_bins=False,
        padding_struct={"input_ids": pad_id, "loss_mask": 0},
    ).map(_from_packed)


def read_options(threads: int) -> grain.ReadOptions:
    """Threads that read and encode ahead of the step (tokenizers release the GIL)."""
    return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4 * threads)


def train_stream(encode: Encode, batch_size: int, seed: int, rows: slice, pack: bool,
                 workers: int = 0, threads: int = 4) -> grain.IterDataset:  # fmt: skip
    """Endless training batches of this process's `rows` of each global batch (`Order`):
    packed to data.max_length rows (`pack`), else padded to a bucket length. `workers` > 0
    reads and encodes in that many processes. Its iterator's `get_state()` is what a
    checkpoint stores; `set_state` continues exactly there."""
    order = Order(len(encode), batch_size, seed, rows)
    length, pad_id = encode.data.max_length, encode.tokenizer.pad
    chunks = grain.MapDataset.range(2**62).map(Chunk(order, encode))
    stream = chunks.to_iter_dataset(read_options(threads))
    if workers:  # worker w encodes chunks w, w + workers, ...; they come back in order
        from absl import flags  # grain's workers read its flags, which a CLI never parses

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    # Packed and batched here, not in the workers: each would pack its own examples, and the
    # batches would depend on the number of workers.
    if pack:
        examples = grain_x.FlatMapIterDataset(stream, _Unjoin(order.local))
        return packed(examples, order.local, length, pad_id).batch(order.local, drop_remainder=True)
    pad = Padded(pad_id, length)
    return stream.map(lambda chunk: pad(unjoined(chunk)))


def eval_batches(encode: Encode, batch_size: int, rows: slice,
                 threads: int = 4) -> Iterator[tuple[Batch, int]]:  # fmt: skip
    """Every example once, in order, as (this process's rows of a global batch, number of
    real rows in the global batch): the last batch is filled with row 0, its weight 0, so
    one compiled eval step serves all. Each process reads only its own rows."""
    start, stop, _ = rows.indices(batch_size)
    size, local = len(encode), stop - start
    count = -(-size // batch_size)
    where = lambda k: min(k // local * batch_size + start + k % local, size) % size  # noqa: E731
    stream = grain.MapDataset.range(count * local).map(where).map(encode)
    batches = stream.to_iter_dataset(read_options(threads)).batch(
        local, batch_fn=Padded(encode.tokenizer.pad, encode.data.max_length)
    )
    for n, batch in enumerate(batches):
        real = min(batch_size, size - n * batch_size)
        batch["weight"] = (np.arange(start, stop) < real).astype(np.float32)
        yield batch, real


def padding_share(batch: Mapping[str, Any]) -> float:
    """The share of a batch's token positions that hold no token."""
    mask = np.asarray(batch["attention_mask"])
    return float(1 - np.count_nonzero(mask) / mask.size)


def first_batch(encode: Encode, rows: int = 1) -> Batch:
    """The first `rows` examples as a batch (an input the model takes, e.g. for its layouts)."""
    return Padded(encode.tokenizer.pad, encode.data.max_length)([encode(i) for i in range(rows)])


def encoded(rows: Sequence[Mapping[str, Any]], task: Task, tokenizer: Tokenizer,
            data: DataSettings, length: int | None = None) -> Batch:  # fmt: skip
    """Rows already in memory (a notebook's, a test's) as one batch, each checked and
    encoded by `task` and padded to `length` (default: the longest's bucket)."""
    encode = Encode(ListedRows(rows), task, tokenizer, data, None)
    return Padded(tokenizer.pad, data.max_length, length)([encode(i) for i in range(len(rows))])
