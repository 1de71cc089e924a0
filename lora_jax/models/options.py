"""The names a config file or command line uses for a model's run-time options: param dtypes
and remat policies. Apart from the zoo, so that `lora_jax.settings` can check a config
without importing any model."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# dtype names as config files and command lines write them (model.dtype, --dtype).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# The name every projection's output (adapter included) carries inside a zoo model.
PROJECTION = "lora_jax.projection"

# Named remat policies (`remat=` on every model): what the backward pass may keep.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    # Each projection's output, adapter included, and nothing else: the backward recomputes
    # norms, attention and the adapters' rank-r products, never a projection's matmul. JAX's
    # "dots" policies keep attention's scores and each adapter's (x·A)·B as well.
    "projections": jax.checkpoint_policies.save_only_these_names(PROJECTION),
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
