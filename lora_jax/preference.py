"""Preference losses as pure functions of log-probs: a pair's two sides summed from per-token
log-probs, DPO's sigmoid loss (and conservative DPO's label smoothing), IPO and SimPO, and
TRL's reward metrics. The `dpo` task (`lora_jax.tasks.Dpo`) takes them; so can a notebook,
with log-probs from any model.

Every array is (pairs, 2): a pair's chosen side, then its rejected side.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

LOSSES = ("sigmoid", "ipo", "simpo")


def side_logps(logps: jax.Array, segments: jax.Array, mask: jax.Array,
               pairs: int) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """(summed log-probs, token counts) of each pair's two sides, each (rows * pairs, 2), from
    per-token `logps` (rows, T), `segments` and `mask` (a response token). A row's pair k is
    its segments 2k - 1 (chosen) and 2k (rejected): a packed row holds several; `pairs`
    slots a row, those with no pair summing to 0 with count 0."""
    response = mask > 0
    return (by_side(jnp.where(response, logps, 0.0), segments, pairs),
            by_side(response.astype(jnp.float32), segments, pairs))  # fmt: skip


def by_side(values: jax.Array, segments: jax.Array, pairs: int) -> jax.Array:
    """`values` (rows, T) summed over each pair side's tokens (`side_logps`' slots): (rows *
    pairs, 2). Segment 0 (padding) is left out."""
    # Row by row (vmap): the rows stay on the devices that hold them.
    one_row = functools.partial(jax.ops.segment_sum, num_segments=2 * pairs + 1)
    sums = jax.vmap(one_row)(values, segments)
    return sums[:, 1:].reshape(-1, 2)


def pair_losses(loss: str, logps: jax.Array, counts: jax.Array, reference: jax.Array | None,
                *, beta: float, label_smoothing: float = 0.0,
                simpo_gamma: float = 0.5) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """(each pair's loss (pairs,), the implicit rewards (pairs, 2), not differentiated).
    sigmoid: -log σ(βΔ) with Δ the chosen minus rejected log-ratio against `reference`
    (smoothed: cDPO); ipo: (Δ per token - 1/2β)², as TRL takes it; simpo: reference-free,
    -log σ(βΔ_avg - gamma) on length-normalised log-probs (`reference` unused: pass None)."""
    if loss not in LOSSES:
        raise ValueError(f"preference loss {loss!r}: choose one of {', '.join(LOSSES)}.")
    counts = jnp.maximum(counts, 1.0)  # an empty slot (weight 0) divides by 1, not 0
    if loss == "simpo":
        scores = logps / counts
    elif reference is None:
        raise ValueError(f"the {loss} loss compares against a reference: pass its log-probs.")
    else:
        scores = logps - jax.lax.stop_gradient(reference)
    delta = scores[:, 0] - scores[:, 1]
    if loss == "sigmoid":
        losses = (-(1 - label_smoothing) * jax.nn.log_sigmoid(beta * delta)
                  - label_smoothing * jax.nn.log_sigmoid(-beta * delta))  # fmt: skip
    elif loss == "ipo":
        per_token = scores / counts
        losses = (per_token[:, 0] - per_token[:, 1] - 1 / (2 * beta)) ** 2
    else:
        losses = -jax.nn.log_sigmoid(beta * delta - simpo_gamma)
    return losses, jax.lax.stop_gradient(beta * scores)


def pair_metrics(rewards: jax.Array, logps: jax.Array, weight: jax.Array) -> dict[str, jax.Array]:
    """TRL's six metrics as sums over the pairs, each pair weighted by `weight` (pairs,):
    rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen,
    logps/rejected. Divide by the summed weight for TRL's means."""
    won = (rewards[:, 0] > rewards[:, 1]).astype(jnp.float32)
    sums = {
        "rewards/chosen": rewards[:, 0],
        "rewards/rejected": rewards[:, 1],
        "rewards/accuracies": won,
        "rewards/margins": rewards[:, 0] - rewards[:, 1],
        "logps/chosen": logps[:, 0],
        "logps/rejected": logps[:, 1],
    }
    return {name: jax.lax.stop_gradient(jnp.sum(value * weight)) for name, value in sums.items()}
