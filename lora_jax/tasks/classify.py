"""Classification (`data.task` "classify"): a label per text, cross-entropy per example."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_jax.data import Example, Tokenizer
from lora_jax.tasks.base import DataFields, Shapes, Terms, Trained, row_weights, shown, tokens
from lora_jax.tree import combine, merge


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
            raise ValueError(f"{at}: {data.text_field} is {shown(text)}, not a string.")
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
        return {"input_ids": tokens(ids), "attention_mask": np.ones(len(ids), np.int32),
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
        weight = row_weights(batch)
        logits = apply(params, *inputs, rngs=rngs).astype(jnp.float32)
        labels = batch["labels"]
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        return jnp.sum(losses * weight), jnp.sum(weight), jnp.sum(correct * weight), {}

    def row_values(self, run: Trained, between: Callable[[], None]) -> dict[str, np.ndarray]:
        return {}  # its examples are the rows alone

    def finish(self, run: Trained, adapter: Any, log: Callable[[str], None]) -> None:
        """The merged model's eval predictions against the factored forward's (one process:
        the eval split is whole there)."""
        if jax.process_count() == 1:
            factored, merged = merged_predictions(run, adapter)
            same = int(np.sum(factored == merged))
            log(f"merged model: same predictions on {same}/{len(factored)} eval examples")


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
