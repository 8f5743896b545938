"""Q3_K: 256 weights in 16 sub-blocks of 16, 3-bit codes, 6-bit sub-block scales, fp16 super-scale (3.4375 bpw).

Byte table (110 bytes per super-block)::

    offset  size  field
    0       32    hmask   high bit of the codes
    32      64    qs      low 2 bits of the codes
    96      12    scales  16 six-bit sub-block scales, stored +32
    108     2     d       fp16 super-block scale; weight = d * (scale[s] - 32) * (q - 4)

Packed fields (``q[j]`` is the 3-bit code of weight ``j``, ``s[k]`` the 6-bit scale of sub-block ``k``)::

    hmask[m]         bit b = q[32b + m] >> 2                          m = 0..31, b = 0..7
    qs[32h + l]      = q[128h+l] & 3 | (q[128h+l+32] & 3) << 2 | (q[128h+l+64] & 3) << 4 | (q[128h+l+96] & 3) << 6
    scales[k]        = s[k] & 15 | (s[k+8] & 15) << 4                 k = 0..7
    scales[8 + k]    = s[k] >> 4 | (s[k+4] >> 4) << 2 | (s[k+8] >> 4) << 4 | (s[k+12] >> 4) << 6   k = 0..3

    +-----------+-----------+------------+------+
    | hmask: 32 | qs: 64    | scales: 12 | d:2  |
    +-----------+-----------+------------+------+

Encoders: without importance ggml's ``make_q3_quants`` (an ``x*x``-weighted refinement) per sub-block and the
scales rounded against ``-32 / max_scale``; with importance ``make_qx_quants(16, 4)`` weighted by
``qw * sqrt(sigma2 + x*x)`` (``sigma2`` twice the super-block's mean square) and the scales themselves quantized with
``make_qx_quants(16, 32)`` weighted by each sub-block's total weight. Codes are then recomputed from the
rounded scales.
"""

from __future__ import annotations

import gguf
import numpy as np

from quantkit.kquants.base import BLOCK_FORMATS, QK_K, BlockFormat
from quantkit.kquants.ggml_math import F32, from_fp16, to_fp16
from quantkit.kquants.search_qx import (
    I32,
    element_major,
    make_q3_quants,
    make_qx_quants,
    nearest_clamped,
    requantize_symmetric,
    seq_sum,
    signed_abs_max,
)


class Q3_K(BlockFormat):
    name = "Q3_K"
    ggml_type = gguf.GGMLQuantizationType.Q3_K

    def encode_rows(self, rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        blocks = self.blocks_of(rows)
        n_blocks = blocks.shape[0]
        x = element_major(blocks, 16)
        if importance is None:
            scales, codes = make_q3_quants(x, 4)
            scale_codes, d = _round_scales(scales.reshape(n_blocks, 16))
        else:
            qw = element_major(np.broadcast_to(importance, rows.shape), 16)
            codes, scale_codes, d = _weighted_search(blocks, x, qw)
        sub_d = from_fp16(d)[:, None] * (scale_codes.astype(F32) - F32(32))
        requantize_symmetric(x, sub_d.reshape(-1), codes, 4)
        codes = np.ascontiguousarray(codes.T).reshape(n_blocks, QK_K)

        out = np.empty((n_blocks, self.type_size), dtype=np.uint8)
        high = (codes.reshape(n_blocks, 8, 32) >> 2).astype(np.uint8)
        out[:, :32] = np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)
        low = (codes & 3).reshape(n_blocks, 2, 4, 32)
        out[:, 32:96] = (low[:, :, 0] | (low[:, :, 1] << 2) | (low[:, :, 2] << 4) | (low[:, :, 3] << 6)).reshape(
            n_blocks, 64
        )
        out[:, 96:108] = _pack_scales(scale_codes)
        out[:, 108:] = d[:, None].view(np.uint8)
        return out.reshape(rows.shape[0], -1)

    def decode_blocks(self, blocks: np.ndarray) -> np.ndarray:
        n_blocks = blocks.shape[0]
        packed = blocks[:, 96:108]
        low = (packed[:, :8].reshape(n_blocks, 1, 8) >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)) & 15
        high = (packed[:, 8:].reshape(n_blocks, 1, 4) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)) & 3
        scales = (low.reshape(n_blocks, 16) | (high.reshape(n_blocks, 16) << 4)).astype(np.int8) - np.int8(32)
        dl = from_fp16(blocks[:, 108:])[:, None] * scales.astype(F32)
        ql = blocks[:, 32:96].reshape(n_blocks, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
        qh = blocks[:, :32].reshape(n_blocks, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
        q = (ql.reshape(n_blocks, 8, 32) & 3).astype(np.int8) - (((qh & 1) ^ 1) << 2).astype(np.int8)
        return (dl.reshape(n_blocks, 16, 1) * q.reshape(n_blocks, 16, 16).astype(F32)).reshape(n_blocks, QK_K)


def _round_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``quantize_row_q3_K_ref``: sub-block scales ``[n_blocks, 16]`` to 6-bit codes and the fp16 ``d``."""
    _, max_scale = signed_abs_max(np.ascontiguousarray(scales.T))
    live = max_scale != 0
    max_scale[~live] = 1
    iscale = F32(-32) / max_scale
    codes = (nearest_clamped(iscale[:, None] * scales, -32, 31) + I32(32)).astype(np.uint8)
    codes[~live] = 0
    d = to_fp16(F32(1) / iscale)
    d[~live] = 0
    return codes, d


def _weighted_search(blocks: np.ndarray, x: np.ndarray, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``quantize_row_q3_K_impl``'s searches: sub-block codes, 6-bit scale codes, fp16 ``d``.

    ``x`` and ``qw`` (the importance) are element-major sub-blocks of ``blocks``.
    """
    whole = element_major(blocks, QK_K)
    sigma2 = np.repeat(F32(2) * seq_sum(whole * whole) / F32(QK_K), 16)
    weight = qw * np.sqrt(sigma2 + x * x)
    scales, codes = make_qx_quants(x, 4, weight)
    sub_weight = seq_sum(weight)
    d_block, scale_codes = make_qx_quants(element_major(scales, 16), 32, element_major(sub_weight, 16))
    return codes, np.ascontiguousarray(scale_codes.T), to_fp16(d_block)


def _pack_scales(codes: np.ndarray) -> np.ndarray:
    """Sixteen 6-bit scale codes ``[n_blocks, 16]`` into ggml's 12 bytes."""
    low = codes & 15
    high = (codes >> 4).reshape(-1, 4, 4)
    packed = np.empty((codes.shape[0], 12), dtype=np.uint8)
    packed[:, :8] = low[:, :8] | (low[:, 8:] << 4)
    packed[:, 8:] = high[:, 0] | (high[:, 1] << 2) | (high[:, 2] << 4) | (high[:, 3] << 6)
    return packed


BLOCK_FORMATS.add("Q3_K", Q3_K())
