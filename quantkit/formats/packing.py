"""Dense bit packing of signed b-bit integers into int32 words (compressed-tensors layout).

Codes are offset to unsigned (``u = q + 2^(b-1)``) and laid end to end, element ``i`` of a
row starting at bit ``i * b`` (little-endian within and across words); an element may
straddle two words. Rows are padded to a multiple of 32 elements, so every 32 elements
fill exactly ``b`` words, and the result is truncated to ``ceil(cols * b / 32)`` words.

    b = 3, one 32-element chunk -> 3 words:
    word 0: | u10[0:2] | u9 | u8 | ... | u1 | u0 |       bits 31..0 (u10 straddles)
    word 1: | u21[0:1] | u20 | ... | u11 | u10[2] |
    word 2: | u31 | u30 | ... | u22 | u21[1:3] |
"""

from __future__ import annotations

import math

import torch

from quantkit.schemes.rows import row_blocks

_WORD = 32
_MASK32 = (1 << 32) - 1
_BLOCK_CODES = 1 << 20  # codes packed at once: about 40 MB of int64 temporaries


def _bit_layout(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of 32 elements in a chunk: its word index and bit offset within that word."""
    starts = torch.arange(_WORD, dtype=torch.int64) * bits
    return starts // _WORD, starts % _WORD


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack int8 signed ``codes`` (2-D) of ``bits`` bits into int32 along ``dim``.

    Lines (rows for ``dim=1``) are packed independently, a block of lines at a time, so the int64
    temporaries (about 40 bytes per code) stay within about ``_BLOCK_CODES`` codes.
    """
    if codes.dtype != torch.int8 or codes.ndim != 2:
        raise ValueError("pack_int32 takes a 2-D int8 tensor")
    lines = codes.T if dim == 0 else codes
    blocks = row_blocks(lines.shape[0], lines.shape[1], _BLOCK_CODES)
    packed = torch.cat([_pack_lines(lines[rows], bits) for rows in blocks])
    return (packed.T if dim == 0 else packed).contiguous()


def _pack_lines(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes`` (lines, cols) packed along the last dimension into int32 words."""
    values = codes.to(torch.int64) + (1 << (bits - 1))  # unsigned, (rows, cols)
    rows, cols = values.shape
    chunks = math.ceil(cols / _WORD)
    values = torch.nn.functional.pad(values, (0, chunks * _WORD - cols)).reshape(rows, chunks, _WORD)
    word, offset = _bit_layout(bits)
    words = torch.zeros(rows, chunks, bits + 1, dtype=torch.int64)  # one spare word for the spill
    words.scatter_add_(2, word.expand(rows, chunks, _WORD), (values << offset) & _MASK32)
    words.scatter_add_(2, (word + 1).expand(rows, chunks, _WORD), values >> (_WORD - offset))
    packed = words[:, :, :bits].reshape(rows, chunks * bits)[:, : math.ceil(cols * bits / _WORD)]
    return torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, shape: tuple[int, int], dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int8 signed codes of ``shape``."""
    if packed.dtype != torch.int32 or packed.ndim != 2:
        raise ValueError("unpack_int32 takes a 2-D int32 tensor")
    words = packed.to(torch.int64) & _MASK32
    rows, cols = shape
    if dim == 0:
        words, rows, cols = words.T, cols, rows
    chunks = math.ceil(cols / _WORD)
    words = torch.nn.functional.pad(words, (0, chunks * bits + 1 - words.shape[1]))
    word, offset = _bit_layout(bits)
    index = (torch.arange(chunks).unsqueeze(1) * bits + word).reshape(-1)  # (chunks * 32,)
    low = words[:, index] >> offset.repeat(chunks)
    high = words[:, index + 1] << (_WORD - offset.repeat(chunks))
    values = ((low | high) & ((1 << bits) - 1))[:, :cols] - (1 << (bits - 1))
    codes = values.to(torch.int8)
    return (codes.T if dim == 0 else codes).contiguous()
