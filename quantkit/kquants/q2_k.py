"""Q2_K: 256-weight super-blocks of sixteen 16-weight sub-blocks, 2-bit codes with a 4-bit scale and min.

Byte table (84 bytes per super-block)::

    offset  size  field
    0       16    scales  byte j: sub-block j's scale code (low nibble) and min code (high nibble)
    16      64    qs      2-bit codes: bits 2k..2k+1 of byte 32*h + l hold weight 128*h + 32*k + l
    80      2     d       fp16 super-scale of the scale codes
    82      2     dmin    fp16 super-scale of the min codes

    +--------------------+--------------------------------+------+---------+
    | scales: 16         | qs: 64 (256 x 2-bit)           | d:2  | dmin:2  |
    +--------------------+--------------------------------+------+---------+

    scales byte j   7 6 5 4 | 3 2 1 0        qs byte 32*h + l   7 6 | 5 4 | 3 2 | 1 0
                    m[j]    | sc[j]                             k=3 | k=2 | k=1 | k=0

Weight in sub-block ``j`` decodes to ``d*sc[j] * q - dmin*m[j]``.

Encoders: without importance ggml's ``quantize_row_q2_K_ref`` (``make_qkx2_quants`` weighted by
``|x|``, least absolute error, scales quantised against their maximum); with importance
``quantize_row_q2_K_impl`` (``make_qkx3_quants`` weighted by ``importance * sqrt(sigma2 + x^2)``,
scales and mins quantised by ``make_qp_quants``).
"""

from __future__ import annotations

import gguf
import numpy as np

from quantkit.kquants.base import BLOCK_FORMATS, QK_K, BlockFormat
from quantkit.kquants.ggml_math import F32, from_fp16, nearest_int, to_fp16
from quantkit.kquants.search_qkx import (
    encode_in_pieces,
    make_qkx_quants,
    make_qp_quants_pair,
    positive_max,
    requantize_with_mins,
    seq_sum,
)

SUB = 16  # weights per sub-block
TYPE_SIZE = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q2_K][1]  # 84 bytes per super-block
N_SUB = QK_K // SUB
_SHIFT = np.array([0, 2, 4, 6], dtype=np.uint8)


def encode_q2_k(blocks: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """float32 super-blocks ``[nb, 256]`` (and their importance) -> Q2_K bytes ``[nb, 84]``."""
    nb = blocks.shape[0]
    x = np.ascontiguousarray(blocks.reshape(nb, N_SUB, SUB).transpose(2, 1, 0))  # [element, sub-block, block]
    if importance is None:
        scales, mins, codes = make_qkx_quants(x.reshape(SUB, -1), np.abs(x).reshape(SUB, -1), 3, -0.5, 0.1, 15, True)
        scales, mins = scales.reshape(N_SUB, nb), mins.reshape(N_SUB, nb)
        max_scale, max_min = positive_max(scales), positive_max(mins)
        ls = nearest_int(np.where(max_scale > 0, F32(15) / max_scale, F32(0)) * scales)
        lm = nearest_int(np.where(max_min > 0, F32(15) / max_min, F32(0)) * mins)
        ls = np.where(max_scale > 0, ls, 0)
        lm = np.where(max_min > 0, lm, 0)
        d_block, m_block = max_scale / F32(15), max_min / F32(15)
    else:
        sigma2 = seq_sum(np.ascontiguousarray((blocks * blocks).T)) / F32(QK_K)
        qw = np.ascontiguousarray(importance.reshape(nb, N_SUB, SUB).transpose(2, 1, 0))
        weights = qw * np.sqrt(sigma2 + x * x)
        sw = seq_sum(weights)
        scales, mins, codes = make_qkx_quants(x.reshape(SUB, -1), weights.reshape(SUB, -1), 3, -0.9, 0.05, 36, False)
        d_block, ls, m_block, lm = make_qp_quants_pair(scales.reshape(N_SUB, nb), mins.reshape(N_SUB, nb), sw, 15)

    out = np.empty((nb, TYPE_SIZE), dtype=np.uint8)
    out[:, :16] = ((ls | (lm << 4)) & 0xFF).T
    out[:, 80:82] = to_fp16(d_block)[:, None].view(np.uint8)
    out[:, 82:84] = to_fp16(m_block)[:, None].view(np.uint8)
    d = from_fp16(out[:, 80:82])[:, None] * (out[:, :16] & 0xF).astype(F32)
    dm = from_fp16(out[:, 82:84])[:, None] * (out[:, :16] >> 4).astype(F32)
    codes = requantize_with_mins(x.reshape(SUB, -1), d.T.reshape(-1), dm.T.reshape(-1), codes, 3)
    quads = codes.reshape(SUB, N_SUB, nb).transpose(2, 1, 0).reshape(nb, 2, 4, 32).astype(np.uint8)
    out[:, 16:80] = np.bitwise_or.reduce(quads << _SHIFT.reshape(1, 1, 4, 1), axis=2).reshape(nb, 64)
    return out


class Q2_K(BlockFormat):
    name = "Q2_K"
    ggml_type = gguf.GGMLQuantizationType.Q2_K

    def encode_rows(self, rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        return encode_in_pieces(rows, importance, self.type_size, encode_q2_k)

    def decode_blocks(self, blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        scales = blocks[:, :16]
        dl = (from_fp16(blocks[:, 80:82])[:, None] * (scales & 0xF).astype(F32)).reshape(n, N_SUB, 1)
        ml = (from_fp16(blocks[:, 82:84])[:, None] * (scales >> 4).astype(F32)).reshape(n, N_SUB, 1)
        qs = (blocks[:, 16:80].reshape(n, 2, 1, 32) >> _SHIFT.reshape(1, 1, 4, 1)) & np.uint8(3)
        return (dl * qs.reshape(n, N_SUB, SUB).astype(F32) - ml).reshape(n, QK_K)


BLOCK_FORMATS.add("Q2_K", Q2_K())
