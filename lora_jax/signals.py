"""SIGINT and SIGTERM, for the `lora-jax` command and the training loop: the command ends with
one line when a signal reaches it (`Interrupts`), and a training run checkpoints first
(`StopRequests`, then `Stopped`). Light: the entry point installs these before jax loads."""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
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
    step (`requested`, `signum`). A second SIGINT stops it at once, the usual way (the
    handler before these acts: KeyboardInterrupt); a second signal where either is a SIGTERM
    always ends the process at once, with one line, even where the main thread is inside a
    call that does not return (a collective, a wait on a disk), where Python's own handlers
    never run: a thread reads the signals off Python's wakeup file descriptor, which the C
    handler writes at once.
    `restore` puts the handlers before these back. The loop shares the request with the
    other processes of a run (`lora_jax.train`)."""

    def __init__(self) -> None:
        self.requested, self.signum = False, signal.SIGTERM  # SIGTERM: another process's
        self.previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        self._read, write = socket.socketpair()
        write.setblocking(False)
        self._wakeup = (write, signal.set_wakeup_fd(write.fileno(), warn_on_full_buffer=False))
        threading.Thread(target=self._watch, name="lora_jax-signals", daemon=True).start()

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.requested:
            self.requested, self.signum = True, signum
        elif signum == self.signum == signal.SIGINT:  # Ctrl-C twice: the previous handler
            self.restore()
            signal.raise_signal(signum)

    def _watch(self) -> None:
        """Ends the process at a second signal where either is a SIGTERM (the kernel may
        deliver two signals sent together in either order)."""
        seen: list[int] = []
        while chunk := self._read.recv(64):  # empty once `restore` closes the other end
            seen += chunk
            if len(seen) >= 2 and signal.SIGTERM in seen:
                sys.stderr.write("lora-jax: stopped at once by a second signal (SIGTERM); the "
                                 "steps since the last checkpoint are lost\n")  # fmt: skip
                sys.stderr.flush()
                os._exit(128 + signal.SIGTERM)

    def stopped(self, step: int, saved: str) -> Stopped:
        """The error a run stopped after `step` steps raises; `saved`: what it wrote."""
        name = signal.Signals(self.signum).name
        return Stopped(self.signum, f"stopped by {name} at step {step}: {saved}; --resume "
                       "continues")  # fmt: skip

    def restore(self) -> None:
        write, previous_fd = self._wakeup
        signal.set_wakeup_fd(previous_fd)
        write.close()
        for s, handler in self.previous.items():
            # None: a handler not set from Python (jax.distributed's preemption notifier).
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
