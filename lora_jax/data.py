"""Training data: JSONL or TFDS rows -> token arrays -> a seeded, resumable batch iterator.

Which fields a row needs and how it becomes arrays is the task's (`lora_jax.tasks`); this
module reads rows, tokenizes, pads and packs. Everything is encoded up front into numpy
arrays (fine for fine-tuning sets), so the iterator's whole state is (epoch, batch index):
resuming replays exactly.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

Batch = dict[str, np.ndarray]


def read_rows(source: str | Path, fields: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of a JSONL file (`source` a path) or a TFDS split ("tfds:name[/config][:split]",
    e.g. "tfds:glue/sst2:validation"), each checked to hold `fields`; errors name the row."""
    if isinstance(source, str) and source.startswith("tfds:"):
        name, _, split = source[5:].partition(":")
        rows, where = _tfds_rows(name, split or "train"), source
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} does not exist.")
        rows, where = [], str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            reason = f"{err.reason} at byte {err.start}"
            raise ValueError(f"{path}: not UTF-8 text ({reason}).") from None
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not a JSON object ({err.msg}).") from None
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise ValueError(f"{where}: row {n} is {type(row).__name__}, not a JSON object.")
        missing = [f for f in fields if f not in row]
        if missing:
            raise ValueError(
                f"{where}: row {n} has no field {missing[0]!r} (it has {sorted(row)}); set "
                "data.text_field / label_field / response_field, or the template's fields."
            )
    if not rows:
        raise ValueError(f"{where}: no rows.")
    return rows


def _tfds_rows(name: str, split: str) -> list[dict[str, Any]]:
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ImportError(
            f"'tfds:{name}' needs tensorflow-datasets: pip install tensorflow-datasets"
        ) from None
    try:
        dataset = tfds.load(name, split=split)
    except Exception as err:  # tfds raises many kinds; all mean "not available here"
        raise OSError(
            f"tfds:{name} split {split!r} could not be loaded ({type(err).__name__}: {err}). "
            "Offline? Prepare it once with network (`tfds build`) or use a JSONL file."
        ) from err
    decode = lambda v: v.decode() if isinstance(v, bytes) else v.item()  # noqa: E731
    return [{k: decode(v) for k, v in ex.items()} for ex in tfds.as_numpy(dataset)]


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
        # `encode` pads, cuts and masks itself, so the file's settings must not.
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


def packed(examples: list, length: int) -> list[list]:
    """Examples grouped greedily, in order, into rows of at most `length` tokens."""
    rows, used = [], length
    for example in examples:
        if used + len(example[0]) > length:
            rows.append([])
            used = 0
        rows[-1].append(example)
        used += len(example[0])
    return rows


class Batches(Iterator[Batch]):
    """Endless batches of `batch_size` rows, reshuffled each epoch from (seed, epoch).

    `rows` selects this process's part of each global batch (multi-host). `state()` is
    what a checkpoint stores; `restore(state)` continues exactly where it was taken.
    """

    def __init__(self, data: Batch, batch_size: int, seed: int, rows: slice = slice(None)):
        self.data, self.batch_size, self.seed, self.rows = data, batch_size, seed, rows
        self.size = len(next(iter(data.values())))
        if self.size < batch_size:
            raise ValueError(f"{self.size} examples, fewer than one batch of {batch_size}.")
        self.epoch, self.index = 0, 0

    def __next__(self) -> Batch:
        if self.index >= self.size // self.batch_size:  # the incomplete last batch is dropped
            self.epoch, self.index = self.epoch + 1, 0
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
        start = self.index * self.batch_size
        chosen = order[start : start + self.batch_size][self.rows]
        self.index += 1
        return {k: v[chosen] for k, v in self.data.items()}

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: Mapping[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def in_batches(data: Batch, batch_size: int) -> Iterator[tuple[Batch, int]]:
    """Every example once, in order, as (full-size batch, number of real rows): the last
    batch is padded by repeating row 0 so one compiled eval step serves all."""
    size = len(next(iter(data.values())))
    for start in range(0, size, batch_size):
        idx = np.arange(start, start + batch_size)
        real = int(min(batch_size, size - start))
        idx[real:] = 0
        yield {k: v[idx] for k, v in data.items()}, real
