"""ggml's scalar helpers, vectorised with numpy and exact to the bit.

Every encoder search in ``ggml-quants.c`` is float32 arithmetic on x86-64 SSE (ggml-base is built
without FMA), so numpy float32 operations written in the C expression's order reproduce it exactly.
Sums are accumulated element by element in C; ports must do the same (a Python loop over the
element index, vectorised over blocks) because numpy's pairwise ``sum`` rounds differently.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
_MAGIC = F32(12582912.0)  # 1.5 * 2**23


def nearest_int(values: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``: float32 + 1.5*2^23, then the low mantissa bits (|x| <= 4194303)."""
    shifted = (np.asarray(values, dtype=F32) + _MAGIC).view(np.int32)
    return (shifted & 0x007FFFFF) - 0x00400000


def c_uint8_of(values: np.ndarray) -> np.ndarray:
    """C's ``(uint8_t)`` / ``(int8_t)`` of float32 ``values`` on x86-64, as the low byte (uint8).

    The compiler truncates to a 32-bit integer (``cvttss2si``) and keeps the low byte; NaN, infinities
    and values beyond int32 become ``INT_MIN``, whose low byte is 0.
    """
    if np.all((values >= 0) & (values < 256)):  # the usual case: truncation is the cast (False for NaN)
        return values.astype(np.uint8)
    inside = np.abs(values) < F32(2.0**31)  # False for NaN and infinities
    whole = np.trunc(np.where(inside, values, F32(0))).astype(np.int64)
    return (whole & 0xFF).astype(np.uint8)


def c_amax(blocks: np.ndarray) -> np.ndarray:
    """C's ``float amax = 0; for (...) amax = MAX(amax, fabsf(v));`` over the rows of float32 ``[G, n]``.

    ``MAX(a, b)`` is ``a > b ? a : b``: a NaN is replaced by the next value, unless it is the last.
    """
    amax = np.abs(blocks).max(axis=1)
    with_nan = np.flatnonzero(np.isnan(amax))
    if with_nan.size:
        seq = np.zeros(with_nan.size, dtype=F32)
        for v in np.abs(blocks[with_nan]).T:
            seq = np.where(seq > v, seq, v)
        amax[with_nan] = seq
    return amax


def roundf(values: np.ndarray) -> np.ndarray:
    """C ``roundf`` (halves away from zero) of float32 values, as float32."""
    v = np.asarray(values, dtype=np.float64)
    return (np.sign(v) * np.floor(np.abs(v) + 0.5)).astype(F32)


def to_fp16(values: np.ndarray) -> np.ndarray:
    """``GGML_FP32_TO_FP16`` (round to nearest even) as the fp16 bit pattern, uint16."""
    return np.asarray(values, dtype=F32).astype(np.float16).view(np.uint16)


def fp16_round(values: np.ndarray) -> np.ndarray:
    """``GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(x))``: float32 values rounded through fp16."""
    return np.asarray(values, dtype=F32).astype(np.float16).astype(F32)


def from_fp16(bits: np.ndarray) -> np.ndarray:
    """fp16 bit patterns (uint16, or two little-endian bytes on the last axis) to float32."""
    bits = np.ascontiguousarray(bits)
    if bits.dtype == np.uint8:
        bits = bits.view(np.uint16)[..., 0] if bits.shape[-1] == 2 else bits.view(np.uint16)
    return bits.view(np.float16).astype(F32)


def seq_sum(terms: np.ndarray) -> np.ndarray:
    """C's ``float s = 0; for (i...) s += terms[i];`` over axis 0 of ``terms [n, groups]``.

    numpy adds the rows of a contiguous 2-D array one after another; a single column would be one
    contiguous run, which numpy sums pairwise, so it is widened to two.
    """
    if terms.shape[1] == 1:
        return seq_sum(np.repeat(terms, 2, axis=1))[:1]
    return np.add.reduce(np.ascontiguousarray(terms), axis=0, initial=F32(0))
