"""What the runner does differently per task (`data.task`), in one object per task: the row
fields it reads and how it checks and encodes them, which models it trains, its loss terms,
which evals it reports and what it checks at the end. `lora-jax train` / `eval` / `compile`
look the task up in `TASKS` and never branch on it.

Tasks sit under the settings (which offer `TASKS`' names as `data.task`'s choices) and over
the data pipeline (an `Encoder` is the `data.RowEncoder` of a task and its settings): what
they read of the settings and of a run is described here, as protocols (`DataFields`,
`Trained`), not imported.
"""

from __future__ import annotations

import dataclasses
import functools
import string
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_jax.config import LoraConfig
from lora_jax.data import SEGMENT_IDS, Batch, Example, Tokenizer
from lora_jax.preference import pair_losses, pair_metrics, side_logps
from lora_jax.step import token_logps, token_terms
from lora_jax.tree import combine, merge, split

# (summed loss, summed weight, summed correct, {metric: summed value}): the step and the eval
# report each sum over the summed weight.
Terms = tuple[jax.Array, jax.Array, jax.Array, dict[str, jax.Array]]
Shapes = dict[str, tuple[tuple[int, ...], np.dtype]]


class DataFields(Protocol):
    """The `data.*` settings a task reads (`lora_jax.settings.DataFields` has them)."""

    text_field: str
    label_field: str
    labels: Sequence[str]
    response_field: str
    chosen_field: str
    rejected_field: str
    template: str
    max_length: int
    pack: bool


class PreferenceFields(Protocol):
    """The `dpo.*` settings the DPO task reads (`lora_jax.settings.DpoSettings` has them)."""

    loss: str
    beta: float
    label_smoothing: float
    simpo_gamma: float


class Trained(Protocol):
    """What a task's end-of-run check reads of the run (`lora_jax.run.Run` has it)."""

    model: Any
    base: Any
    lora: LoraConfig
    apply: Callable

    def eval_batches(self, split: str = "eval") -> Iterator[tuple[Batch, int]]:
        """(this process's rows of a global batch, real rows in it), the split in order."""
        ...


class Task(Protocol):
    """The interface each task implements (`TASKS` lists them)."""

    name: str
    reports_probe: bool  # an eval before training and after the head-only phase
    real_tokens: str  # the batch entry that is 0 on padding and nonzero on real tokens

    def bound(self, config: Any) -> Task:
        """The task with its own settings section of the run's config (`dpo.*`); itself for
        a task that has none."""
        ...

    def fields(self, data: DataFields) -> list[str]:
        """The row fields it reads."""
        ...

    def row_length(self, data: DataFields) -> int:
        """The longest batch row an example takes (data.max_length, or more for a pair)."""
        ...

    def check_row(self, row: Mapping[str, Any], at: str, data: DataFields,
                  classes: int | None) -> None:  # fmt: skip
        """A ValueError starting with `at` (file and row) unless every value has its type."""
        ...

    def encode(self, row: Mapping[str, Any], tokenizer: Tokenizer,
               data: DataFields) -> Example:  # fmt: skip
        """A checked row's example: 1-D int32 token arrays of at most `data.max_length`
        (input_ids, attention_mask, ...) and scalars; `lora_jax.data` pads or packs them."""
        ...

    def targets(self, example: Example) -> int:
        """How many of an example's tokens (or labels) its loss is taken on: 0 where
        data.max_length cut them all away."""
        ...

    def packs(self, data: DataFields) -> bool:
        """Whether training batches pack several examples into a row."""
        ...

    def batch_shapes(self, data: DataFields, rows: int) -> Shapes:
        """{name: (shape, dtype)} of what `encode` gives `rows` rows (for `lora-jax compile`)."""
        ...

    def num_labels(self, configured: int | None) -> int | None:
        """The classifier head to build the model with (None: the checkpoint's own head)."""
        ...

    def check_model(self, architecture: type, arch: str, model_dir: str) -> None:
        """A ValueError if the checkpoint's architecture cannot learn this task."""
        ...

    def loss_terms(self, apply: Callable, params: Any, batch: Mapping[str, jax.Array],
                   rngs: Any = None) -> Terms:  # fmt: skip
        """(summed loss, summed weight, summed correct, other sums) of a batch, in float32."""
        ...

    def finish(self, run: Trained, adapter: Any, log: Callable[[str], None]) -> None:
        """What the task checks once training is done."""
        ...


def _tokens(ids: list[int]) -> np.ndarray:
    return np.asarray(ids, np.int32)


def _shown(value: Any) -> str:
    """A wrong-typed value in a refusal, as Python shows it (its start, where long)."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


class Classify:
    """A label per text: cross-entropy per example on the model's logits; the accuracy
    before training and after a head-only phase are reported, and at the end the merged
    model is checked to predict what the factored one does."""

    name = "classify"
    reports_probe = True
    real_tokens = "attention_mask"

    def bound(self, config: Any) -> Classify:
        return self

    def fields(self, data: DataFields) -> list[str]:
        return [data.text_field, data.label_field]

    def row_length(self, data: DataFields) -> int:
        return data.max_length

    def check_row(self, row: Mapping[str, Any], at: str, data: DataFields,
                  classes: int | None) -> None:  # fmt: skip
        """Texts are strings; a label is a name from data.labels or an int in [0, classes),
        nothing coerced (no float, bool or null)."""
        text, label = row[data.text_field], row[data.label_field]
        if not isinstance(text, str):
            raise ValueError(f"{at}: {data.text_field} is {_shown(text)}, not a string.")
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

    def encode(self, row: Mapping[str, Any], tokenizer: Tokenizer,
               data: DataFields) -> Example:  # fmt: skip
        """input_ids, attention_mask and the label (a label name mapped to its index)."""
        ids = tokenizer(row[data.text_field])[: data.max_length]
        label = row[data.label_field]
        label = data.labels.index(label) if isinstance(label, str) else label
        return {"input_ids": _tokens(ids), "attention_mask": np.ones(len(ids), np.int32),
                "labels": np.int32(label)}  # fmt: skip

    def targets(self, example: Example) -> int:
        return 1  # its label, whatever the cut

    def packs(self, data: DataFields) -> bool:
        return False  # one example a row: its logits are read at its own tokens

    def batch_shapes(self, data: DataFields, rows: int) -> Shapes:
        tokens = ((rows, data.max_length), np.dtype(np.int32))
        return {"input_ids": tokens, "attention_mask": tokens,
                "labels": ((rows,), np.dtype(np.int32))}  # fmt: skip

    def num_labels(self, configured: int | None) -> int | None:
        return configured

    def check_model(self, architecture: type, arch: str, model_dir: str) -> None:
        """Every zoo model gives logits per example, with a head built for it if need be."""

    def loss_terms(self, apply: Callable, params: Any, batch: Mapping[str, jax.Array],
                   rngs: Any = None) -> Terms:  # fmt: skip
        """Per-example cross-entropy on float32 logits, weighted by `batch["weight"]`."""
        inputs = [batch[k] for k in ("input_ids", "attention_mask") if k in batch]
        weight = _weight(batch)
        logits = apply(params, *inputs, rngs=rngs).astype(jnp.float32)
        labels = batch["labels"]
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        return jnp.sum(losses * weight), jnp.sum(weight), jnp.sum(correct * weight), {}

    def finish(self, run: Trained, adapter: Any, log: Callable[[str], None]) -> None:
        """The merged model's eval predictions against the factored forward's (one process:
        the eval split is whole there)."""
        if jax.process_count() == 1:
            factored, merged = merged_predictions(run, adapter)
            same = int(np.sum(factored == merged))
            log(f"merged model: same predictions on {same}/{len(factored)} eval examples")


class Sft:
    """A response after a prompt (`data.template` over the row's fields): cross-entropy on
    response tokens only (targets shifted by one), the LM head applied a chunk of tokens at
    a time (`step.token_terms`); `data.pack` puts several examples in a row."""

    name = "sft"
    reports_probe = False
    real_tokens = SEGMENT_IDS

    def bound(self, config: Any) -> Sft:
        return self

    def fields(self, data: DataFields) -> list[str]:
        return [*template_fields(data.template), data.response_field]

    def row_length(self, data: DataFields) -> int:
        return data.max_length

    def check_row(self, row: Mapping[str, Any], at: str, data: DataFields,
                  classes: int | None) -> None:  # fmt: skip
        """Every field it reads (the template's and the response) is a string: nothing else
        (a number, a JSON object or list, true, null) is formatted into text."""
        for field in [*template_fields(data.template), data.response_field]:
            if not isinstance(row[field], str):
                raise ValueError(f"{at}: {field} is {_shown(row[field])}, not a string.")

    def encode(self, row: Mapping[str, Any], tokenizer: Tokenizer,
               data: DataFields) -> Example:  # fmt: skip
        """input_ids (prompt, response, EOS), segment_ids (1 on every token: the row's one
        example), positions, and loss_mask (1 on response tokens and EOS). Packed, segment
        ids number the examples of a row (1, 2, ...) and positions restart with each."""
        prompt = tokenizer(data.template.format(**row))
        answer = tokenizer(row[data.response_field], special=False)
        answer += [tokenizer.eos] if tokenizer.eos is not None else []
        ids = (prompt + answer)[: data.max_length]
        mask = ([0] * len(prompt) + [1] * len(answer))[: len(ids)]
        return {
            "input_ids": _tokens(ids),
            SEGMENT_IDS: np.ones(len(ids), np.int32),
            "positions": np.arange(len(ids), dtype=np.int32),
            "loss_mask": _tokens(mask),
        }

    def targets(self, example: Example) -> int:
        return int(example["loss_mask"][1:].sum())  # each predicts from the token before

    def packs(self, data: DataFields) -> bool:
        return data.pack

    def batch_shapes(self, data: DataFields, rows: int) -> Shapes:
        tokens = ((rows, data.max_length), np.dtype(np.int32))
        return dict.fromkeys(("input_ids", SEGMENT_IDS, "positions", "loss_mask"), tokens)

    def num_labels(self, configured: int | None) -> int | None:
        return None  # a decoder keeps its LM head

    def check_model(self, architecture: type, arch: str, model_dir: str) -> None:
        _decoder_only(self.name, architecture, arch, model_dir)

    def loss_terms(self, apply: Callable, params: Any, batch: Mapping[str, jax.Array],
                   rngs: Any = None) -> Terms:  # fmt: skip
        """Summed response-token cross-entropy and count, and tokens predicted right."""
        # The decoder's attention mask takes segment ids: a token sees its own example only.
        inputs = [batch[k] for k in ("input_ids", SEGMENT_IDS, "positions") if k in batch]
        hidden = apply(params, *inputs, rngs=rngs, method="hidden")
        real = batch[SEGMENT_IDS][:, 1:] > 0
        mask = batch["loss_mask"][:, 1:] * real * _weight(batch)[:, None]
        head = functools.partial(apply, params, rngs=rngs, method="head")
        return (*token_terms(head, hidden[:, :-1], batch["input_ids"][:, 1:], mask), {})

    def finish(self, run: Trained, adapter: Any, log: Callable[[str], None]) -> None:
        """Nothing beyond the eval loss: a generation check needs the user's prompts."""


@dataclasses.dataclass(frozen=True)
class Dpo:
    """Preference pairs (a prompt, a chosen and a rejected response), trained so that the
    policy (base + adapter) raises the chosen response's log-probability against the
    reference's more than the rejected one's. The reference is the base itself: the same
    tree with the adapter's leaves left out, so no second copy of the weights exists. A pair
    is one row: prompt + chosen (segment 1), then prompt + rejected (segment 2), each cut at
    data.max_length, positions restarting, so one forward scores both.

    Losses (`loss`): "sigmoid" (DPO; `label_smoothing` > 0: conservative DPO), "ipo" (on
    per-token log-ratios, as TRL computes it) and "simpo" (reference-free: length-normalised
    log-probs and a margin `simpo_gamma`; no reference forward). Metrics as TRL names them.
    `settings` are the run's `dpo.*` (`bound`); `TASKS`' own instance has none and reads
    and encodes rows only."""

    name: ClassVar[str] = "dpo"
    reports_probe: ClassVar[bool] = False
    real_tokens: ClassVar[str] = SEGMENT_IDS
    settings: PreferenceFields | None = None

    def bound(self, config: Any) -> Dpo:
        return Dpo(config.dpo)

    def fields(self, data: DataFields) -> list[str]:
        return [*template_fields(data.template), data.chosen_field, data.rejected_field]

    def row_length(self, data: DataFields) -> int:
        return 2 * data.max_length

    def check_row(self, row: Mapping[str, Any], at: str, data: DataFields,
                  classes: int | None) -> None:  # fmt: skip
        """Every field a string; each response holds text, and the two differ (a pair of
        the same text prefers nothing)."""
        for field in self.fields(data):
            if not isinstance(row[field], str):
                raise ValueError(f"{at}: {field} is {_shown(row[field])}, not a string.")
        for field in (data.chosen_field, data.rejected_field):
            if not row[field].strip():
                raise ValueError(f"{at}: {field} is empty: a pair needs two responses.")
        if row[data.chosen_field] == row[data.rejected_field]:
            raise ValueError(f"{at}: {data.chosen_field} and {data.rejected_field} are the same "
                             "text: the pair prefers nothing.")  # fmt: skip

    def encode(self, row: Mapping[str, Any], tokenizer: Tokenizer,
               data: DataFields) -> Example:  # fmt: skip
        """The pair as one row: input_ids (prompt, chosen, EOS, then prompt, rejected, EOS),
        segment_ids 1 then 2, positions restarting, loss_mask on response tokens. A prompt
        that leaves no response token within data.max_length is a ValueError."""
        prompt = tokenizer(data.template.format(**row))
        if len(prompt) >= data.max_length:
            raise ValueError(f"the prompt is {len(prompt)} tokens, leaving no room for a "
                             f"response within data.max_length {data.max_length}.")  # fmt: skip
        eos = [tokenizer.eos] if tokenizer.eos is not None else []
        sides = [(prompt + tokenizer(row[field], special=False) + eos)[: data.max_length]
                 for field in (data.chosen_field, data.rejected_field)]  # fmt: skip
        places = [(n, i) for n, side in enumerate(sides, 1) for i in range(len(side))]
        return {
            "input_ids": _tokens([t for side in sides for t in side]),
            SEGMENT_IDS: _tokens([n for n, _ in places]),
            "positions": _tokens([i for _, i in places]),
            "loss_mask": _tokens([int(i >= len(prompt)) for _, i in places]),
        }

    def targets(self, example: Example) -> int:
        return 1  # the pair: `encode` keeps a response token on each side

    def packs(self, data: DataFields) -> bool:
        return False  # one pair a row, padded to a bucket length

    def batch_shapes(self, data: DataFields, rows: int) -> Shapes:
        tokens = ((rows, self.row_length(data)), np.dtype(np.int32))
        return dict.fromkeys(("input_ids", SEGMENT_IDS, "positions", "loss_mask"), tokens)

    def num_labels(self, configured: int | None) -> int | None:
        return None

    def check_model(self, architecture: type, arch: str, model_dir: str) -> None:
        _decoder_only(self.name, architecture, arch, model_dir)

    def loss_terms(self, apply: Callable, params: Any, batch: Mapping[str, jax.Array],
                   rngs: Any = None) -> Terms:  # fmt: skip
        """(summed pair loss, pairs, pairs whose chosen reward is higher, TRL's metrics as
        sums): rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
        logps/chosen, logps/rejected."""
        if (s := self.settings) is None:
            raise ValueError("the dpo task's loss needs its settings: TASKS['dpo'].bound(config)")
        logps, counts = _pair_logps(apply, params, batch, rngs)
        # The reference: the base alone (its adapter leaves left out; no dropout).
        reference = None if s.loss == "simpo" else _pair_logps(
            apply, split(params, LoraConfig())[1], batch)[0]  # fmt: skip
        losses, rewards = pair_losses(s.loss, logps, counts, reference, beta=s.beta,
                                      label_smoothing=s.label_smoothing,
                                      simpo_gamma=s.simpo_gamma)  # fmt: skip
        weight = _weight(batch)
        sums = pair_metrics(rewards, logps, weight)
        return jnp.sum(losses * weight), jnp.sum(weight), sums["rewards/accuracies"], sums

    def finish(self, run: Trained, adapter: Any, log: Callable[[str], None]) -> None:
        """Nothing beyond the eval's metrics."""


def _pair_logps(apply: Callable, params: Any, batch: Mapping[str, jax.Array],
                rngs: Any = None) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """(summed response log-probs, response tokens), each (rows, 2): chosen, rejected (a
    pair's segments 1 and 2); float32."""
    inputs = [batch[k] for k in ("input_ids", SEGMENT_IDS, "positions")]
    hidden = apply(params, *inputs, rngs=rngs, method="hidden")
    head = functools.partial(apply, params, rngs=rngs, method="head")
    logps = token_logps(head, hidden[:, :-1], batch["input_ids"][:, 1:])
    return side_logps(logps, batch[SEGMENT_IDS][:, 1:], batch["loss_mask"][:, 1:])


TASKS: dict[str, Task] = {task.name: task for task in (Classify(), Sft(), Dpo())}


def _decoder_only(task: str, architecture: type, arch: str, model_dir: str) -> None:
    """A ValueError unless the checkpoint is a decoder (the zoo's CausalLM)."""
    from lora_jax.models.common import CausalLM

    if not issubclass(architecture, CausalLM):
        raise ValueError(f"data.task {task!r} trains a decoder (a causal LM); {model_dir} "
                         f"holds {arch}: use data.task 'classify', or a decoder.")  # fmt: skip


def _weight(batch: Mapping[str, jax.Array]) -> jax.Array:
    """Each example's weight: 0 for the padding rows of an eval's last batch, else 1."""
    return batch.get("weight", jnp.ones(batch["input_ids"].shape[0], jnp.float32))


def merged_predictions(run: Trained, adapter: Any) -> tuple[np.ndarray, np.ndarray]:
    """A classifier's eval-split predictions from the factored forward and from the merged
    model."""
    factored = jax.jit(lambda p, x, m: jnp.argmax(run.apply(p, x, m), -1))
    plain = jax.jit(lambda p, x, m: jnp.argmax(run.model.apply(p, x, m), -1))
    params = combine(adapter, run.base)
    merged = merge(params, run.lora)
    predictions: tuple[list, list] = ([], [])
    for batch, real in run.eval_batches():
        x, m = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
        predictions[0].append(np.asarray(factored(params, x, m))[:real])
        predictions[1].append(np.asarray(plain(merged, x, m))[:real])
    return np.concatenate(predictions[0]), np.concatenate(predictions[1])


def template_fields(template: str) -> list[str]:
    """The row fields a prompt template reads ("{prompt}" -> ["prompt"])."""
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


@dataclasses.dataclass(frozen=True)
class Encoder:
    """A task's rows of one split as examples (`lora_jax.data.RowEncoder`): its fields there
    with their types (`classes`: a classifier's class count, None where any is fine), then
    encoded by the task. Picklable, for grain's worker processes."""

    task: Task
    tokenizer: Tokenizer
    data: DataFields
    classes: int | None = None

    @property
    def max_length(self) -> int:
        return self.task.row_length(self.data)

    @property
    def pad(self) -> int:
        return self.tokenizer.pad

    def check(self, row: Mapping[str, Any], at: str) -> None:
        """A ValueError starting with `at` for a row that lacks a field the task reads, or
        has a value of the wrong type."""
        if missing := [f for f in self.task.fields(self.data) if f not in row]:
            raise ValueError(f"{at}: no field {missing[0]!r} (the row has {sorted(row)}); set "
                             "data.text_field / label_field / response_field / "
                             "chosen_field / rejected_field, or the "
                             "template's fields.")  # fmt: skip
        self.task.check_row(row, at, self.data, self.classes)

    def __call__(self, row: Mapping[str, Any]) -> Example:
        return self.task.encode(row, self.tokenizer, self.data)
