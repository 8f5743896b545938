"""ggml's ternary rule, shared by TQ1_0 and TQ2_0: each 256-weight block's trits and fp16 scale.

``quantize_row_tq{1,2}_0_ref`` take ``d = amax`` of the block (``MAX(amax, fabsf(v))`` in order),
``id = d ? 1/d : 0`` and the trit ``lroundf(x * id) + 1`` in ``{0, 1, 2}`` (weight ``-1, 0, +1``). A
weight therefore becomes ``±d`` when ``|x| >= d/2`` and 0 below: on a block that is already
``{-s, 0, +s}`` (a BitNet b1.58 weight) ``d = s`` and the block is stored exactly, up to fp16 of ``s``.
"""

from __future__ import annotations

import numpy as np

from quantkit.kquants.ggml_math import F32, c_amax, roundf, to_fp16


def block_trits(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``[G, 256]`` -> (``int xi = lroundf(x * id) + 1`` as its low byte, uint8 ``[G, 256]``; fp16 bits
    of ``d``, uint16 ``[G]``).

    ``xi`` is 0..2 unless the block holds a NaN: ``MAX`` then restarts after it, so ``|x * id|`` may exceed 1
    and the encoders' C arithmetic (``xi & 3``, ``uint8_t`` sums) wraps as it does here on the low byte.
    ``lroundf`` of NaN, an infinity or anything beyond ``long`` is ``LONG_MIN`` on x86-64, so ``xi`` is 1.
    """
    d = c_amax(blocks)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        inverse = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)  # NaN != 0: id = 1/NaN = NaN, as in C
        scaled = blocks * inverse[:, None]
        in_long = np.abs(scaled) < F32(2.0**63)  # False for NaN and infinities
        rounded = roundf(np.where(in_long, scaled, F32(0))).astype(np.int64)
    lround = np.where(in_long, rounded, np.iinfo(np.int64).min)
    return ((lround + 1) & 0xFF).astype(np.uint8), to_fp16(d)
