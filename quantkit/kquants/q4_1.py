"""Q4_1: 32 weights as 4-bit codes with an fp16 scale and an fp16 minimum (5 bits per weight).

Byte table (20 bytes per block)::

    offset  size  field
    0       2     d    fp16 scale; weight j = d * q[j] + m
    2       2     m    fp16 minimum
    4       16    qs   qs[j] = q[j] | q[j + 16] << 4, j = 0..15

    +------+------+--------------------------------------------+
    | d:2  | m:2  | qs: 16 x (low nibble q[j], high q[j + 16]) |
    +------+------+--------------------------------------------+

Encoders: without importance ggml's reference ``d = (max - min) / 15``, ``m = min`` (the block's extremes),
``q = MIN(15, (int8_t)((x - min) * (1/d) + 0.5))``; with importance ``make_qkx3_quants(32, 15)`` weighted by
``qw * sqrt(sigma2 + x*x)``, ``sigma2`` the row's mean square. No k-quant preset or row fallback of
llama.cpp chooses Q4_1 (its Q4_0 file type with an imatrix puts it on the first eighth's ``ffn_down``);
it is here for ``--type`` and recipe rules.
"""

from __future__ import annotations

import gguf
import numpy as np

from quantkit.kquants.base import BLOCK_FORMATS, BlockFormat
from quantkit.kquants.ggml_math import F32, from_fp16, to_fp16
from quantkit.kquants.search_qkx import asymmetric_32_tiles
from quantkit.kquants.search_qx import pack_nibbles


class Q4_1(BlockFormat):
    name = "Q4_1"
    ggml_type = gguf.GGMLQuantizationType.Q4_1

    def encode_rows(self, rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        out = np.empty((rows.size // self.block_size, self.type_size), dtype=np.uint8)
        for blocks, d, m, codes in asymmetric_32_tiles(rows, importance, 15):
            out[blocks, :2] = to_fp16(d)[:, None].view(np.uint8)
            out[blocks, 2:4] = to_fp16(m)[:, None].view(np.uint8)
            out[blocks, 4:] = pack_nibbles(codes)
        return out.reshape(rows.shape[0], -1)

    def decode_blocks(self, blocks: np.ndarray) -> np.ndarray:
        d, m = from_fp16(blocks[:, :2]), from_fp16(blocks[:, 2:4])
        qs = blocks[:, 4:].reshape(-1, 1, 16) >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)
        q = (qs & 15).reshape(-1, 32).astype(F32)
        return d[:, None] * q + m[:, None]


BLOCK_FORMATS.add("Q4_1", Q4_1())
