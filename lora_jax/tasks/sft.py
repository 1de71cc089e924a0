"""Supervised fine-tuning (`data.task` "sft"): a response after a prompt, the loss on the
response's tokens."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from lora_jax.data import SEGMENT_IDS, Example, Tokenizer
from lora_jax.step import token_terms
from lora_jax.tasks.base import (
    DataFields,
    Shapes,
    Terms,
    Trained,
    decoder_only,
    response_tokens,
    row_weights,
    shown,
    template_fields,
    tokens,
)


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
                raise ValueError(f"{at}: {field} is {shown(row[field])}, not a string.")

    def encode(self, row: Mapping[str, Any], tokenizer: Tokenizer,
               data: DataFields) -> Example:  # fmt: skip
        """input_ids (prompt, response, EOS), segment_ids (1 on every token: the row's one
        example), positions, and loss_mask (1 on response tokens and EOS). Packed, segment
        ids number the examples of a row (1, 2, ...) and positions restart with each."""
        prompt = tokenizer(data.template.format(**row))
        answer = response_tokens(row[data.response_field], tokenizer)
        ids = (prompt + answer)[: data.max_length]
        mask = ([0] * len(prompt) + [1] * len(answer))[: len(ids)]
        return {
            "input_ids": tokens(ids),
            SEGMENT_IDS: np.ones(len(ids), np.int32),
            "positions": np.arange(len(ids), dtype=np.int32),
            "loss_mask": tokens(mask),
        }

    def targets(self, example: Example) -> int:
        return int(example["loss_mask"][1:].sum())  # each predicts from the token before

    def packs(self, data: DataFields) -> bool:
        return data.pack

    def batch_shapes(self, data: DataFields, rows: int) -> Shapes:
        spec = ((rows, data.max_length), np.dtype(np.int32))
        return dict.fromkeys(("input_ids", SEGMENT_IDS, "positions", "loss_mask"), spec)

    def num_labels(self, configured: int | None) -> int | None:
        return None  # a decoder keeps its LM head

    def check_model(self, architecture: type, arch: str, model_dir: str) -> None:
        decoder_only(self.name, architecture, arch, model_dir)

    def loss_terms(self, apply: Callable, params: Any, batch: Mapping[str, jax.Array],
                   rngs: Any = None) -> Terms:  # fmt: skip
        """Summed response-token cross-entropy and count, and tokens predicted right."""
        # The decoder's attention mask takes segment ids: a token sees its own example only.
        inputs = [batch[k] for k in ("input_ids", SEGMENT_IDS, "positions") if k in batch]
        hidden = apply(params, *inputs, rngs=rngs, method="hidden")
        real = batch[SEGMENT_IDS][:, 1:] > 0
        mask = batch["loss_mask"][:, 1:] * real * row_weights(batch)[:, None]
        head = functools.partial(apply, params, rngs=rngs, method="head")
        return (*token_terms(head, hidden[:, :-1], batch["input_ids"][:, 1:], mask), {})

    def row_values(self, run: Trained, between: Callable[[], None]) -> dict[str, np.ndarray]:
        return {}  # its examples are the rows alone

    def finish(self, run: Trained, adapter: Any, log: Callable[[str], None]) -> None:
        """Nothing beyond the eval loss: a generation check needs the user's prompts."""
