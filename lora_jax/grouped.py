"""A Dense layer with one kernel per group of rows: a mixture of experts' expert projections.

Rows arrive sorted by group (the tokens routed to expert 0, then expert 1, ...) with the
group sizes, and each group is multiplied by its own kernel only: a dense product of every
row with every kernel would cost E/k times the FLOPs. On TPU and GPU that is
`jax.lax.ragged_dot`; XLA's CPU lowering of ragged_dot is exactly that dense masked product
(every row times every group's kernel), so on the CPU the rows run in blocks, each group's
rows padded to whole blocks and each block times its group's kernel (`_blocked_dot`). The
platform is picked when the program is lowered (`jax.lax.platform_dependent`), so a step
compiled ahead of time for a TPU on a CPU host gets ragged_dot. `lj.lora_apply` adapts each
group's kernel with its own factors, inside the same grouped products (`lora_jax.apply`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# The CPU path's largest block of rows: big enough for an efficient matmul, small enough that
# padding each group to whole blocks adds little.
BLOCK = 128


def grouped_dot(x: jax.Array, kernels: jax.Array, group_sizes: jax.Array, precision=None):
    """Rows of x (T, in), sorted by group, each times its group's kernel of (G, in, out);
    rows past the groups' total get zeros."""

    def ragged(x, kernels, group_sizes):
        return jax.lax.ragged_dot(x, kernels, group_sizes, precision=precision)

    def blocked(x, kernels, group_sizes):
        return _blocked_dot(x, kernels, group_sizes, precision)

    return jax.lax.platform_dependent(x, kernels, group_sizes, cpu=blocked, default=ragged)


def _blocked_dot(x: jax.Array, kernels: jax.Array, sizes: jax.Array, precision) -> jax.Array:
    """`grouped_dot` in blocks of rows: each group's rows are laid out from a block boundary
    (at most G·(block − 1) rows of padding in all), and a scan multiplies each block by its
    group's kernel, so the FLOPs are those of the rows routed, not of every row x every group."""
    rows, groups = x.shape[0], kernels.shape[0]
    block = int(min(BLOCK, max(8, _power_of_two(-(-rows // groups)))))
    blocks = -(-(rows + groups * (block - 1)) // block)  # a static bound on the blocks used
    padded = -(-sizes // block) * block  # each group's rows rounded up to whole blocks
    ends = jnp.cumsum(padded)
    first = jnp.arange(blocks) * block
    # Each block's group: how many groups end at or before its first row (G: past them all).
    # A comparison, not jnp.searchsorted, which fails inside shard_map (JAX 0.10).
    group = jnp.sum(ends[None, :] <= first[:, None], axis=1)
    g = jnp.minimum(group, groups - 1)
    offset = first[:, None] + jnp.arange(block) - (ends - padded)[g][:, None]
    real = (group < groups)[:, None] & (offset < sizes[g][:, None])
    source = jnp.where(real, (jnp.cumsum(sizes) - sizes)[g][:, None] + offset, rows)
    x_blocks = jnp.where(real[..., None], x[jnp.minimum(source, rows - 1)], 0)

    def one(_, block_and_group):
        rows_of, k = block_and_group
        return None, jnp.dot(rows_of, kernels[k], precision=precision)

    _, y_blocks = jax.lax.scan(one, None, (x_blocks, g))
    y = jnp.zeros((rows, kernels.shape[-1]), y_blocks.dtype)
    return y.at[source.reshape(-1)].set(y_blocks.reshape(-1, y.shape[-1]), mode="drop")


def _power_of_two(n: int) -> int:
    """The least power of two >= n."""
    return 1 << max(0, int(n - 1).bit_length())


class GroupedDense(nn.Module):
    """y[t] = x[t] · kernel[g(t)], for rows sorted by group g and `group_sizes` (G,) rows per
    group (the trailing rows past their sum get zeros); the kernel is (groups, in, features)."""

    features: int
    groups: int
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Any = nn.initializers.lecun_normal(batch_axis=(0,))

    @nn.compact
    def __call__(self, inputs: jax.Array, group_sizes: jax.Array) -> jax.Array:
        shape = (self.groups, inputs.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        x, kernel = nn.dtypes.promote_dtype(inputs, kernel, dtype=self.dtype)
        return grouped_dot(x, kernel, group_sizes, self.precision)
