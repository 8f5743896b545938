"""Process memory: handing freed memory back to the operating system, and how much is available.

glibc's allocator keeps freed blocks for reuse, and after a large block is freed it raises its
``mmap`` threshold, so the next tensors of a few MB come from the heap, where freed space is
fragmented and is not returned. Quantizing a 2.75 GB MoE checkpoint tensor by tensor then grew
to 8.9 GB of anonymous memory; trimming after each source tensor kept it at 1.3 GB
(docs/scaling.md). Elsewhere (macOS, musl) this is a no-op.

:func:`available` is what the kernel says a process can still allocate without swapping
(``MemAvailable``: free memory plus reclaimable page cache), the basis of GPTQ's default memory budget.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache
from pathlib import Path
from typing import Any

MEMINFO = Path("/proc/meminfo")
CGROUP = Path("/sys/fs/cgroup")  # this process's cgroup when it runs in a container (cgroup v2)


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


def available() -> int | None:
    """Bytes a new allocation can still take without swapping: Linux ``MemAvailable``, lowered to what the
    process's cgroup (v2) limit leaves when one is set (containers); None where neither is known."""
    limits = [_meminfo_available(), _cgroup_headroom()]
    known = [b for b in limits if b is not None]
    return min(known) if known else None


def _meminfo_available() -> int | None:
    try:
        lines = MEMINFO.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # reported in kB
    return None


def _cgroup_headroom() -> int | None:
    try:
        limit = (CGROUP / "memory.max").read_text().strip()
        used = int((CGROUP / "memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0, int(limit) - used)
