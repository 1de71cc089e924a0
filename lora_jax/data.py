"""Training data as batches: a split's rows (`lora_jax.sources`) checked and encoded by a
`RowEncoder` (a task bound to its settings: `lora_jax.tasks.Encoder`), and batched by grain.

No split is ever held whole. Each process reads only its own rows of every global batch, in
an order reshuffled each epoch from (seed, epoch); the iterator's state goes into the
checkpoint, so a resumed run sees the batches an uninterrupted run would have seen. Examples
can be packed several to a row (grain's first-fit packing; `segment_ids` then number them);
unpacked batches are padded only to their longest row, rounded up to one of a few bucket
lengths, so the step compiles a bounded number of times.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import grain
import numpy as np
from grain import experimental as grain_x

from lora_jax import chat
from lora_jax.files import path
from lora_jax.sources import BadRow, ListedRows, Rows

Batch = dict[str, np.ndarray]
Example = dict[str, np.ndarray]
SEGMENT_IDS = "segment_ids"  # per token: 0 on padding, else the number of its example in the row


class RowEncoder(Protocol):
    """What turns a split's rows into examples: a row checked, then encoded as 1-D int32 token
    arrays of at most `max_length` (input_ids, ...) and scalars; `pad` fills token arrays."""

    max_length: int
    pad: int

    def check(self, row: Mapping[str, Any], at: str) -> None:
        """A ValueError starting with `at` (file and row) unless the row can be encoded."""
        ...

    def __call__(self, row: Mapping[str, Any]) -> Example: ...


class Tokenizer:
    """A checkpoint's tokenizer.json (the Rust `tokenizers` library; no transformers)."""

    def __init__(self, directory: str | os.PathLike, hf_config: Mapping[str, Any]):
        from tokenizers import Tokenizer as Fast

        file = path(directory) / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file}: the checkpoint has no tokenizer.json.")
        try:
            self.fast = Fast.from_str(file.read_text())
        except Exception as err:  # the tokenizers library raises its own plain Exception
            raise ValueError(f"{file}: not a readable tokenizer (truncated or damaged? "
                             f"{err}).") from None  # fmt: skip
        # Some tokenizer.json files pad or cut every encoding (all-MiniLM's: to 128 tokens);
        # the task cuts and `padded` pads, so the file's settings must not.
        self.fast.no_padding()
        self.fast.no_truncation()
        eos = hf_config.get("eos_token_id")
        self.eos = eos[0] if isinstance(eos, list) else eos
        self.pad = hf_config.get("pad_token_id") or 0
        self.directory = str(directory)
        self.chat_template, self.specials = chat.read_template(directory)
        # As transformers loads it: tokenizer_config.json's special tokens (bos "<s>", ...)
        # are one token each in text, as a chat template writes them. Those of the vocab only.
        known = [t for t in self.specials.values() if self.fast.token_to_id(t) is not None]
        self.fast.add_special_tokens(known)

    def __call__(self, text: str, special: bool = True) -> list[int]:
        try:
            return self.fast.encode(text, add_special_tokens=special).ids
        except TypeError:  # the Rust side takes UTF-8 only: a lone surrogate ("\ud800" in JSON)
            raise ValueError(f"the text {text[:40]!r} holds a lone surrogate (an escape as "
                             "\\ud800 that is half a character): no tokenizer takes "
                             "it.") from None  # fmt: skip

    def chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False
             ) -> list[int]:  # fmt: skip
        """A conversation's tokens by the checkpoint's chat template, as transformers'
        apply_chat_template(tokenize=True) gives them (the template writes any BOS)."""
        if self.chat_template is None:
            raise ValueError(f"{self.directory} has no chat template (tokenizer_config.json's "
                             "chat_template, or chat_template.jinja): a conversational row "
                             "needs one.")  # fmt: skip
        text = chat.render(self.chat_template, messages, self.specials, add_generation_prompt)
        return self(text, special=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.fast.decode(list(ids), skip_special_tokens=True)


def pad(seqs: Sequence[Sequence[Any]], length: int, value: int,
        dtype: np.dtype | type = np.int32) -> np.ndarray:  # fmt: skip
    """Token lists as one (rows, length) array (int32, or `dtype`), cut or filled with
    `value`."""
    out = np.full((len(seqs), length), value, dtype)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s[:length]
    return out


# ----------------------------------------------------------------------------- examples


class Encode:
    """Row index -> its example by `encoder` (1-D token arrays, cut at its max_length;
    scalars), the row checked first, or `BadRow` naming the file and the row. Picklable, for
    grain's worker processes."""

    def __init__(self, rows: Rows, encoder: RowEncoder):
        self.rows, self.encoder = rows, encoder

    def __len__(self) -> int:
        return len(self.rows)

    def __call__(self, index: int) -> Example:
        row, where = self.rows.read(int(index))
        try:
            self.encoder.check(row, where)
        except ValueError as err:
            raise BadRow(str(err)) from None
        try:
            return self.encoder(row)
        except ValueError as err:  # what only its tokens show (a prompt that fills a pair's row)
            raise BadRow(f"{where}: {err}") from None

    def padded(self, length: int | None = None) -> Padded:
        """The collator of these examples: padded with the encoder's pad id to `length`, or
        to the bucket of the longest."""
        return Padded(self.encoder.pad, self.encoder.max_length, length)

    def check_first(self, count: int = 256) -> list[Example]:
        """The first `count` rows read, checked and encoded: a wrong field name or template
        is refused before anything compiles (later rows are checked as they are read)."""
        return [self(index) for index in range(min(count, len(self)))]


class WithValues(Encode):
    """`encode`'s examples, each with a float32 token array per entry of `values` (an array of
    (rows, segments) computed before training): its row's j-th value on the first token of
    the example's segment j + 1, 0 elsewhere. It pads and packs as tokens do, and a sum over
    a segment's tokens gives the value back. Picklable, as `Encode`."""

    def __init__(self, encode: Encode, values: Mapping[str, np.ndarray]):
        super().__init__(encode.rows, encode.encoder)
        self.values = dict(values)

    def __call__(self, index: int) -> Example:
        example = super().__call__(index)
        segments = example[SEGMENT_IDS]
        firsts = np.flatnonzero(np.diff(segments, prepend=0))
        for key, table in self.values.items():
            spread = np.zeros(len(segments), np.float32)
            spread[firsts] = table[int(index)][segments[firsts] - 1]
            example[key] = spread
        return example


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
                batch[key] = pad([e[key] for e in examples], length, value, examples[0][key].dtype)
        return batch


def widened(batch: Batch, length: int, pad_id: int) -> Batch:
    """`batch` with its token arrays padded on to `length` (processes agree on one length)."""
    out = {}
    for key, v in batch.items():
        extra = length - v.shape[1] if v.ndim == 2 else 0
        fill = pad_id if key == "input_ids" else 0
        out[key] = np.pad(v, ((0, 0), (0, extra)), constant_values=fill) if extra else v
    return out


def _only(example: Example, keys: Sequence[str]) -> Example:
    return {k: example[k] for k in keys}


def _from_packed(bin_: Example, features: Sequence[str]) -> Example:
    """grain's packed bin as a row of the examples' own token arrays (their positions too),
    the segments numbered on through the row, 0 on padding: an SFT example is one segment
    (1, 2, 3, ...), a DPO pair two (1 and 2, 3 and 4, ...)."""
    row = {k: bin_[k] for k in features}
    example, own = bin_["input_ids_segment_ids"], bin_[SEGMENT_IDS]
    starts = np.r_[True, (example[1:] != example[:-1]) | (own[1:] != own[:-1])]
    row[SEGMENT_IDS] = np.where(example > 0, np.cumsum(starts), 0).astype(np.int32)
    return row


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


def packed(examples: grain.IterDataset, features: Sequence[str], bins: int, length: int,
           pad_id: int) -> grain.IterDataset:  # fmt: skip
    """Examples packed first-fit into rows of `length` tokens (grain's packing of their token
    arrays, `features`), `bins` rows at a time: each flush of `bins` rows is one batch, so
    no example crosses batches."""
    return grain_x.FirstFitPackIterDataset(
        examples.map(functools.partial(_only, keys=features)),
        length_struct=dict.fromkeys(features, length),
        num_packing_bins=bins,
        shuffle_bins=False,
        padding_struct={k: pad_id if k == "input_ids" else 0 for k in features},
    ).map(functools.partial(_from_packed, features=features))


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
    length, pad_id = encode.encoder.max_length, encode.encoder.pad
    chunks = grain.MapDataset.range(2**62).map(Chunk(order, encode))
    stream = chunks.to_iter_dataset(read_options(threads))
    if workers:  # worker w encodes chunks w, w + workers, ...; they come back in order
        from absl import flags  # grain's workers read its flags, which a CLI never parses

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        _start_quiet_tracker()
        stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    # Packed and batched here, not in the workers: each would pack its own examples, and the
    # batches would depend on the number of workers.
    if pack:
        examples = grain_x.FlatMapIterDataset(stream, _Unjoin(order.local))
        features = [k for k, v in encode(0).items() if v.ndim]  # its token arrays
        rows = packed(examples, features, order.local, length, pad_id)
        return rows.batch(order.local, drop_remainder=True)
    collate = encode.padded()
    return stream.map(lambda chunk: collate(unjoined(chunk)))


def _start_quiet_tracker() -> None:
    """multiprocessing's resource tracker started without its report of what it cleans at
    exit. A worker killed by the OS loses the shared memory it was filling and queueing; the
    tracker unlinks those segments when the run ends (nothing is left), but its warning
    about them would follow the run's own line. It reads warning filters from its command
    line, built from `sys.warnoptions`; a tracker already running is left as it is."""
    from multiprocessing import resource_tracker

    saved = list(sys.warnoptions)
    sys.warnoptions.append("ignore:resource_tracker:UserWarning:multiprocessing.resource_tracker")
    try:
        resource_tracker.ensure_running()
    finally:
        sys.warnoptions[:] = saved


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
    batches = stream.to_iter_dataset(read_options(threads)).batch(local, batch_fn=encode.padded())
    for n, batch in enumerate(batches):
        real = min(batch_size, size - n * batch_size)
        batch["weight"] = (np.arange(start, stop) < real).astype(np.float32)
        yield batch, real


def padding_share(mask: np.ndarray) -> float:
    """The share of a batch's token positions that hold no token (`mask`: 0 there)."""
    return float(1 - np.count_nonzero(mask) / np.size(mask))


def first_batch(encode: Encode, rows: int = 1) -> Batch:
    """The first `rows` examples as a batch (an input the model takes, e.g. for its layouts)."""
    return encode.padded()([encode(i) for i in range(rows)])


def encoded(rows: Sequence[Mapping[str, Any]], encoder: RowEncoder,
            length: int | None = None) -> Batch:  # fmt: skip
    """Rows already in memory (a notebook's, a test's) as one batch, each checked and
    encoded by `encoder` and padded to `length` (default: the longest's bucket)."""
    encode = Encode(ListedRows(rows), encoder)
    return encode.padded(length)([encode(i) for i in range(len(rows))])
