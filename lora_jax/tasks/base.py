"""What every task shares: the protocols a task implements (`Task`) and reads (`DataFields`,
`Trained`), the helpers of its row checks and losses, and `Encoder`, a task bound to its
settings as the data pipeline's `RowEncoder`."""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.config import LoraConfig
from lora_jax.data import Batch, Example, Tokenizer

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


class Trained(Protocol):
    """What a task reads of the run before the first step and after the last (`lora_jax.run.Run`
    has it)."""

    model: Any
    base: Any
    lora: LoraConfig
    apply: Callable

    def eval_batches(self, split: str = "eval") -> Iterator[tuple[Batch, int]]:
        """(this process's rows of a global batch, real rows in it), the split in order."""
        ...

    def per_row(self, split: str, fn: Callable, desc: str, between: Callable[[], None]
                ) -> np.ndarray:  # fmt: skip
        """fn(base, batch)'s rows over a split's rows in order, as one array on every
        process; `between` is called after each batch."""
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

    def row_values(self, run: Trained, between: Callable[[], None]) -> dict[str, np.ndarray]:
        """Values of each training row, (rows, segments) an array, computed once before the
        first step; its examples then carry them on their segments' first tokens
        (`data.WithValues`: DPO's reference log-probs, when asked); {}: none."""
        ...

    def finish(self, run: Trained, adapter: Any, log: Callable[[str], None]) -> None:
        """What the task checks once training is done."""
        ...


def tokens(ids: list[int]) -> np.ndarray:
    """Token ids as an example's 1-D int32 array."""
    return np.asarray(ids, np.int32)


def response_tokens(text: str, tokenizer: Tokenizer) -> list[int]:
    """A response's tokens as the model learns to write it: no special tokens before it (it
    follows the prompt), EOS after it, where the checkpoint has one."""
    return tokenizer(text, special=False) + ([tokenizer.eos] if tokenizer.eos is not None else [])


def shown(value: Any) -> str:
    """A wrong-typed value in a refusal, as Python shows it (its start, where long)."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def decoder_only(task: str, architecture: type, arch: str, model_dir: str) -> None:
    """A ValueError unless the checkpoint is a decoder (the zoo's CausalLM)."""
    from lora_jax.models.common import CausalLM

    if not issubclass(architecture, CausalLM):
        raise ValueError(f"data.task {task!r} trains a decoder (a causal LM); {model_dir} "
                         f"holds {arch}: use data.task 'classify', or a decoder.")  # fmt: skip


def row_weights(batch: Mapping[str, jax.Array]) -> jax.Array:
    """Each example's weight: 0 for the padding rows of an eval's last batch, else 1."""
    return batch.get("weight", jnp.ones(batch["input_ids"].shape[0], jnp.float32))


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
