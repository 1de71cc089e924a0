"""The `lora-jax` command's entry point, kept light: it handles SIGINT / SIGTERM and picks
malloc's pages before anything slow (jax, the zoo) is imported, then runs `lora_jax.cli`."""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

HUGE_PAGES = "glibc.malloc.hugetlb=1"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_env(environ: Mapping[str, str], thp_mode: Path = THP_MODE) -> dict[str, str] | None:
    """`environ` with glibc's malloc asking for transparent huge pages, or None where that
    would change nothing: not glibc, the kernel's THP "never" or "always" (not "madvise"),
    or GLIBC_TUNABLES already saying. XLA's CPU runtime allocates a step's temporaries
    afresh on every call, so in 4 KiB pages each step page-faults all of them anew (the
    LoRA step of bench/train_throughput.py: 0.59-0.63 s in 4 KiB pages, 0.52-0.55 s in
    2 MiB ones)."""
    try:
        mode = thp_mode.read_text()
    except OSError:
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if platform.libc_ver()[0] != "glibc" or "[madvise]" not in mode or "malloc.hugetlb" in tunables:
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, (tunables, HUGE_PAGES)))}


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
        self.previous = {s: signal.signal(s, self._raise) for s in (signal.SIGINT, signal.SIGTERM)}
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


class WholeLines:
    """While active, sys.stderr keeps each thread's output whole, a line at a time: text is
    held per thread until its newline (or a progress bar's carriage return), then written in
    one piece. Background writer threads (orbax's, tensorstore's) print tracebacks while a
    command reports its failure; without this, pieces of their lines and of the command's
    one-line error interleave, and the error is no longer a line of its own.

    One traceback is dropped whole: tensorstore's callbacks into the event loop orbax has
    already closed after a failed checkpoint write (only asyncio's frames, ending in
    "RuntimeError: Event loop is closed"). The write's failure itself is the command's
    error line; these say nothing more, a dozen times over."""

    def __init__(self) -> None:
        self.lock, self.partial, self.held = threading.Lock(), {}, {}

    def __enter__(self) -> WholeLines:
        self.stream, sys.stderr = sys.stderr, self
        return self

    def write(self, text: str) -> int:
        with self.lock:
            thread = threading.get_ident()
            pending = self.partial.pop(thread, "") + text
            cut = max(pending.rfind("\n"), pending.rfind("\r")) + 1
            if cut:
                self.stream.write(self._unheld(thread, pending[:cut]))
                self.stream.flush()
            if pending[cut:]:
                self.partial[thread] = pending[cut:]
        return len(text)

    def _unheld(self, thread: int, lines: str) -> str:
        """`lines` less any traceback of a closed event loop (held until its last line)."""
        out = []
        for line in lines.splitlines(keepends=True):
            block = self.held.get(thread)
            if block is None and line.startswith("Traceback (most recent call last):"):
                self.held[thread] = [line]
            elif block is None:
                out.append(line)
            elif line[:1].isspace():
                block.append(line)
            else:  # the exception's line ends the traceback
                del self.held[thread]
                files = [b for b in block if b.lstrip().startswith("File ")]
                noise = line.strip() == "RuntimeError: Event loop is closed" and all(
                    f"{os.sep}asyncio{os.sep}" in f for f in files
                )
                out += [] if noise else [*block, line]
        return "".join(out)

    def flush(self) -> None:
        self.stream.flush()  # a line still open stays held: it is not whole yet

    def __getattr__(self, name: str) -> Any:  # encoding, isatty, fileno: the stream's
        return getattr(self.stream, name)

    def __exit__(self, *exc: Any) -> None:
        sys.stderr = self.stream
        with self.lock:
            for text in [*("".join(b) for b in self.held.values()), *self.partial.values()]:
                self.stream.write(text)
            self.partial.clear()
            self.held.clear()
        self.stream.flush()


def entry() -> None:
    """The `lora-jax` command. `train` and `eval` restart once in the same process (same
    pid) with huge pages (`huge_pages_env`): glibc reads its tunables only at start-up. A
    signal while the command's modules load ends it with one line, as one later does."""
    if sys.argv[1:2] in (["train"], ["eval"]) and (env := huge_pages_env(os.environ)):
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    # A signal here is in `received`; its KeyboardInterrupt is not a traceback.
    with Interrupts() as interrupts, contextlib.suppress(KeyboardInterrupt):
        from lora_jax.cli import main
    if interrupts.received:
        command = sys.argv[1] if len(sys.argv) > 1 else ""
        print(f"lora-jax {command}: interrupted", file=sys.stderr)
        sys.exit(128 + interrupts.received[0])
    sys.exit(main())
