"""Handing freed memory back to the operating system between tensors and layers.

glibc's allocator keeps freed blocks for reuse, and after a large block is freed it raises its
``mmap`` threshold, so the next tensors of a few MB come from the heap, where freed space is
fragmented and is not returned. Quantizing a 2.75 GB MoE checkpoint tensor by tensor then grew
to 8.9 GB of anonymous memory; trimming after each source tensor kept it at 1.3 GB
(docs/scaling.md). Elsewhere (macOS, musl) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def trim() -> None:
    """Return the allocator's free memory to the operating system (glibc ``malloc_trim``)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
