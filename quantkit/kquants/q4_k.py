"""Q4_K: 256-weight super-blocks of eight 32-weight sub-blocks, 4-bit codes with a scale and a min each.

Byte table (144 bytes per super-block)::

    offset  size  field
    0       2     d       fp16 super-scale of the sub-block scales
    2       2     dmin    fp16 super-scale of the sub-block mins
    4       12    scales  eight 6-bit scales sc[j] and eight 6-bit mins m[j], packed (below)
    16      128   qs      4-bit codes: byte 32*g + l holds weight 64*g + l (low nibble)
                          and weight 64*g + 32 + l (high nibble), g = 0..3

    +------+---------+--------------+-------------------------------------+
    | d:2  | dmin:2  | scales: 12   | qs: 128 (256 x 4-bit)               |
    +------+---------+--------------+-------------------------------------+

    scales byte   7 6 | 5 4 3 2 1 0
    0..3          sc[j+4]>>4 | sc[j]        (j = byte)
    4..7          m[j]>>4    | m[j-4]       (j = byte)
    8..11         m[j-4]&15 (high nibble) | sc[j-4]&15 (low nibble)

Weight ``64*g + 32*h + l`` (sub-block ``j = 2*g + h``) decodes to ``d*sc[j] * q - dmin*m[j]``.

Encoders: without importance ggml's ``quantize_row_q4_K_ref`` (``make_qkx2_quants`` per sub-block,
weights ``rms + |x|``, scales quantised against their maximum); with importance
``quantize_row_q4_K_impl`` (``make_qkx3_quants`` weighted by ``importance * sqrt(sigma2 + x^2)``,
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

SUB = 32  # weights per sub-block
N_SUB = QK_K // SUB


def pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Scale and min codes (int ``[nb, 8]``, the C ``uint8_t`` values) -> the 12 packed bytes ``[nb, 12]``."""
    lo_s, hi_s, lo_m, hi_m = ls[:, :4], ls[:, 4:], lm[:, :4], lm[:, 4:]
    packed = np.concatenate(
        [lo_s | ((hi_s >> 4) << 6), lo_m | ((hi_m >> 4) << 6), (hi_s & 0xF) | ((hi_m & 0xF) << 4)], axis=1
    )
    return (packed & 0xFF).astype(np.uint8)


def unpack_scales_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``get_scale_min_k4`` for all eight sub-blocks: uint8 ``[nb, 12]`` -> (sc, m) uint8 ``[nb, 8]``."""
    d, m, m_d = scales[:, :4], scales[:, 4:8], scales[:, 8:]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=1)
    return sc, mn


def encode_k4(
    blocks: np.ndarray, importance: np.ndarray | None, nmax: int, ref_search: tuple[float, float, int], clamp: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K scale search: float32 ``[nb, 256]`` -> (d, dmin, scales bytes ``[nb, 16]``; codes ``[nb, 256]``).

    ``ref_search`` is the reference encoder's ``(rmin, rdelta, nstep)``; ``clamp`` applies
    ``MIN(63, .)`` to the importance path's scale codes (Q5_K does, Q4_K does not).
    """
    nb = blocks.shape[0]
    # element-major: x[i, j, b] is element i of sub-block j of super-block b
    x = np.ascontiguousarray(blocks.reshape(nb, N_SUB, SUB).transpose(2, 1, 0))
    if importance is None:
        av_x = np.sqrt(seq_sum(x * x) / F32(SUB))
        weights = av_x + np.abs(x)
        rmin, rdelta, nstep = ref_search
        scales, mins, codes = make_qkx_quants(
            x.reshape(SUB, -1), weights.reshape(SUB, -1), nmax, rmin, rdelta, nstep, False
        )
        scales, mins = scales.reshape(N_SUB, nb), mins.reshape(N_SUB, nb)
        max_scale = positive_max(scales)
        max_min = positive_max(mins)
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
        ls = np.minimum(63, nearest_int(inv_scale * scales) & 0xFF)
        lm = np.minimum(63, nearest_int(inv_min * mins) & 0xFF)
        d_block = max_scale / F32(63)
        m_block = max_min / F32(63)
    else:
        sum_x2 = seq_sum(np.ascontiguousarray((blocks * blocks).T))
        sigma2 = F32(2) * sum_x2 / F32(QK_K)
        qw = np.ascontiguousarray(importance.reshape(nb, N_SUB, SUB).transpose(2, 1, 0))
        weights = qw * np.sqrt(sigma2 + x * x)
        sw = seq_sum(weights)
        scales, mins, codes = make_qkx_quants(x.reshape(SUB, -1), weights.reshape(SUB, -1), nmax, -0.9, 0.05, 36, False)
        d_block, ls, m_block, lm = make_qp_quants_pair(scales.reshape(N_SUB, nb), mins.reshape(N_SUB, nb), sw, 63)
        if clamp:
            ls, lm = np.minimum(63, ls), np.minimum(63, lm)

    head = np.empty((nb, 16), dtype=np.uint8)
    head[:, 0:2] = to_fp16(d_block)[:, None].view(np.uint8)
    head[:, 2:4] = to_fp16(m_block)[:, None].view(np.uint8)
    head[:, 4:] = pack_scales_k4(ls.T, lm.T)
    sc, mn = unpack_scales_k4(head[:, 4:])
    d = from_fp16(head[:, 0:2])[:, None] * sc.astype(F32)
    dm = from_fp16(head[:, 2:4])[:, None] * mn.astype(F32)
    codes = requantize_with_mins(x.reshape(SUB, -1), d.T.reshape(-1), dm.T.reshape(-1), codes, nmax)
    return head, codes.reshape(SUB, N_SUB, nb).transpose(2, 1, 0).reshape(nb, QK_K).astype(np.uint8)


class Q4_K(BlockFormat):
    name = "Q4_K"
    ggml_type = gguf.GGMLQuantizationType.Q4_K

    def encode_rows(self, rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        return encode_in_pieces(rows, importance, self.type_size, self._encode_piece)

    def _encode_piece(self, x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
        head, codes = encode_k4(x, qw, 15, (-1.0, 0.1, 20), False)
        pairs = codes.reshape(-1, 4, 2, 32)
        return np.concatenate([head, (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)], axis=1)

    def decode_blocks(self, blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        sc, mn = unpack_scales_k4(blocks[:, 4:16])
        d = (from_fp16(blocks[:, 0:2])[:, None] * sc.astype(F32)).reshape(n, N_SUB, 1)
        dm = (from_fp16(blocks[:, 2:4])[:, None] * mn.astype(F32)).reshape(n, N_SUB, 1)
        qs = blocks[:, 16:].reshape(n, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        q = (qs & np.uint8(0x0F)).reshape(n, N_SUB, SUB).astype(F32)
        return (d * q - dm).reshape(n, QK_K)


BLOCK_FORMATS.add("Q4_K", Q4_K())
