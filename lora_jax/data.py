"""Training data: JSONL or TFDS rows -> token arrays -> a seeded, resumable batch iterator.

Two tasks. "classify": a text field and a label field (int, or a string from `labels`).
"sft": a prompt (a template over the row's fields) and a response; only response tokens
count in the loss, and `pack` fills each row with several examples that attend only within
themselves (segment ids in attention_mask, positions restarting per example). Everything
is encoded up front into numpy arrays (fine for fine-tuning sets), so the iterator's whole
state is (epoch, batch index): resuming replays exactly.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # the settings import the model zoo; encode only reads their fields
    from lora_jax.settings import DataSettings

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
        self.fast = Fast.from_file(str(path))
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


def _pad(seqs: list[list[int]], length: int, value: int) -> np.ndarray:
    out = np.full((len(seqs), length), value, np.int32)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s[:length]
    return out


def task_fields(data: DataSettings) -> list[str]:
    """The row fields the task reads: text and label, or the template's fields and the
    response."""
    if data.task == "classify":
        return [data.text_field, data.label_field]
    return [*_template_fields(data.template), data.response_field]


def _template_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def check_rows(
    rows: list[dict[str, Any]], where: str, data: DataSettings, classes: int | None
) -> None:
    """Every value the task reads has its type, nothing coerced: texts are strings, a label
    is a name from data.labels or an int in [0, classes); a template field is not null.
    The error names the file and the row."""
    for n, row in enumerate(rows, 1):
        at = f"{where}: row {n}"
        if data.task == "classify":
            text, label = row[data.text_field], row[data.label_field]
            if not isinstance(text, str):
                raise ValueError(f"{at}: {data.text_field} is {text!r}, not a string.")
            if isinstance(label, str):
                if label not in data.labels:
                    raise ValueError(f"{at}: label {label!r} is not one of data.labels "
                                     f"{list(data.labels)}.")  # fmt: skip
            elif isinstance(label, bool) or not isinstance(label, int):
                raise ValueError(f"{at}: label {label!r} is neither a class index (int) nor a "
                                 "name from data.labels.")  # fmt: skip
            elif label < 0 or (classes is not None and label >= classes):
                raise ValueError(f"{at}: label {label} is outside the {classes} classes "
                                 f"[0, {classes}).")  # fmt: skip
            continue
        for field in _template_fields(data.template):
            if row[field] is None:
                raise ValueError(f"{at}: {field} is null.")
        if not isinstance(row[data.response_field], str):
            raise ValueError(f"{at}: {data.response_field} is {row[data.response_field]!r}, "
                             "not a string.")  # fmt: skip


def batch_shapes(data: DataSettings, rows: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{name: (shape, dtype)} of the arrays `encode` gives `rows` rows of, for a step
    compiled before any data is read (`lora-jax compile`)."""
    tokens = ((rows, data.max_length), np.dtype(np.int32))
    if data.task == "classify":
        return {"input_ids": tokens, "attention_mask": tokens,
                "labels": ((rows,), np.dtype(np.int32))}  # fmt: skip
    return dict.fromkeys(("input_ids", "attention_mask", "positions", "loss_mask"), tokens)


def encode(rows: list[dict[str, Any]], tokenizer: Tokenizer, data: DataSettings) -> Batch:
    """Token arrays for `rows`: input_ids, attention_mask, and labels (classify) or
    loss_mask (sft: 1 on response tokens), every row padded or cut to data.max_length."""
    length = data.max_length
    if data.task == "classify":
        ids = [tokenizer(r[data.text_field])[:length] for r in rows]
        # check_rows has made every label a known name or an index in range
        labels = [data.labels.index(r[data.label_field]) if isinstance(r[data.label_field], str)
                  else r[data.label_field] for r in rows]  # fmt: skip
        mask = _pad([[1] * len(s) for s in ids], length, 0)
        return {
            "input_ids": _pad(ids, length, tokenizer.pad),
            "attention_mask": mask,
            "labels": np.asarray(labels, np.int32),
        }
    examples = []
    for r in rows:
        prompt = tokenizer(data.template.format(**r))
        answer = tokenizer(r[data.response_field], special=False)
        answer += [tokenizer.eos] if tokenizer.eos is not None else []
        examples.append(
            ((prompt + answer)[:length], ([0] * len(prompt) + [1] * len(answer))[:length])
        )
    rows_of = _packed(examples, length) if data.pack else [[e] for e in examples]
    ids = [[t for e in row for t in e[0]] for row in rows_of]
    # Segment ids (1, 2, ... per packed example) and positions that restart with each one.
    segments = [[i + 1 for i, e in enumerate(row) for _ in e[0]] for row in rows_of]
    positions = [[p for e in row for p in range(len(e[0]))] for row in rows_of]
    return {
        "input_ids": _pad(ids, length, tokenizer.pad),
        "attention_mask": _pad(segments, length, 0),
        "positions": _pad(positions, length, 0),
        "loss_mask": _pad([[m for e in row for m in e[1]] for row in rows_of], length, 0),
    }


def _packed(examples: list, length: int) -> list[list]:
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
