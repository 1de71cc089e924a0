"""What the runner does differently per task (`data.task`), in one object per task: the row
fields it reads and how it checks and encodes them, which models it trains, its loss terms,
which evals it reports and what it checks at the end. `lora-jax train` / `eval` / `compile`
look the task up in `TASKS` and never branch on it."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_jax.data import Batch, Tokenizer, packed, pad, template_fields
from lora_jax.step import token_terms

if TYPE_CHECKING:
    from lora_jax.settings import DataSettings
    from lora_jax.train import Run

Terms = tuple[jax.Array, jax.Array, jax.Array]  # (summed loss, summed weight, summed correct)
Shapes = dict[str, tuple[tuple[int, ...], np.dtype]]


class Task(Protocol):
    """The interface each task implements (`TASKS` lists them)."""

    name: str
    reports_probe: bool  # an eval before training and after the head-only phase

    def fields(self, data: DataSettings) -> list[str]:
        """The row fields it reads."""
        ...

    def check_row(self, row: Mapping[str, Any], at: str, data: DataSettings,
                  classes: int | None) -> None:  # fmt: skip
        """A ValueError starting with `at` (file and row) unless every value has its type."""
        ...

    def encode(self, rows: list[dict[str, Any]], tokenizer: Tokenizer, data: DataSettings) -> Batch:
        """Token arrays for checked rows, every row `data.max_length` long."""
        ...

    def batch_shapes(self, data: DataSettings, rows: int) -> Shapes:
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
        """(summed loss, summed weight, summed correct) of a batch, in float32."""
        ...

    def finish(self, run: Run, adapter: Any, log: Callable[[str], None]) -> None:
        """What the task checks once training is done."""
        ...


class Classify:
    """A label per text: cross-entropy per example on the model's logits; the accuracy
    before training and after a head-only phase are reported, and at the end the merged
    model is checked to predict what the factored one does."""

    name = "classify"
    reports_probe = True

    def fields(self, data: DataSettings) -> list[str]:
        return [data.text_field, data.label_field]

    def check_row(self, row: Mapping[str, Any], at: str, data: DataSettings,
                  classes: int | None) -> None:  # fmt: skip
        """Texts are strings; a label is a name from data.labels or an int in [0, classes),
        nothing coerced (no float, bool or null)."""
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

    def encode(self, rows: list[dict[str, Any]], tokenizer: Tokenizer, data: DataSettings) -> Batch:
        """input_ids, attention_mask and labels (label names mapped to their index)."""
        length = data.max_length
        ids = [tokenizer(r[data.text_field])[:length] for r in rows]
        labels = [data.labels.index(r[data.label_field]) if isinstance(r[data.label_field], str)
                  else r[data.label_field] for r in rows]  # fmt: skip
        return {
            "input_ids": pad(ids, length, tokenizer.pad),
            "attention_mask": pad([[1] * len(s) for s in ids], length, 0),
            "labels": np.asarray(labels, np.int32),
        }

    def batch_shapes(self, data: DataSettings, rows: int) -> Shapes:
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
        return jnp.sum(losses * weight), jnp.sum(weight), jnp.sum(correct * weight)

    def finish(self, run: Run, adapter: Any, log: Callable[[str], None]) -> None:
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

    def fields(self, data: DataSettings) -> list[str]:
        return [*template_fields(data.template), data.response_field]

    def check_row(self, row: Mapping[str, Any], at: str, data: DataSettings,
                  classes: int | None) -> None:  # fmt: skip
        """No template field is null; the response is a string."""
        for field in template_fields(data.template):
            if row[field] is None:
                raise ValueError(f"{at}: {field} is null.")
        if not isinstance(row[data.response_field], str):
            raise ValueError(f"{at}: {data.response_field} is {row[data.response_field]!r}, "
                             "not a string.")  # fmt: skip

    def encode(self, rows: list[dict[str, Any]], tokenizer: Tokenizer, data: DataSettings) -> Batch:
        """input_ids, attention_mask (segment ids: 1, 2, ... per packed example), positions
        restarting with each example, and loss_mask (1 on response tokens and EOS)."""
        length, examples = data.max_length, []
        for r in rows:
            prompt = tokenizer(data.template.format(**r))
            answer = tokenizer(r[data.response_field], special=False)
            answer += [tokenizer.eos] if tokenizer.eos is not None else []
            examples.append(
                ((prompt + answer)[:length], ([0] * len(prompt) + [1] * len(answer))[:length])
            )
        rows_of = packed(examples, length) if data.pack else [[e] for e in examples]
        ids = [[t for e in row for t in e[0]] for row in rows_of]
        segments = [[i + 1 for i, e in enumerate(row) for _ in e[0]] for row in rows_of]
        positions = [[p for e in row for p in range(len(e[0]))] for row in rows_of]
        return {
            "input_ids": pad(ids, length, tokenizer.pad),
            "attention_mask": pad(segments, length, 0),
            "positions": pad(positions, length, 0),
            "loss_mask": pad([[m for e in row for m in e[1]] for row in rows_of], length, 0),
        }

    def batch_shapes(self, data: DataSettings, rows: int) -> Shapes:
        tokens = ((rows, data.max_length), np.dtype(np.int32))
        return dict.fromkeys(("input_ids", "attention_mask", "positions", "loss_mask"), tokens)

    def num_labels(self, configured: int | None) -> int | None:
        return None  # a decoder keeps its LM head

    def check_model(self, architecture: type, arch: str, model_dir: str) -> None:
        """A decoder (the zoo's CausalLM), or a ValueError saying which task fits."""
        from lora_jax.models.common import CausalLM

        if not issubclass(architecture, CausalLM):
            raise ValueError(f"data.task 'sft' trains a decoder (a causal LM); {model_dir} "
                             f"holds {arch}: use data.task 'classify', or a decoder.")  # fmt: skip

    def loss_terms(self, apply: Callable, params: Any, batch: Mapping[str, jax.Array],
                   rngs: Any = None) -> Terms:  # fmt: skip
        """Summed response-token cross-entropy and count, and tokens predicted right."""
        inputs = [batch[k] for k in ("input_ids", "attention_mask", "positions") if k in batch]
        hidden = apply(params, *inputs, rngs=rngs, method="hidden")
        real = batch["attention_mask"][:, 1:] > 0  # segment ids when packed
        mask = batch["loss_mask"][:, 1:] * real * _weight(batch)[:, None]
        head = functools.partial(apply, params, rngs=rngs, method="head")
        return token_terms(head, hidden[:, :-1], batch["input_ids"][:, 1:], mask)

    def finish(self, run: Run, adapter: Any, log: Callable[[str], None]) -> None:
        """Nothing beyond the eval loss: a generation check needs the user's prompts."""


TASKS: dict[str, Task] = {task.name: task for task in (Classify(), Sft())}


def check_rows(rows: list[dict[str, Any]], where: str, data: DataSettings,
               classes: int | None) -> None:  # fmt: skip
    """Every row of `where` checked by its task; the error names the file and the row."""
    task = TASKS[data.task]
    for n, row in enumerate(rows, 1):
        task.check_row(row, f"{where}: row {n}", data, classes)


def _weight(batch: Mapping[str, jax.Array]) -> jax.Array:
    """Each example's weight: 0 for the padding rows of an eval's last batch, else 1."""
    return batch.get("weight", jnp.ones(batch["input_ids"].shape[0], jnp.float32))


def merged_predictions(run: Run, adapter: Any) -> tuple[np.ndarray, np.ndarray]:
    """A classifier's eval-split predictions from the factored forward and from the merged
    model."""
    from lora_jax.tree import combine, merge

    factored = jax.jit(lambda p, x, m: run.apply(p, x, m))
    plain = jax.jit(lambda p, x, m: run.model.apply(p, x, m))
    params = combine(adapter, run.base)
    merged = merge(params, run.lora)
    eval_data = run.data["eval"]
    x, m = jnp.asarray(eval_data["input_ids"]), jnp.asarray(eval_data["attention_mask"])
    return (
        np.asarray(jnp.argmax(factored(params, x, m), -1)),
        np.asarray(jnp.argmax(plain(merged, x, m), -1)),
    )
