"""The train step as a library: any loss of a params tree, any optax transformation, explicit
shardings or none. `lora-jax train` builds its step with it; so can a notebook, with any Linen
model and no config file.

The step differentiates with respect to the adapter only (the frozen base is an argument,
never differentiated), sums gradients over micro-batches in a `lax.scan`, and donates the
adapter and optimizer state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lora_jax.config import LoraConfig
from lora_jax.tree import LORA, Params, combine, partition

# (params, batch, rngs) -> (summed loss, count): the step divides the sums over micro-batches
# once, so a padded or masked batch weighs each real example or token the same.
# A loss may add a third result, {name: summed value}: each reported as its sum / count.
Loss = Callable[[Params, Mapping[str, jax.Array], Any], tuple]


@dataclasses.dataclass(frozen=True)
class StepShardings:
    """Where the step's arguments live: the adapter, its optimizer state (`opt_state_specs`
    lays it out like the adapter), the base, the batch, and scalars."""

    adapter: Any
    opt_state: Any
    base: Any
    batch: Any
    scalar: Any


def opt_state_shardings(
    tx: optax.GradientTransformation, adapter: Params, adapter_shardings: Any, scalar: Any
) -> Any:
    """The optimizer state laid out like the adapter (e.g. Adam's moments), scalars as
    `scalar`, so the step compiles once and keeps the state where its params are."""
    return optax.tree_map_params(
        tx,
        lambda _, s: s,
        jax.eval_shape(tx.init, adapter),
        adapter_shardings,
        transform_non_params=lambda _: scalar,
    )


def factors_only(
    tx: optax.GradientTransformation, adapter: Params, config: LoraConfig, frozen: bool
) -> optax.GradientTransformation:
    """`tx` with the LoRA factors' gradients and updates zeroed when `frozen` (a head-only
    phase that trains only `modules_to_save`, e.g. a linear probe first). The factors are the
    leaves `lj.partition` labels trained once modules_to_save are set aside. Both values of
    `frozen` give the same state structure, so the phases share one optimizer state."""
    labels = partition(adapter, dataclasses.replace(config, modules_to_save=()))
    mask = jax.tree.map(lambda label: label == LORA, labels)
    gate = optax.masked(optax.set_to_zero() if frozen else optax.identity(), mask)
    return optax.chain(gate, tx, gate)


def _chunked(chunk: int, hidden: jax.Array, *per_token: jax.Array) -> tuple:
    """`hidden` (B, T, D) and each (B, T) array of `per_token` flattened over tokens and
    padded with zeros (a weight of 0) to whole chunks: (chunks, chunk, ...) each, for a scan
    over chunks."""
    tokens = per_token[0].size
    chunk = min(chunk, tokens)
    pad = -tokens % chunk
    h = jnp.pad(hidden.reshape(tokens, -1), ((0, pad), (0, 0))).reshape(-1, chunk, hidden.shape[-1])
    return (h, *(jnp.pad(x.reshape(-1), (0, pad)).reshape(-1, chunk) for x in per_token))


def token_terms(
    head: Callable[[jax.Array], jax.Array],
    hidden: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    chunk: int = 1024,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(summed cross-entropy, summed weight, summed correct) of `targets` (B, T) given the
    final `hidden` states (B, T, D), applying `head` (hidden -> logits) to `chunk` tokens at a
    time under `jax.checkpoint`: float32 logits exist for one chunk only, forward and
    backward, never for the whole batch x vocabulary. A batch of one chunk is not
    checkpointed: its logits are the last thing the forward computes and the first the
    backward reads, so keeping them costs no peak memory and saves a second head matmul."""
    chunks = _chunked(chunk, hidden, targets, weights)

    def terms(h, t, w):
        logits = head(h).astype(jnp.float32)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, t)
        correct = (jnp.argmax(logits, -1) == t).astype(jnp.float32)
        return jnp.stack([jnp.sum(losses * w), jnp.sum(w), jnp.sum(correct * w)])

    per_chunk = terms if len(chunks[0]) == 1 else jax.checkpoint(terms)

    def add(total, xs):
        return total + per_chunk(*xs), None

    sums, _ = jax.lax.scan(add, jnp.zeros(3, jnp.float32), chunks)
    return sums[0], sums[1], sums[2]


def token_logps(
    head: Callable[[jax.Array], jax.Array], hidden: jax.Array, targets: jax.Array,
    chunk: int = 1024,
) -> jax.Array:  # fmt: skip
    """The float32 log-probability of each of `targets` (B, T) given `hidden` (B, T, D), the
    head applied a chunk of tokens at a time as in `token_terms` (a sequence's score, as
    preference losses take it, is their masked sum)."""
    h, t = _chunked(chunk, hidden, targets)

    def logps(h, t):
        logits = head(h).astype(jnp.float32)
        return -optax.softmax_cross_entropy_with_integer_labels(logits, t)

    per_chunk = logps if len(h) == 1 else jax.checkpoint(logps)
    out = jax.lax.map(lambda xs: per_chunk(*xs), (h, t))
    return out.reshape(-1)[: targets.size].reshape(targets.shape)


def make_step(
    loss: Loss,
    tx: optax.GradientTransformation,
    *,
    accum: int = 1,
    dropout_seed: int | None = None,
    metrics: Callable[[Mapping[str, jax.Array], jax.Array], dict[str, jax.Array]] | None = None,
    shardings: StepShardings | None = None,
    penalty: Callable[[Params], jax.Array] | None = None,
) -> Callable:
    """(adapter, opt_state, base, batch, step) -> (adapter, opt_state, metrics), jitted.

    `loss(combine(adapter, base), micro_batch, rngs)` gives (summed loss, count); the batch's
    leading axis splits into `accum` micro-batches (rows i, i + accum, ... in micro-batch i, so
    each device keeps its share of each). With `dropout_seed`, rngs = {"dropout": a key folded
    with the step}. Metrics: loss (sum / count), targets (the count: 0 where the batch held
    nothing to learn), grad_norm, the loss's own sums / count, and whatever
    `metrics(batch, step)` adds. `shardings` pins
    every argument and result (else jit decides); the adapter and optimizer state are donated.
    `penalty(adapter)` is a term added to the mean loss once a step (AdaLoRA's orthogonality,
    `lj.adalora_penalty`), reported as "penalty".
    """

    def step(adapter, opt_state, base, batch, step):
        rngs = None
        if dropout_seed is not None:
            rngs = {"dropout": jax.random.fold_in(jax.random.key(dropout_seed), step)}

        def value(a, mb):
            total, count, *sums = loss(combine(a, base), mb, rngs)
            return total, (count, sums[0] if sums else {})

        def micro(carry, mb):
            (total, aux), grads = jax.value_and_grad(value, has_aux=True)(adapter, mb)
            return jax.tree.map(jnp.add, carry, (grads, total, aux)), None

        micro_batches = jax.tree.map(
            lambda x: jnp.swapaxes(x.reshape(-1, accum, *x.shape[1:]), 0, 1), batch
        )
        first = jax.tree.map(lambda x: x[0], micro_batches)
        shapes = jax.eval_shape(lambda: value(adapter, first))  # the loss's own sums
        zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (adapter, *shapes))
        (grads, total, (targets, sums)), _ = jax.lax.scan(micro, zero, micro_batches)
        count = jnp.maximum(targets, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        out = {"loss": total / count, "targets": targets, **{k: v / count for k, v in sums.items()}}
        if penalty is not None:
            out["penalty"], more = jax.value_and_grad(penalty)(adapter)
            grads = jax.tree.map(jnp.add, grads, more)
        updates, opt_state = tx.update(grads, opt_state, adapter)
        out["grad_norm"] = optax.tree.norm(grads)
        out.update(metrics(batch, step) if metrics else {})
        return optax.apply_updates(adapter, updates), opt_state, out

    if shardings is None:
        return jax.jit(step, donate_argnums=(0, 1))
    s = shardings

    def on_mesh(*args):  # the model may pin its activations to the mesh (constrain_batch)
        with jax.sharding.use_abstract_mesh(s.batch.mesh.abstract_mesh):
            return step(*args)

    return jax.jit(
        on_mesh,
        in_shardings=(s.adapter, s.opt_state, s.base, s.batch, s.scalar),
        out_shardings=(s.adapter, s.opt_state, s.scalar),
        donate_argnums=(0, 1),
    )
