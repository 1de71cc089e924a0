"""The `lora-jax` command's entry point, kept light: it handles SIGINT / SIGTERM and picks
malloc's pages before anything slow (jax, the zoo) is imported, then runs `lora_jax.cli`."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

from lora_jax.signals import Interrupts

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


def entry() -> None:
    """The `lora-jax` command. `train` and `eval` restart once in the same process (same
    pid) with huge pages (`huge_pages_env`): glibc reads its tunables only at start-up. A
    signal while the command's modules load ends it with one line, as one later does."""
    if sys.argv[1:2] in (["train"], ["eval"]) and (env := huge_pages_env(os.environ)):
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    # A signal here is in `received`; its KeyboardInterrupt is not a traceback.
    with Interrupts() as interrupts, contextlib.suppress(KeyboardInterrupt):
        from lora_jax.cli import exit_with, main
    if interrupts.received:
        command = sys.argv[1] if len(sys.argv) > 1 else ""
        print(f"lora-jax {command}: interrupted", file=sys.stderr)
        sys.exit(128 + interrupts.received[0])
    exit_with(main())
