"""TQ2_0: 256 ternary weights as 2-bit trits with one fp16 scale (2.0625 bits per weight).

Byte table (66 bytes per block)::

    offset  size  field
    0       64    qs   trits t in 0..2, four per byte; weight = d * (t - 1)
    64      2     d    fp16 scale: the block's largest |weight| (ggml's rule, see trits.py)

Weight ``128c + 32n + m`` (half ``c`` = 0..1, row ``n`` = 0..3, column ``m`` = 0..31) is bits
``2n..2n+1`` of ``qs[32c + m]``::

    qs[32c + m]:  bit 7..6     5..4     3..2     1..0
                  t[128c+96+m] t[+64+m] t[+32+m] t[128c+m]

ggml's encoder ignores importance weights for TQ2_0.
"""

from __future__ import annotations

import gguf
import numpy as np

from quantkit.kquants.base import BLOCK_FORMATS, BlockFormat
from quantkit.kquants.ggml_math import F32, from_fp16
from quantkit.kquants.trits import block_trits

_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)


class TQ2_0(BlockFormat):
    name = "TQ2_0"
    ggml_type = gguf.GGMLQuantizationType.TQ2_0

    @property
    def code_bits(self) -> int:
        """A trit, stored in two bits."""
        return 2

    def encode_rows(self, rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        trits, d = block_trits(self.blocks_of(rows))
        planes = (trits.reshape(-1, 2, 4, 32) & 3) << _SHIFTS  # (blocks, half c, row n, column m); C's xi & 3
        out = np.empty((trits.shape[0], self.type_size), dtype=np.uint8)
        out[:, :64] = np.bitwise_or.reduce(planes, axis=2).reshape(-1, 64)
        out[:, 64:] = d[:, None].view(np.uint8)
        return out.reshape(rows.shape[0], -1)

    def decode_blocks(self, blocks: np.ndarray) -> np.ndarray:
        d = from_fp16(blocks[:, 64:])
        trits = (blocks[:, :64].reshape(-1, 2, 1, 32) >> _SHIFTS) & 3  # (blocks, c, n, m)
        return d[:, None] * (trits.reshape(-1, 256).astype(np.int8) - np.int8(1)).astype(F32)


BLOCK_FORMATS.add("TQ2_0", TQ2_0())
