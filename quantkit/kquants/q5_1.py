"""Q5_1: 32 weights as 5-bit codes with an fp16 scale and an fp16 minimum (6 bits per weight).

Byte table (24 bytes per block)::

    offset  size  field
    0       2     d    fp16 scale; weight j = d * q[j] + m
    2       2     m    fp16 minimum
    4       4     qh   uint32 (little-endian): bit j = q[j] >> 4, j = 0..31
    8       16    qs   qs[j] = (q[j] & 15) | (q[j + 16] & 15) << 4, j = 0..15

    +------+------+-------+--------------------------------------------+
    | d:2  | m:2  | qh:4  | qs: 16 x (low nibble q[j], high q[j + 16]) |
    +------+------+-------+--------------------------------------------+

Encoders: without importance ggml's reference ``d = (max - min) / 31``, ``m = min`` (the block's extremes),
``q = (uint8_t)((x - min) * (1/d) + 0.5)``; with importance ``make_qkx3_quants(32, 31)`` weighted by
``qw * sqrt(sigma2 + x*x)``, ``sigma2`` the row's mean square. llama.cpp's row fallback for Q5_K.
"""

from __future__ import annotations

import gguf
import numpy as np

from quantkit.kquants.base import BLOCK_FORMATS, BlockFormat
from quantkit.kquants.ggml_math import F32, from_fp16, to_fp16
from quantkit.kquants.q5_0 import pack_high_bits
from quantkit.kquants.search_qkx import asymmetric_32_tiles
from quantkit.kquants.search_qx import pack_nibbles


class Q5_1(BlockFormat):
    name = "Q5_1"
    ggml_type = gguf.GGMLQuantizationType.Q5_1

    def encode_rows(self, rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        out = np.empty((rows.size // self.block_size, self.type_size), dtype=np.uint8)
        for blocks, d, m, codes in asymmetric_32_tiles(rows, importance, 31):
            out[blocks, :2] = to_fp16(d)[:, None].view(np.uint8)
            out[blocks, 2:4] = to_fp16(m)[:, None].view(np.uint8)
            out[blocks, 4:8] = pack_high_bits(codes)
            out[blocks, 8:] = pack_nibbles(codes)
        return out.reshape(rows.shape[0], -1)

    def decode_blocks(self, blocks: np.ndarray) -> np.ndarray:
        d, m = from_fp16(blocks[:, :2]), from_fp16(blocks[:, 2:4])
        qh = np.ascontiguousarray(blocks[:, 4:8]).view("<u4")
        high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
        qs = blocks[:, 8:].reshape(-1, 1, 16) >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)
        q = ((qs & 15).reshape(-1, 32) | (high << 4)).astype(F32)
        return d[:, None] * q + m[:, None]


BLOCK_FORMATS.add("Q5_1", Q5_1())
