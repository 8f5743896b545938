"""Q6_K: 256 weights in 16 sub-blocks of 16, 6-bit codes, int8 sub-block scales, fp16 super-scale (6.5625 bpw).

Byte table (210 bytes per super-block)::

    offset  size  field
    0       128   ql      low 4 bits of the codes
    128     64    qh      high 2 bits of the codes
    192     16    scales  int8 sub-block scales
    208     2     d       fp16 super-block scale; weight = d * scales[s] * (q - 32)

Packed fields, for each half ``h`` (weights ``128h .. 128h+127``; ``q[k]`` is code ``128h + 32k + l``)::

    ql[64h + l]      = q[0] & 15 | (q[2] & 15) << 4        l = 0..31
    ql[64h + 32 + l] = q[1] & 15 | (q[3] & 15) << 4
    qh[32h + l]      = q[0] >> 4 | (q[1] >> 4) << 2 | (q[2] >> 4) << 4 | (q[3] >> 4) << 6

    +-----------+-----------+-------------+------+
    | ql: 128   | qh: 64    | scales: 16  | d:2  |
    +-----------+-----------+-------------+------+

Encoder: ggml's ``make_qx_quants(16, 32, ..., rmse_type=1)`` per sub-block, weighted by ``x*x`` or by the
importance, then the sub-block scales quantized to int8 against ``-128 / max_scale`` and the codes
recomputed from the rounded scales.
"""

from __future__ import annotations

import gguf
import numpy as np

from quantkit.kquants.base import BLOCK_FORMATS, QK_K, BlockFormat
from quantkit.kquants.ggml_math import F32, from_fp16, to_fp16
from quantkit.kquants.search_qx import (
    GROUP_MAX_EPS,
    element_major,
    make_qx_quants,
    nearest_clamped,
    requantize_symmetric,
    signed_abs_max,
)


class Q6_K(BlockFormat):
    name = "Q6_K"
    ggml_type = gguf.GGMLQuantizationType.Q6_K

    def encode_rows(self, rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        blocks = self.blocks_of(rows)
        n_blocks = blocks.shape[0]
        x = element_major(blocks, 16)
        weights = x * x if importance is None else element_major(np.broadcast_to(importance, rows.shape), 16)
        scales, codes = make_qx_quants(x, 32, weights)

        max_abs, max_scale = signed_abs_max(element_major(scales, 16))
        live = max_abs >= GROUP_MAX_EPS
        max_scale[~live] = 1
        iscale = F32(-128) / max_scale
        d = to_fp16(F32(1) / iscale)
        # MIN(127, nearest_int(iscale * scale)); |iscale * scale| <= 128, so -128 bounds nothing
        sub_scales = nearest_clamped(iscale[:, None] * scales.reshape(n_blocks, 16), -128, 127).astype(np.int8)
        sub_d = from_fp16(d)[:, None] * sub_scales.astype(F32)
        requantize_symmetric(x, sub_d.reshape(-1), codes, 32)

        q = np.ascontiguousarray(codes.T).reshape(n_blocks, 2, 4, 32)
        high = q >> 4
        out = np.empty((n_blocks, self.type_size), dtype=np.uint8)
        out[:, :128] = ((q[:, :, :2] & 15) | ((q[:, :, 2:] & 15) << 4)).reshape(n_blocks, 128)
        out[:, 128:192] = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(
            n_blocks, 64
        )
        out[:, 192:208] = sub_scales.view(np.uint8)
        out[:, 208:] = d[:, None].view(np.uint8)
        out[~live] = 0
        return out.reshape(rows.shape[0], -1)

    def decode_blocks(self, blocks: np.ndarray) -> np.ndarray:
        n_blocks = blocks.shape[0]
        nibble_shifts = np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1, 1)
        pair_shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
        ql = blocks[:, :128].reshape(n_blocks, 2, 1, 2, 32) >> nibble_shifts
        qh = blocks[:, 128:192].reshape(n_blocks, 2, 1, 32) >> pair_shifts
        q = ((ql.reshape(n_blocks, 2, 4, 32) & 15) | ((qh & 3) << 4)).astype(np.int8) - np.int8(32)
        d = from_fp16(blocks[:, 208:])[:, None] * blocks[:, 192:208].view(np.int8).astype(F32)
        return (d.reshape(n_blocks, 16, 1) * q.reshape(n_blocks, 16, 16).astype(F32)).reshape(n_blocks, QK_K)


BLOCK_FORMATS.add("Q6_K", Q6_K())
