"""Writing a GGUF file atomically: a hidden temporary file beside the target, renamed over it at the end."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import gguf


@contextmanager
def atomic_gguf(path: Path, make_writer: Callable[[Path], gguf.GGUFWriter]) -> Iterator[gguf.GGUFWriter]:
    """A writer (from ``make_writer(temporary path)``) whose file replaces ``path`` when the block completes.

    On any error or Ctrl-C inside the block the temporary file is removed and ``path`` is untouched.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    writer = make_writer(tmp)
    try:
        yield writer
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
