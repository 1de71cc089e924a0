"""Training checkpoints with orbax: adapter, optimizer state, step and data-iterator state.

Saved asynchronously every N steps, keeping the last K. Orbax writes each step to a
temporary directory and renames it when complete, so a half-written step is never listed;
a listed step that fails to load (corrupted) is skipped with a warning for the one before.
The frozen base is never written: it comes from the base checkpoint on every start.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from lora_jax.files import failure, is_remote, one_line_logs, path
from lora_jax.settings import DistributedSettings


class Checkpoints:
    """Save and restore the trained state of one run directory."""

    def __init__(
        self, directory: str | os.PathLike, every: int, keep: int,
        timeout_s: float = DistributedSettings.timeout_s,
    ):  # fmt: skip
        # `timeout_s`: how long a write waits for the other processes' shards, then fails.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=max(every, 1),
            enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(timeout_secs=max(int(timeout_s), 1)),
        )
        self.every, self.written = every, set()
        # Orbax's writer thread logs a failed write with its traceback; `check` raises the
        # same failure as one error at the next step, so the log keeps only its one line.
        one_line_logs("absl", "orbax")
        where = path(directory)  # orbax takes the path layer's paths, a bucket's too
        self.manager = ocp.CheckpointManager(where if is_remote(where) else where.resolve(),
                                             options=options)  # fmt: skip

    def save(self, step: int, state: Any, data_state: dict[str, Any], force: bool = False) -> None:
        """Called after every step: starts writing `state` (adapter + optimizer) at `step` in
        the background when it is due. A step this run already wrote is not written twice;
        one an earlier run left (e.g. the unreadable newest that a resume skipped) is
        replaced. A failed write stops the run at the first step after it fails, and at the
        latest before the next checkpoint starts."""
        due = step not in self.written and (force or (self.every and step % self.every == 0))
        self.check(wait=due)  # before a new write, the previous one ends (or fails)
        if not due:
            return
        try:
            if step in self.manager.all_steps():
                self.manager.delete(step)
            args = ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
            )
            self.manager.save(step, args=args, force=True)
        except Exception as err:  # orbax raises many kinds; the run cannot go on without them
            raise self._failed(step, err) from err
        self.written.add(step)

    def check(self, wait: bool = False) -> None:
        """Raises OSError, naming the step and the cause, if a background write failed;
        `wait`: for the writes in flight first."""
        try:
            if wait:
                self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as err:
            raise self._failed(max(self.written), err) from err

    def _failed(self, step: int, err: Exception) -> OSError:
        return OSError(f"writing the checkpoint of step {step} in {self.manager.directory} "
                       f"failed: {failure(err)}")  # fmt: skip

    def restore_latest(self, like: Any) -> tuple[int, Any, dict[str, Any]] | None:
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
        """Waits for writes in flight, then releases the manager; a failed write raises."""
        try:
            self.check(wait=True)
        finally:
            self.manager.close()
