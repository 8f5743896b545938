"""ggml's scale searches for the symmetric formats (Q3_K, Q6_K, Q4_0, Q5_0), vectorised and exact to the bit.

The searches work on *element-major* groups: an array ``[n, groups]`` whose row ``i`` holds element ``i``
of every group (a group is one ggml sub-block: 16 weights for the k-quants, 32 for Q4_0/Q5_0). Each C
loop over the elements of a group is then one numpy operation per element index, and C's sequential
``sum += t[i]`` is :func:`seq_sum` (a reduction over the leading axis of a contiguous array, which numpy
performs row after row). Every float expression keeps C's operation order in float32.

Speed notes: numpy's ``where``/``copyto(where=)`` branch per element and crawl on unpredictable masks,
so per-group updates go through :func:`select`; scalars are typed (a Python ``int`` bound sends
``clip`` down a slow path); the searches run in tiles whose temporaries stay in cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from quantkit.kquants.ggml_math import F32, seq_sum

I32 = np.int32
GROUP_MAX_EPS = F32(1e-15)  # ggml: groups whose largest |x| is below this quantize to zero
_MAGIC = F32(12582912.0)  # nearest_int's 1.5 * 2**23
_MANTISSA = I32(0x007FFFFF)
_HALF = I32(0x00400000)
TILE_WEIGHTS = 1 << 17  # weights per make_qx_quants / Q4_0 / Q5_0 tile
Q3_TILE_GROUPS = 1 << 14  # groups per make_q3_quants tile: its [16, groups] arrays stay in L2
_RUN = np.dtype("V16")  # four float32 moved as one unit


def element_major(blocks: np.ndarray, n: int) -> np.ndarray:
    """Split blocks into groups of ``n`` weights: float32 ``[n, groups]`` (contiguous)."""
    return np.ascontiguousarray(blocks.reshape(-1, n).T, dtype=F32)


def select(mask: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float32 ``a`` where ``mask`` else ``b``, bit for bit (``b ^ ((a ^ b) & -mask)``), without branching."""
    bits = a.view(I32) ^ b.view(I32)
    bits &= -mask.view(np.int8).astype(I32)
    bits ^= b.view(I32)
    return bits.view(F32)


def nearest_clamped(values: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """``MAX(lo, MIN(hi, nearest_int(values)))`` as int32, with nearest_int's bit trick for any magnitude."""
    bits = (values + _MAGIC).view(I32)
    bits &= _MANTISSA
    np.clip(bits, I32(lo) + _HALF, I32(hi) + _HALF, out=bits)
    bits -= _HALF
    return bits


def signed_abs_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(amax, max)`` over axis 0: the largest ``|x|`` and the first element reaching it (C's strict ``>``).

    ``max`` is ``+0.0`` where every element is zero, C's initial value.
    """
    return _signed_extreme(np.fmax.reduce(x, axis=0), np.fmin.reduce(x, axis=0), lambda groups: x[:, groups])


def _signed_extreme(
    top: np.ndarray, bottom: np.ndarray, tied_groups: Callable[[np.ndarray], np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`signed_abs_max` from each group's largest and smallest element, NaN ignored (as C's ``>``).

    Where both ``+amax`` and ``-amax`` occur, ``tied_groups(indices)`` gives those groups element-major
    (``[n, k]``) to find which comes first.
    """
    amax = np.fmax(top, -bottom)
    signed = select(top >= -bottom, top, bottom)
    ties = np.flatnonzero((top == -bottom) & (top > 0))
    if ties.size:
        tied = tied_groups(ties)
        first = (np.abs(tied) == amax[ties]).argmax(axis=0)
        signed[ties] = tied[first, np.arange(ties.size)]
    unset = ~(amax > 0)  # all zero (or NaN): C keeps its initial amax = max = 0
    amax[unset] = 0
    signed[unset] = 0
    return amax, signed


def make_qx_quants(x: np.ndarray, nmax: int, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml ``make_qx_quants(n, nmax, x, L, rmse_type=1, qw=weights)`` per group of ``x [n, groups]``.

    Returns the scale per group (float32 ``[groups]``) and the codes ``L`` (uint8 ``[n, groups]``,
    ``nmax + l`` with ``l`` in ``[-nmax, nmax - 1]``; all zero for groups below :data:`GROUP_MAX_EPS`).
    """
    n, groups = x.shape
    tile = max(2, TILE_WEIGHTS // n)
    scale = np.empty(groups, dtype=F32)
    codes = np.empty((n, groups), dtype=np.uint8)
    for start in range(0, groups, tile):
        part = slice(start, start + tile)
        scale[part], codes[:, part] = _make_qx_quants_tile(
            np.ascontiguousarray(x[:, part]), nmax, np.ascontiguousarray(weights[:, part])
        )
    return scale, codes


def _make_qx_quants_tile(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    amax, vmax = signed_abs_max(x)
    live = amax >= GROUP_MAX_EPS
    vmax[~live] = 1  # dead groups: any finite search, overwritten below
    wx = w * x
    lo, hi = _MAGIC - F32(nmax), _MAGIC + F32(nmax - 1)
    lf = np.empty_like(x)
    term = np.empty_like(x)

    def sums(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # l = MAX(-nmax, MIN(nmax-1, nearest_int(iscale*x))) as float: |iscale*x| <= nmax + 1 here,
        # so rounding through the magic constant and clamping before subtracting it is nearest_int.
        np.multiply(x, iscale, out=lf)
        np.add(lf, _MAGIC, out=lf)
        np.clip(lf, lo, hi, out=lf)
        np.subtract(lf, _MAGIC, out=lf)
        np.multiply(wx, lf, out=term)
        sumlx = seq_sum(term)
        np.multiply(w, lf, out=term)
        np.multiply(term, lf, out=term)
        return sumlx, seq_sum(term)

    best_iscale = F32(-nmax) / vmax
    sumlx, suml2 = sums(best_iscale)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = select(suml2 != 0, sumlx / suml2, np.zeros_like(sumlx))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = -(F32(nmax) + F32(0.1) * F32(step)) / vmax
            sumlx, suml2 = sums(iscale)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            best_iscale = select(better, iscale, best_iscale)
            scale = select(better, sumlx / suml2, scale)
            best = select(better, scale * sumlx, best)
    codes = (nearest_clamped(x * best_iscale, -nmax, nmax - 1) + I32(nmax)).astype(np.uint8)
    codes[:, ~live] = 0
    scale[~live] = 0
    return scale, codes


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml ``make_q3_quants(n, nmax, x, L, do_rmse=true)`` per group of ``x [n, groups]``.

    Returns scales (float32 ``[groups]``) and codes (uint8 ``[n, groups]``, ``l + nmax``).
    """
    n, groups = x.shape
    scale = np.empty(groups, dtype=F32)
    codes = np.empty((n, groups), dtype=np.uint8)
    for start in range(0, groups, Q3_TILE_GROUPS):
        part = slice(start, start + Q3_TILE_GROUPS)
        scale[part], codes[:, part] = _make_q3_quants_tile(np.ascontiguousarray(x[:, part]), nmax)
    return scale, codes


def _make_q3_quants_tile(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    amax, vmax = signed_abs_max(x)
    live = amax >= GROUP_MAX_EPS
    vmax[~live] = 1
    levels = nearest_clamped(x * (F32(-nmax) / vmax), -nmax, nmax - 1).astype(F32)
    w = x * x
    wx = w * x
    sums = np.stack([seq_sum(wx * levels), seq_sum(w * levels * levels)])  # sumlx, suml2
    # Refinement sweeps (at most 5), each on the groups whose previous sweep changed a code: C breaks
    # out of a group's loop after a sweep without changes. The first sweep runs on every group (dead
    # ones are overwritten below), later ones on compacted copies.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        active = np.flatnonzero(_q3_sweep(levels, x, w, wx, sums, nmax) & live)
        for _ in range(4):
            if active.size == 0:
                break
            lv, xs, ws, wxs, state = (np.take(a, active, axis=1) for a in (levels, x, w, wx, sums))
            changed = _q3_sweep(lv, xs, ws, wxs, state, nmax)
            levels[:, active], sums[:, active] = lv, state
            active = active[changed]
        sumlx, suml2 = sums
        scale = select(suml2 > 0, sumlx / suml2, np.zeros_like(sumlx))
    codes = (levels + F32(nmax)).astype(np.uint8)
    codes[:, ~live] = 0
    scale[~live] = 0
    return scale, codes


def _q3_sweep(
    levels: np.ndarray, x: np.ndarray, w: np.ndarray, wx: np.ndarray, state: np.ndarray, nmax: int
) -> np.ndarray:
    """One ``itry`` pass of make_q3_quants over the elements, updating ``levels`` and ``state`` in place.

    ``state`` is ``[sumlx, suml2]`` per group; returns which groups changed a code.
    """
    sumlx, suml2 = state
    trial = np.empty_like(state)  # [slx, sl2] with element i's code swapped
    slx, sl2 = trial
    changed = np.zeros(state.shape[1], dtype=bool)
    for i in range(x.shape[0]):
        li, wi, wxi = levels[i], w[i], wx[i]
        np.subtract(sumlx, wxi * li, out=slx)
        np.subtract(suml2, wi * li * li, out=sl2)
        new_l = nearest_clamped(x[i] * sl2 / slx, -nmax, nmax - 1).astype(F32)
        take = slx > 0
        take &= new_l != li
        slx += wxi * new_l
        sl2 += wi * new_l * new_l
        take &= sl2 > 0
        take &= slx * slx * suml2 > sumlx * sumlx * sl2
        mask = -take.view(np.int8).astype(I32)
        _blend(state, trial, mask)
        _blend(li, new_l, mask)
        changed |= take
    return changed


def _blend(target: np.ndarray, source: np.ndarray, mask: np.ndarray) -> None:
    """``target = source`` where ``mask`` (int32 0 / -1, broadcast on the last axis), bit for bit, in place."""
    bits = source.view(I32) ^ target.view(I32)
    bits &= mask
    target.view(I32)[...] ^= bits


def requantize_symmetric(x: np.ndarray, d: np.ndarray, codes: np.ndarray, nmax: int) -> None:
    """The k-quants' final pass: ``L = nmax + clamp(nearest_int(x/d))`` where ``d != 0``, else keep ``L``.

    ``x`` and ``codes`` are element-major ``[n, groups]``; ``d`` is each sub-block's dequantized scale.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        fresh = (nearest_clamped(x / d, -nmax, nmax - 1) + I32(nmax)).astype(np.uint8)
    keep = d == 0
    fresh[:, keep] = codes[:, keep]
    codes[...] = fresh


def row_sigma2(rows: np.ndarray) -> np.ndarray:
    """``sum_x2 / n_per_row`` per row, the sum taken in C's order (Q4_0/Q5_0 importance encoders)."""
    squares = np.ascontiguousarray(rows.T) ** 2
    return seq_sum(squares) / F32(rows.shape[1])


def symmetric_32_tiles(
    rows: np.ndarray, importance: np.ndarray | None, nmax: int
) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
    """Q4_0/Q5_0's encoders (``nmax`` 8/16), tile by tile: ``(blocks, d, codes)``.

    ``blocks`` is the tile's slice of the row-major 32-blocks of ``rows``, ``d`` their float32 scales and
    ``codes`` uint8 ``[tile, 32]``. Without importance, ``quantize_row_q{4,5}_0_ref``; with it,
    ``quantize_row_q{4,5}_0_impl``: ``make_qx_quants(32, nmax)`` weighted by
    ``qw[j] * sqrtf(sigma2 + x[j]*x[j])``, ``sigma2`` the row's mean square.
    """
    blocks = rows.reshape(-1, 32)
    if importance is not None:
        sigma2 = np.repeat(row_sigma2(rows), rows.shape[1] // 32)
        qw = np.tile(importance.reshape(-1, 32).T, (1, rows.shape[0]))
    tile = TILE_WEIGHTS // 32
    for start in range(0, blocks.shape[0], tile):
        part = slice(start, start + tile)
        if importance is None:
            yield (part, *_reference_codes(blocks[part], nmax))
        else:
            x = element_major(blocks[part], 32)
            d, codes = make_qx_quants(x, nmax, qw[:, part] * np.sqrt(sigma2[part] + x * x))
            yield part, d, np.ascontiguousarray(codes.T)


def _reference_codes(blocks: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """``d = max / -nmax``, ``codes = MIN(2nmax-1, (int8_t)(x/d + nmax+.5))`` for ``blocks [G, 32]``.

    For finite ``x/d`` (|x/d| <= nmax) the truncation is that of the clamped float. C converts infinite
    and NaN values to ``INT_MIN`` (x86), whose low byte is 0: where ``1/d`` overflows (``d`` denormal)
    every value is infinite or NaN and the block's codes are set to 0; a NaN weight's value stays NaN
    through the clamp and numpy's cast gives 0 as well.
    """
    # Block extremes from the blocks' 16-byte runs (4 weights) transposed: [8, 4G], cheap to move.
    runs = np.ascontiguousarray(blocks.view(_RUN).T).view(F32)
    top = np.fmax.reduce(runs, axis=0).reshape(-1, 4)
    bottom = np.fmin.reduce(runs, axis=0).reshape(-1, 4)
    _, vmax = _signed_extreme(
        np.fmax(np.fmax(top[:, 0], top[:, 1]), np.fmax(top[:, 2], top[:, 3])),
        np.fmin(np.fmin(bottom[:, 0], bottom[:, 1]), np.fmin(bottom[:, 2], bottom[:, 3])),
        lambda groups: blocks[groups].T,
    )
    d = vmax / F32(-nmax)
    with np.errstate(divide="ignore", over="ignore"):
        inverse = select(d != 0, F32(1) / d, np.zeros_like(d))
    shifted = blocks * np.repeat(inverse, 32).reshape(-1, 32)
    shifted += F32(nmax + 0.5)
    np.clip(shifted, F32(0), F32(2 * nmax - 1), out=shifted)  # finite values are > -1: truncate to >= 0
    codes = shifted.astype(np.uint8)
    codes[np.isinf(inverse)] = 0
    return d, codes


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """The ``qs`` of the 32-weight types (Q4_0, Q4_1, Q5_0, Q5_1): ``(q[j] & 15) | (q[j+16] & 15) << 4``.

    Codes uint8 ``[G, 32]`` -> ``[G, 16]``.
    """
    low = codes.view(np.uint64) & np.uint64(0x0F0F0F0F0F0F0F0F)  # [G, 4]: eight codes per word
    packed = np.empty((codes.shape[0], 2), dtype=np.uint64)
    packed[:, 0] = low[:, 0] | (low[:, 2] << np.uint64(4))
    packed[:, 1] = low[:, 1] | (low[:, 3] << np.uint64(4))
    return packed.view(np.uint8)
