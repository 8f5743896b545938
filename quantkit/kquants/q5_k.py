"""Q5_K: 256-weight super-blocks of eight 32-weight sub-blocks, 5-bit codes with a scale and a min each.

Byte table (176 bytes per super-block)::

    offset  size  field
    0       2     d       fp16 super-scale of the sub-block scales
    2       2     dmin    fp16 super-scale of the sub-block mins
    4       12    scales  eight 6-bit scales and eight 6-bit mins, packed as in Q4_K
    16      32    qh      high code bits: bit 2*g of byte l is weight 64*g + l,
                          bit 2*g + 1 is weight 64*g + 32 + l (g = 0..3)
    48      128   qs      low 4 code bits, laid out as Q4_K's qs

    +------+---------+--------------+----------------------+-------------------------------+
    | d:2  | dmin:2  | scales: 12   | qh: 32 (256 x 1 bit) | qs: 128 (256 x 4-bit)         |
    +------+---------+--------------+----------------------+-------------------------------+

    qh byte l     7    6    5    4    3    2    1    0
                  224+l 192+l 160+l 128+l 96+l 64+l 32+l  l     (weight whose bit 4 it holds)

Weight in sub-block ``j`` decodes to ``d*sc[j] * (low | high << 4) - dmin*m[j]``.

Encoders: without importance ggml's ``quantize_row_q5_K_ref`` (``make_qkx2_quants``, nmax 31); with
importance ``quantize_row_q5_K_impl`` (``make_qkx3_quants`` and ``make_qp_quants``), as for Q4_K.
"""

from __future__ import annotations

import gguf
import numpy as np

from quantkit.kquants.base import BLOCK_FORMATS, QK_K, BlockFormat
from quantkit.kquants.ggml_math import F32, from_fp16
from quantkit.kquants.q4_k import N_SUB, SUB, encode_k4, unpack_scales_k4
from quantkit.kquants.search_qkx import encode_in_pieces

_BIT = (np.uint8(1) << np.arange(8, dtype=np.uint8)).reshape(1, 4, 2, 1)


class Q5_K(BlockFormat):
    name = "Q5_K"
    ggml_type = gguf.GGMLQuantizationType.Q5_K

    def encode_rows(self, rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        return encode_in_pieces(rows, importance, self.type_size, self._encode_piece)

    def _encode_piece(self, x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
        head, codes = encode_k4(x, qw, 31, (-0.5, 0.1, 15), True)
        pairs = codes.reshape(-1, 4, 2, 32)
        high_bits = np.bitwise_or.reduce(np.where(pairs > 15, _BIT, np.uint8(0)), axis=(1, 2))
        low = pairs & np.uint8(0x0F)
        return np.concatenate([head, high_bits, (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)], axis=1)

    def decode_blocks(self, blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        sc, mn = unpack_scales_k4(blocks[:, 4:16])
        d = (from_fp16(blocks[:, 0:2])[:, None] * sc.astype(F32)).reshape(n, N_SUB, 1)
        dm = (from_fp16(blocks[:, 2:4])[:, None] * mn.astype(F32)).reshape(n, N_SUB, 1)
        ql = blocks[:, 48:].reshape(n, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        qh = blocks[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
        q = (ql & np.uint8(0x0F)).reshape(n, N_SUB, SUB) | ((qh & np.uint8(1)) << np.uint8(4))
        return (d * q.astype(F32) - dm).reshape(n, QK_K)


BLOCK_FORMATS.add("Q5_K", Q5_K())
