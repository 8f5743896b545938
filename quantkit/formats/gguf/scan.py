"""A bounded check of a GGUF file's structure before ``gguf.GGUFReader`` reads it.

GGUFReader trusts the counts it reads: an array that claims 2**60 elements past the end of a truncated
file makes it loop, reading empty views, for as long as the count says. This scan walks the same layout
(header, key/value pairs, tensor infos) with every count checked against the bytes left in the file,
and every tensor's data against the data section, so that the reader only ever sees a file whose counts
fit it. Nothing in a GGUF is executed; little-endian files only (what llama.cpp writes).

Layout (GGUF v2/v3, little-endian)::

    "GGUF" u32 version | u64 n_tensors | u64 n_kv
    n_kv x   (string key | u32 value type | value)      string = u64 length | bytes
    n_tensors x (string name | u32 n_dims | n_dims x u64 | u32 ggml type | u64 offset)
    padding to general.alignment (32) | tensor data
"""

from __future__ import annotations

import mmap
import struct
from collections import Counter
from pathlib import Path

import gguf

from quantkit.errors import QuantkitError

MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS


class _Truncated(Exception):
    pass


class _Cursor:
    """Reads little-endian values from ``data``, never past its end."""

    def __init__(self, data: mmap.mmap) -> None:
        self.data, self.pos = data, 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def skip(self, n: int) -> int:
        """Move past ``n`` bytes; returns where they start."""
        if n > self.left():
            raise _Truncated
        self.pos += n
        return self.pos - n

    def take(self, n: int) -> bytes:
        start = self.skip(n)
        return self.data[start : start + n]

    def u32(self) -> int:
        return int(struct.unpack("<I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack("<Q", self.take(8))[0])

    def string(self) -> bytes:
        return self.take(self.u64())


def check_gguf(path: Path) -> Counter[str]:
    """How many tensors of each ggml type ``path`` holds; a one-line error unless it is a GGUF whose every count
    and tensor fits the file."""
    try:
        with path.open("rb") as handle:
            if path.stat().st_size < 24:
                raise _Truncated
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _scan(_Cursor(data), path)
    except _Truncated:
        raise QuantkitError(f"{path} is truncated or not a GGUF file") from None
    except OSError as exc:
        raise QuantkitError(f"cannot read {path}: {exc.strerror or exc}") from None


def _scan(cursor: _Cursor, path: Path) -> Counter[str]:
    if cursor.take(4) != MAGIC:
        raise QuantkitError(f"{path} is not a GGUF file (no GGUF magic)")
    version = cursor.u32()
    if version not in _VERSIONS:
        raise QuantkitError(f"{path}: GGUF version {version} is not supported (versions 2 and 3 are)")
    n_tensors, n_kv = cursor.u64(), cursor.u64()
    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    for _ in _bounded(n_kv, 13, cursor, path):  # key length, type, smallest value
        key = cursor.string()
        kind = cursor.u32()
        if key == b"general.alignment" and kind == 4:
            alignment = cursor.u32()
        else:
            _skip_value(cursor, kind, path)
    if alignment == 0 or alignment & (alignment - 1):
        raise QuantkitError(f"{path}: general.alignment {alignment} is not a power of two")
    infos = [_tensor_info(cursor, path) for _ in _bounded(n_tensors, 24, cursor, path)]
    data_start = -(-cursor.pos // alignment) * alignment
    data_bytes = len(cursor.data) - data_start
    for name, _, n_bytes, offset in infos:
        if offset % alignment or offset + n_bytes > data_bytes:
            raise QuantkitError(f"{path}: tensor {name} lies outside the file's data (truncated file?)")
    return Counter(kind for _, kind, _, _ in infos)


def _bounded(count: int, min_size: int, cursor: _Cursor, path: Path) -> range:
    """``range(count)`` once ``count`` items of at least ``min_size`` bytes fit in what is left of the file."""
    if count * min_size > cursor.left():
        raise QuantkitError(f"{path} claims {count:,} entries, more than the file holds (truncated or corrupt GGUF)")
    return range(count)


def _skip_value(cursor: _Cursor, kind: int, path: Path) -> None:
    if kind in _SCALAR_SIZE:
        cursor.skip(_SCALAR_SIZE[kind])
    elif kind == _STRING:
        cursor.string()
    elif kind == _ARRAY:
        item = cursor.u32()
        count = cursor.u64()
        if item in _SCALAR_SIZE:
            cursor.skip(count * _SCALAR_SIZE[item])
            return
        for _ in _bounded(count, 8 if item == _STRING else 12, cursor, path):
            _skip_value(cursor, item, path)
    else:
        raise QuantkitError(f"{path}: unknown GGUF value type {kind} (corrupt GGUF)")


def _tensor_info(cursor: _Cursor, path: Path) -> tuple[str, str, int, int]:
    """(name, ggml type, data bytes, offset) of the next tensor info."""
    raw_name = cursor.string()
    name = raw_name.decode("utf-8", errors="replace")
    n_dims = cursor.u32()
    if not 1 <= n_dims <= _MAX_DIMS:
        raise QuantkitError(f"{path}: tensor {name} has {n_dims} dimensions (corrupt GGUF)")
    dims = [cursor.u64() for _ in range(n_dims)]
    kind = cursor.u32()
    offset = cursor.u64()
    try:
        ggml_type = gguf.GGMLQuantizationType(kind)
        block, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    except (ValueError, KeyError):
        raise QuantkitError(f"{path}: tensor {name} has unknown ggml type {kind}") from None
    if min(dims) < 1 or dims[0] % block:
        raise QuantkitError(f"{path}: tensor {name} has shape {dims}, not whole {block}-element blocks")
    n_elements = 1
    for dim in dims:
        n_elements *= dim
    return name, ggml_type.name, n_elements // block * type_size, offset
