"""Writing files so that a stop at any moment leaves either the old file or the new one whole:
write under a temporary name beside the target, then rename (atomic on POSIX)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path`; when the block ends without an error, renames
    it onto `path`, else removes it and raises OSError naming `path` (a full disk, or a
    writer's own error type such as safetensors')."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except Exception as err:
        raise OSError(f"writing {path} failed: {type(err).__name__}: {err}") from err
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """`path` holding `text`, written atomically."""
    with atomic(path) as tmp:
        tmp.write_text(text)
    return Path(path)
