"""TQ1_0: 256 ternary weights as base-3 digits, five per byte, with one fp16 scale (1.6875 bits per weight).

Byte table (54 bytes per block)::

    offset  size  field
    0       48    qs   weights 0..239: five trits per byte
    48      4     qh   weights 240..255: four trits per byte
    52      2     d    fp16 scale: the block's largest |weight| (ggml's rule, see trits.py); weight = d * (t - 1)

A byte holds trits ``t0..t4`` (``t0`` most significant) as the fixed-point fraction
``ceil(256 * (81 t0 + 27 t1 + 9 t2 + 3 t3 + t4) / 243)``, so that ``t_n = (uint8(byte * 3^n) * 3) >> 8``.
Which weights share a byte::

    qs[m]       m = 0..31   weights m, m+32, m+64, m+96, m+128            (t0..t4)
    qs[32 + m]  m = 0..15   weights 160+m, 176+m, 192+m, 208+m, 224+m
    qh[j]       j = 0..3    weights 240+j, 244+j, 248+j, 252+j, and t4 = 0

ggml's encoder ignores importance weights for TQ1_0.
"""

from __future__ import annotations

import gguf
import numpy as np

from quantkit.kquants.base import BLOCK_FORMATS, BlockFormat
from quantkit.kquants.ggml_math import F32, from_fp16
from quantkit.kquants.trits import block_trits


def _pack(trits: np.ndarray) -> np.ndarray:
    """Trits ``[G, digits, k]`` (most significant first) -> ``[G, k]`` bytes, as the C: ``uint8_t q`` built by
    ``q = q * 3 + xi`` (a 4-trit ``qh`` byte once more ``* 3``), then ``(q * 256 + 242) / 243`` in 16 bits."""
    n_blocks, digits, width = trits.shape
    q: np.ndarray = np.zeros((n_blocks, width), dtype=np.uint16)
    for n in range(digits):
        q = (q * 3 + trits[:, n]) & 0xFF
    if digits == 4:
        q = (q * 3) & 0xFF
    return ((q * 256 + 242) // 243).astype(np.uint8)  # the uint8_t store keeps the low byte


def _unpack(packed: np.ndarray, digits: int) -> np.ndarray:
    """``[G, k]`` bytes -> trits ``[G, digits, k]``: ``(uint8(byte * 3^n) * 3) >> 8`` as in dequantize_row_tq1_0."""
    pow3 = np.array([1, 3, 9, 27, 81][:digits], dtype=np.uint8).reshape(1, digits, 1)
    shifted = packed[:, None, :] * pow3  # uint8: wraps modulo 256, as the C
    return (shifted.astype(np.uint16) * 3 >> 8).astype(np.uint8)


class TQ1_0(BlockFormat):
    name = "TQ1_0"
    ggml_type = gguf.GGMLQuantizationType.TQ1_0

    @property
    def code_bits(self) -> int:
        """A trit (log2 3 = 1.58 bits): the two bits a code needs at most."""
        return 2

    def encode_rows(self, rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        trits, d = block_trits(self.blocks_of(rows))
        out = np.empty((trits.shape[0], self.type_size), dtype=np.uint8)
        out[:, :32] = _pack(trits[:, :160].reshape(-1, 5, 32))
        out[:, 32:48] = _pack(trits[:, 160:240].reshape(-1, 5, 16))
        out[:, 48:52] = _pack(trits[:, 240:].reshape(-1, 4, 4))
        out[:, 52:] = d[:, None].view(np.uint8)
        return out.reshape(rows.shape[0], -1)

    def decode_blocks(self, blocks: np.ndarray) -> np.ndarray:
        d = from_fp16(blocks[:, 52:])
        parts = (_unpack(blocks[:, :32], 5), _unpack(blocks[:, 32:48], 5), _unpack(blocks[:, 48:52], 4))
        trits = np.concatenate([part.reshape(len(blocks), -1) for part in parts], axis=1)
        return d[:, None] * (trits.astype(np.int8) - np.int8(1)).astype(F32)


BLOCK_FORMATS.add("TQ1_0", TQ1_0())
