"""Q8_0: 32 weights as int8 codes with one fp16 scale (8.5 bits per weight).

Byte table (34 bytes per block)::

    offset  size  field
    0       2     d    fp16 scale
    2       32    qs   int8 codes; weight j = d * qs[j]

    +------+--------------------------------+
    | d:2  | qs: 32 x int8                  |
    +------+--------------------------------+

ggml's encoder ignores importance weights for Q8_0: ``d = amax / 127``, ``qs = roundf(x / d)``.
"""

from __future__ import annotations

import gguf
import numpy as np

from quantkit.kquants.base import BLOCK_FORMATS, BlockFormat
from quantkit.kquants.ggml_math import F32, c_amax, c_uint8_of, from_fp16, roundf, to_fp16


class Q8_0(BlockFormat):
    name = "Q8_0"
    ggml_type = gguf.GGMLQuantizationType.Q8_0

    def encode_rows(self, rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        x = self.blocks_of(rows)
        amax = c_amax(x)
        d = (amax / F32(127)).astype(F32)
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            inverse = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)
            scaled = roundf(x * inverse[:, None])
        finite = np.isfinite(scaled).all()  # no NaN or infinity among the weights or from 1/d: |x * inverse| <= 127
        codes = scaled.astype(np.int8).view(np.uint8) if finite else c_uint8_of(scaled)  # NaN, inf store 0 (x86)
        out = np.empty((x.shape[0], self.type_size), dtype=np.uint8)
        out[:, :2] = to_fp16(d)[:, None].view(np.uint8)
        out[:, 2:] = codes
        return out.reshape(rows.shape[0], -1)

    def decode_blocks(self, blocks: np.ndarray) -> np.ndarray:
        d = from_fp16(blocks[:, :2])
        return blocks[:, 2:].view(np.int8).astype(F32) * d[:, None]


BLOCK_FORMATS.add("Q8_0", Q8_0())
