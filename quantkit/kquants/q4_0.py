"""Q4_0: 32 weights as 4-bit codes with one fp16 scale (4.5 bits per weight).

Byte table (18 bytes per block)::

    offset  size  field
    0       2     d    fp16 scale; weight j = d * (q[j] - 8)
    2       16    qs   qs[j] = q[j] | q[j + 16] << 4, j = 0..15

    +------+--------------------------------------------+
    | d:2  | qs: 16 x (low nibble q[j], high q[j + 16]) |
    +------+--------------------------------------------+

Encoders: without importance ggml's reference ``d = max / -8`` (``max`` the signed value of largest
magnitude), ``q = MIN(15, (int8_t)(x * (1/d) + 8.5))``; with importance ``make_qx_quants(32, 8)`` weighted
by ``qw * sqrt(sigma2 + x*x)``, ``sigma2`` the row's mean square.
"""

from __future__ import annotations

import gguf
import numpy as np

from quantkit.kquants.base import BLOCK_FORMATS, BlockFormat
from quantkit.kquants.ggml_math import F32, from_fp16, to_fp16
from quantkit.kquants.search_qx import pack_nibbles, symmetric_32_tiles


class Q4_0(BlockFormat):
    name = "Q4_0"
    ggml_type = gguf.GGMLQuantizationType.Q4_0

    def encode_rows(self, rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        out = np.empty((rows.size // self.block_size, self.type_size), dtype=np.uint8)
        for blocks, d, codes in symmetric_32_tiles(rows, importance, 8):
            out[blocks, :2] = to_fp16(d)[:, None].view(np.uint8)
            out[blocks, 2:] = pack_nibbles(codes)
        return out.reshape(rows.shape[0], -1)

    def decode_blocks(self, blocks: np.ndarray) -> np.ndarray:
        d = from_fp16(blocks[:, :2])
        qs = blocks[:, 2:].reshape(-1, 1, 16) >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)
        q = (qs & 15).reshape(-1, 32).astype(np.int8) - np.int8(8)
        return d[:, None] * q.astype(F32)


BLOCK_FORMATS.add("Q4_0", Q4_0())
