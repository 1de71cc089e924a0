"""Training checkpoints with orbax: adapter, optimizer state, step and data-iterator state.

Saved asynchronously every N steps, keeping the last K. Orbax writes each step to a
temporary directory and renames it when complete, so a half-written step is never listed;
a listed step that fails to load (corrupted) is skipped with a warning for the one before.
The frozen base is never written: it comes from the base checkpoint on every start.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp


class Checkpoints:
    """Save and restore the trained state of one run directory."""

    def __init__(self, directory: str | Path, every: int, keep: int):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=max(every, 1), enable_async_checkpointing=True
        )
        self.every, self.written = every, set()
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

    def save(self, step: int, state: Any, data_state: dict[str, int], force: bool = False) -> None:
        """Starts writing `state` (adapter + optimizer) at `step` in the background. A step this
        run already wrote is not written twice; one an earlier run left (e.g. the unreadable
        newest that a resume skipped) is replaced. A failed earlier write stops the run here."""
        if step in self.written or not (force or (self.every and step % self.every == 0)):
            return
        try:
            self.manager.check_for_errors()
            if step in self.manager.all_steps():
                self.manager.delete(step)
            args = ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
            )
            self.manager.save(step, args=args, force=True)
        except Exception as err:  # orbax raises many kinds; the run cannot go on without them
            raise OSError(f"writing the checkpoint of step {step} in {self.manager.directory} "
                          f"failed: {type(err).__name__}: {err}") from err  # fmt: skip
        self.written.add(step)

    def restore_latest(self, like: Any) -> tuple[int, Any, dict[str, int]] | None:
        """(step, state, data state) of the newest readable checkpoint, laid out like `like`
        (arrays with their shardings), or None when there is none."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        for step in sorted(self.manager.all_steps(), reverse=True):
            args = ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
            )
            try:
                restored = self.manager.restore(step, args=args)
            except Exception as err:  # any failure to read means: not this one
                warnings.warn(
                    f"checkpoint at step {step} in {self.manager.directory} cannot be read "
                    f"({type(err).__name__}: {str(err)[:200]}); trying an older one.",
                    stacklevel=2,
                )
                continue
            if not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(restored.state)):
                warnings.warn(f"checkpoint at step {step} in {self.manager.directory} holds "
                              "non-finite values; trying an older one.", stacklevel=2)  # fmt: skip
                continue
            return step, restored.state, dict(restored.data)
        return None

    def close(self) -> None:
        """Waits for writes in flight, then releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
