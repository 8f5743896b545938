"""Writing a GGUF file atomically: a hidden temporary file beside the target, renamed over it at the end."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import gguf

from quantkit.formats.output import OUTPUT_FORMATS, OutputFormat, refuse_integer_schemes

if TYPE_CHECKING:
    from quantkit.plan import QuantPlan


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


class GgufFormat(OutputFormat):
    """One llama.cpp GGUF file at ``--out`` (k-quants and float weights), with the report beside it."""

    name = "gguf"

    def check(self, plan: QuantPlan) -> None:
        refuse_integer_schemes(plan, self.name)


OUTPUT_FORMATS.add(GgufFormat.name, GgufFormat())
