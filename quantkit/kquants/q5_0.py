"""Q5_0: 32 weights as 5-bit codes with one fp16 scale (5.5 bits per weight).

Byte table (22 bytes per block)::

    offset  size  field
    0       2     d    fp16 scale; weight j = d * (q[j] - 16)
    2       4     qh   uint32 (little-endian): bit j = q[j] >> 4, j = 0..31
    6       16    qs   qs[j] = (q[j] & 15) | (q[j + 16] & 15) << 4, j = 0..15

    +------+-------+--------------------------------------------+
    | d:2  | qh:4  | qs: 16 x (low nibble q[j], high q[j + 16]) |
    +------+-------+--------------------------------------------+

Encoders: without importance ggml's reference ``d = max / -16``, ``q = MIN(31, (int8_t)(x * (1/d) + 16.5))``;
with importance ``make_qx_quants(32, 16)`` weighted by ``qw * sqrt(sigma2 + x*x)``, ``sigma2`` the row's
mean square.
"""

from __future__ import annotations

import gguf
import numpy as np

from quantkit.kquants.base import BLOCK_FORMATS, BlockFormat
from quantkit.kquants.ggml_math import F32, from_fp16, to_fp16
from quantkit.kquants.search_qx import pack_nibbles, symmetric_32_tiles

# Multiplying a word of eight 0/1 bytes by this gathers byte e's bit into bit 56 + e (no carries).
_GATHER_BITS = np.uint64(0x0102040810204080)


def pack_high_bits(codes: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1's ``qh``: bit j of a little-endian uint32 = bit 4 of code j; codes uint8 ``[G, 32]`` -> ``[G, 4]``."""
    high = (codes.view(np.uint64) >> np.uint64(4)) & np.uint64(0x0101010101010101)  # 0/1 per byte
    return ((high * _GATHER_BITS) >> np.uint64(56)).astype(np.uint8)


class Q5_0(BlockFormat):
    name = "Q5_0"
    ggml_type = gguf.GGMLQuantizationType.Q5_0

    def encode_rows(self, rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        out = np.empty((rows.size // self.block_size, self.type_size), dtype=np.uint8)
        for blocks, d, codes in symmetric_32_tiles(rows, importance, 16):
            out[blocks, :2] = to_fp16(d)[:, None].view(np.uint8)
            out[blocks, 2:6] = pack_high_bits(codes)
            out[blocks, 6:] = pack_nibbles(codes)
        return out.reshape(rows.shape[0], -1)

    def decode_blocks(self, blocks: np.ndarray) -> np.ndarray:
        d = from_fp16(blocks[:, :2])
        qh = np.ascontiguousarray(blocks[:, 2:6]).view("<u4")
        high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
        qs = blocks[:, 6:].reshape(-1, 1, 16) >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)
        q = ((qs & 15).reshape(-1, 32) | (high << 4)).astype(np.int8) - np.int8(16)
        return d[:, None] * q.astype(F32)


BLOCK_FORMATS.add("Q5_0", Q5_0())
