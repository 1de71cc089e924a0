"""SIGINT and SIGTERM, for the `lora-jax` command and the training loop: the command ends with
one line when a signal reaches it (`Interrupts`), and a training run checkpoints first
(`StopRequests`, then `Stopped`). Light: the entry point installs these before jax loads."""

from __future__ import annotations

import signal
import sys
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(Exception):
    """A run stopped by a signal after writing its checkpoint; `--resume` continues it."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class Interrupts:
    """While active, SIGINT and SIGTERM raise KeyboardInterrupt and are remembered in
    `received`, so a command that a signal reached cannot end as if it had finished, even
    where the exception was swallowed (raised inside a finalizer, say). Restores the
    previous handlers on exit. Main thread only, as every signal handler."""

    def __enter__(self) -> Interrupts:
        self.received: list[int] = []
        self.previous = {s: signal.signal(s, self._raise) for s in SIGNALS}
        self.unraisable, sys.unraisablehook = sys.unraisablehook, self._unraisable
        return self

    def _raise(self, signum: int, frame: Any) -> None:
        self.received.append(signum)
        raise KeyboardInterrupt

    def _unraisable(self, unraisable: Any) -> None:
        # Python prints an exception it cannot raise (one in a finalizer) with a traceback;
        # ours is in `received` and will end the command with one line.
        if not issubclass(unraisable.exc_type, KeyboardInterrupt):
            self.unraisable(unraisable)

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        sys.unraisablehook = self.unraisable


class StopRequests:
    """While a run trains: SIGTERM / SIGINT ask it to checkpoint and stop after the current
    step (`requested`, `signum`); a second signal stops it at once, the usual way (the
    handlers before these act). `restore` puts those handlers back. The loop shares the
    request with the other processes of a run (`lora_jax.train`)."""

    def __init__(self) -> None:
        self.requested, self.signum = False, signal.SIGTERM  # SIGTERM: another process's
        self.previous = {s: signal.signal(s, self._handle) for s in SIGNALS}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # asked twice: the previous handler acts (KeyboardInterrupt, exit)
            self.restore()
            signal.raise_signal(signum)
            return
        self.requested, self.signum = True, signum

    def stopped(self, step: int, saved: str) -> Stopped:
        """The error a run stopped after `step` steps raises; `saved`: what it wrote."""
        name = signal.Signals(self.signum).name
        return Stopped(self.signum, f"stopped by {name} at step {step}: {saved}; --resume "
                       "continues")  # fmt: skip

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
