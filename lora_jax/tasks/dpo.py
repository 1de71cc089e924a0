"""Preference tuning (`data.task` "dpo"): pairs of a chosen and a rejected response to one
prompt, the base itself the reference policy; the losses are `lora_jax.preference`'s."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.chat import check_conversation, is_conversation
from lora_jax.config import LoraConfig
from lora_jax.data import SEGMENT_IDS, Example, Tokenizer
from lora_jax.preference import by_side, pair_losses, pair_metrics, side_logps
from lora_jax.step import token_logps
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
from lora_jax.tree import split

# A pair's reference log-probs, when computed before training (`dpo.precompute_reference`):
# a float token array its example carries (`data.WithValues`), each side's on its first token.
REFERENCE = "reference_logps"


class PreferenceFields(Protocol):
    """The `dpo.*` settings the DPO task reads (`lora_jax.settings.DpoSettings` has them)."""

    loss: str
    beta: float
    label_smoothing: float
    simpo_gamma: float
    precompute_reference: bool


@dataclasses.dataclass(frozen=True)
class Dpo:
    """Preference pairs (a prompt, a chosen and a rejected response), trained so that the
    policy (base + adapter) raises the chosen response's log-probability against the
    reference's more than the rejected one's. The reference is the base itself: the same
    tree with the adapter's leaves left out, so no second copy of the weights exists. A pair
    is one example: prompt + chosen (segment 1), then prompt + rejected (segment 2), each cut
    at data.max_length, positions restarting, so one forward scores both; with data.pack a
    row holds several pairs (pair k: segments 2k - 1 and 2k).

    Losses (`loss`): "sigmoid" (DPO; `label_smoothing` > 0: conservative DPO), "ipo" (on
    per-token log-ratios, as TRL computes it) and "simpo" (reference-free: length-normalised
    log-probs and a margin `simpo_gamma`; no reference forward). Metrics as TRL names them.
    With `precompute_reference`, the reference's log-probs are computed once before the
    first step (`row_values`) and each example carries them, so the step has no reference
    forward. `settings` are the run's `dpo.*` (`bound`); `TASKS`' own instance has none and
    reads and encodes rows only."""

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
        """Every field a string, or (a conversational row, as TRL's) every field a list of
        messages and the template the prompt's field alone; each response holds text, and
        the two differ (a pair of the same text prefers nothing)."""
        sides = (data.chosen_field, data.rejected_field)
        if isinstance(row[data.chosen_field], list):  # messages, or refused as such
            prompt = (template_fields(data.template) or ["prompt"])[0]
            if data.template != "{" + prompt + "}":
                raise ValueError(f"{at}: a conversational row is rendered by the checkpoint's "
                                 f"chat template, and data.template {data.template!r} adds text "
                                 f"to it: set data.template to '{{{prompt}}}'.")  # fmt: skip
            for field in (prompt, *sides):
                check_conversation(row[field], field, at)
            texts = {f: "".join(m["content"] for m in row[f]) for f in sides}
        else:
            for field in self.fields(data):
                if not isinstance(row[field], str):
                    raise ValueError(f"{at}: {field} is {shown(row[field])}, not a string.")
            texts = {f: row[f] for f in sides}
        for field, text in texts.items():
            if not text.strip():
                raise ValueError(f"{at}: {field} is empty: a pair needs two responses.")
        if row[data.chosen_field] == row[data.rejected_field]:
            raise ValueError(f"{at}: {data.chosen_field} and {data.rejected_field} are the same "
                             "text: the pair prefers nothing.")  # fmt: skip

    def encode(self, row: Mapping[str, Any], tokenizer: Tokenizer,
               data: DataFields) -> Example:  # fmt: skip
        """The pair as one example: input_ids (prompt, chosen, EOS, then prompt, rejected,
        EOS), segment_ids 1 then 2, positions restarting, loss_mask on response tokens. A
        prompt of no token, or one that leaves no response token within data.max_length, is
        a ValueError."""
        prompt, sides = _pair_tokens(row, tokenizer, data)
        if not prompt:  # its first response token would be scored from the row before it
            raise ValueError("the prompt is no token: a response is scored from the tokens "
                             "before it.")  # fmt: skip
        if prompt >= data.max_length:
            raise ValueError(f"the prompt is {prompt} tokens, leaving no room for a "
                             f"response within data.max_length {data.max_length}.")  # fmt: skip
        sides = [side[: data.max_length] for side in sides]
        places = [(n, i) for n, side in enumerate(sides, 1) for i in range(len(side))]
        return {
            "input_ids": tokens([t for side in sides for t in side]),
            SEGMENT_IDS: tokens([n for n, _ in places]),
            "positions": tokens([i for _, i in places]),
            "loss_mask": tokens([int(i >= prompt) for _, i in places]),
        }

    def targets(self, example: Example) -> int:
        return 1  # the pair: `encode` keeps a response token on each side

    def packs(self, data: DataFields) -> bool:
        return data.pack

    def batch_shapes(self, data: DataFields, rows: int) -> Shapes:
        spec = ((rows, self.row_length(data)), np.dtype(np.int32))
        shapes = dict.fromkeys(("input_ids", SEGMENT_IDS, "positions", "loss_mask"), spec)
        if self._precomputed():
            shapes[REFERENCE] = (spec[0], np.dtype(np.float32))
        return shapes

    def _precomputed(self) -> bool:
        """Whether examples carry the reference's log-probs (SimPO uses none)."""
        s = self.settings
        return s is not None and s.precompute_reference and s.loss != "simpo"

    def num_labels(self, configured: int | None) -> int | None:
        return None

    def check_model(self, architecture: type, arch: str, model_dir: str) -> None:
        decoder_only(self.name, architecture, arch, model_dir)

    def loss_terms(self, apply: Callable, params: Any, batch: Mapping[str, jax.Array],
                   rngs: Any = None) -> Terms:  # fmt: skip
        """(summed pair loss, pairs, pairs whose chosen reward is higher, TRL's metrics as
        sums): rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
        logps/chosen, logps/rejected."""
        if (s := self.settings) is None:
            raise ValueError("the dpo task's loss needs its settings: TASKS['dpo'].bound(config)")
        logps, counts = _pair_logps(apply, params, batch, rngs)
        # The reference: the base alone (its adapter leaves left out; no dropout), unless
        # the batch carries its log-probs (training batches, with precompute_reference).
        if s.loss == "simpo":
            reference = None
        elif REFERENCE in batch:
            reference = by_side(batch[REFERENCE], batch[SEGMENT_IDS], _slots(batch))
        else:
            reference = _pair_logps(apply, split(params, LoraConfig())[1], batch)[0]
        losses, rewards = pair_losses(s.loss, logps, counts, reference, beta=s.beta,
                                      label_smoothing=s.label_smoothing,
                                      simpo_gamma=s.simpo_gamma)  # fmt: skip
        # A slot holds a pair where its chosen side has response tokens (`encode` keeps one
        # on each side); an eval's padding rows weigh 0.
        weight = (counts[:, 0] > 0) * jnp.repeat(row_weights(batch), _slots(batch))
        sums = pair_metrics(rewards, logps, weight)
        return jnp.sum(losses * weight), jnp.sum(weight), sums["rewards/accuracies"], sums

    def row_values(self, run: Trained, between: Callable[[], None]) -> dict[str, np.ndarray]:
        """With precompute_reference: each training pair's reference log-probs (the base's),
        in one forward pass over the split; they cost 8 bytes a pair on each process."""
        if not self._precomputed():
            return {}

        def pair_by_row(base: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
            rows = batch["input_ids"].shape[0]  # unpacked: each row's pair in its first slot
            return _pair_logps(run.apply, base, batch)[0].reshape(rows, -1, 2)[:, 0]

        return {REFERENCE: run.per_row("train", pair_by_row, "reference log-probs", between)}

    def finish(self, run: Trained, adapter: Any, log: Callable[[str], None]) -> None:
        """Nothing beyond the eval's metrics."""


def _pair_tokens(row: Mapping[str, Any], tokenizer: Tokenizer,
                 data: DataFields) -> tuple[int, list[list[int]]]:  # fmt: skip
    """(the prompt's length, [prompt + chosen, prompt + rejected] tokens), uncut. Text rows:
    the template's prompt, then each response and EOS tokenized apart (as SFT does).
    Conversational rows: each whole conversation by the chat template, the prompt the
    tokens the two share with the prompt alone (as TRL takes it: a template may render a
    prompt alone differently, e.g. an empty thought block after the generation prompt)."""
    sides = (data.chosen_field, data.rejected_field)
    if not is_conversation(row[data.chosen_field]):
        prompt = tokenizer(data.template.format(**row))
        return len(prompt), [prompt + response_tokens(row[f], tokenizer) for f in sides]
    messages = row[template_fields(data.template)[0]]
    prompt = tokenizer.chat(messages, add_generation_prompt=True)
    whole = [tokenizer.chat([*messages, *row[f]]) for f in sides]
    return min(_shared(prompt, w) for w in whole), whole


def _shared(a: list[int], b: list[int]) -> int:
    """How many leading tokens two token lists have in common."""
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def _pair_logps(apply: Callable, params: Any, batch: Mapping[str, jax.Array],
                rngs: Any = None) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """(summed response log-probs, response tokens), each (rows * slots, 2): chosen,
    rejected (`preference.side_logps`); float32."""
    inputs = [batch[k] for k in ("input_ids", SEGMENT_IDS, "positions")]
    hidden = apply(params, *inputs, rngs=rngs, method="hidden")
    head = functools.partial(apply, params, rngs=rngs, method="head")
    logps = token_logps(head, hidden[:, :-1], batch["input_ids"][:, 1:])
    return side_logps(logps, batch[SEGMENT_IDS][:, 1:], batch["loss_mask"][:, 1:], _slots(batch))


def _slots(batch: Mapping[str, jax.Array]) -> int:
    """Pair slots a row: as many as it could hold (a pair takes two tokens at least)."""
    return (batch["input_ids"].shape[1] + 1) // 2
