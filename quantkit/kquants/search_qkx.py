"""ggml's k-quant scale searches, vectorised over sub-blocks and exact to the bit.

Ports of ``make_qkx2_quants``/``make_qkx3_quants`` (one function: with weights given they are the
same search), ``make_qp_quants`` and the final requantisation step shared by Q2_K, Q4_K and Q5_K.

Callers silence numpy's floating-point warnings: like C, the searches divide by zero and overflow on
degenerate blocks and then discard (or keep, exactly as C does) those values.

Arrays are *element-major*: ``x[i, s]`` is element ``i`` of sub-block ``s``. C sums one element at a
time (``sum += ...`` for i = 0..n-1); ``np.add.reduce(a, axis=0)`` over the leading axis adds the rows
in that order, whereas numpy's reductions along a contiguous axis are pairwise and round differently.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from quantkit.kquants.base import QK_K
from quantkit.kquants.ggml_math import F32, c_uint8_of, nearest_int, seq_sum
from quantkit.kquants.search_qx import element_major, row_sigma2

GROUP_MAX_EPS = F32(1e-15)
PIECE_BLOCKS = 512  # super-blocks encoded at a time: the search's temporaries stay cache-sized


def positive_max(values: np.ndarray) -> np.ndarray:
    """C's ``m = 0; for (...) if (v > m) m = v;`` over axis 0 (NaNs skipped, as in C)."""
    top = np.zeros(values.shape[1:], dtype=F32)
    for v in values:
        top = np.where(v > top, v, top)
    return top


def block_importance(importance: np.ndarray | None, n_rows: int) -> np.ndarray | None:
    """A row's importance ``[n_per_row]`` repeated for every row, as super-blocks ``[n_blocks, 256]``."""
    if importance is None:
        return None
    per_row = importance.reshape(1, -1, QK_K)
    return np.broadcast_to(per_row, (n_rows, *per_row.shape[1:])).reshape(-1, QK_K)


def encode_in_pieces(
    rows: np.ndarray, importance: np.ndarray | None, type_size: int,
    encode_piece: Callable[[np.ndarray, np.ndarray | None], np.ndarray],
) -> np.ndarray:
    """Rows ``[n_rows, n_per_row]`` as super-blocks, encoded ``PIECE_BLOCKS`` at a time by ``encode_piece``.

    ``encode_piece(x [n, 256], importance [n, 256] | None)`` returns the blocks' bytes ``[n, type_size]``.
    Like ggml, the searches divide by zero or overflow on degenerate blocks and then discard those
    values, so floating-point warnings are silenced.
    """
    x = np.ascontiguousarray(rows, dtype=np.float32).reshape(-1, QK_K)
    qw = block_importance(importance, rows.shape[0])
    out = np.empty((x.shape[0], type_size), dtype=np.uint8)
    with np.errstate(all="ignore"):
        for start in range(0, x.shape[0], PIECE_BLOCKS):
            part = slice(start, start + PIECE_BLOCKS)
            out[part] = encode_piece(x[part], None if qw is None else qw[part])
    return out.reshape(rows.shape[0], -1)


def make_qkx_quants(
    x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``make_qkx2_quants``/``make_qkx3_quants`` for element-major ``x``, ``weights`` (float32 ``[n, m]``).

    Returns ``(scale [m], the_min [m], L [n, m])``: ``x ~ scale * L - the_min`` with ``L`` in ``0..nmax``
    (float32 codes). Sub-blocks with ``max == min`` get ``scale = 0``, ``L = 0``.
    """
    fnmax = F32(nmax)
    sum_w = seq_sum(weights)
    sum_x = seq_sum(weights * x)
    xmin, xmax = x[0], x[0]
    for v in x[1:]:  # C's compare-and-replace loop: a NaN is skipped unless it is x[0]
        xmin = np.where(v < xmin, v, xmin)
        xmax = np.where(v > xmax, v, xmax)
    lo = np.where(xmin > 0, F32(0), xmin)
    nan_free = not np.isnan(x).any()
    flat = xmax == lo
    span = np.where(flat, F32(1), xmax - lo)
    shifted = x - lo

    iscale = fnmax / span
    scale = F32(1) / iscale
    levels = _levels(iscale, shifted, xmin - lo, xmax - lo, nan_free, fnmax, np.empty_like(x))
    best = seq_sum(_weighted_error(scale * levels + lo - x, weights, use_mad))
    # the winning step's codes are recomputed at the end from its iscale and min (same float ops)
    win_iscale, win_lo = iscale, lo

    wl = np.empty_like(x)
    prod = np.empty_like(x)
    for step in range(nstep + 1):
        # C updates ``min`` when a step wins, and later steps use the updated value
        iscale = (F32(rmin) + F32(rdelta) * F32(step) + fnmax) / span
        _levels(iscale, shifted, xmin - lo, xmax - lo, nan_free, fnmax, levels)
        np.multiply(weights, levels, out=wl)
        sum_l = seq_sum(wl)
        sum_l2 = seq_sum(np.multiply(wl, levels, out=prod))
        sum_xl = seq_sum(np.multiply(wl, x, out=prod))
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        clamp = this_min > 0
        this_min[clamp] = 0
        this_scale[clamp] = (sum_xl / sum_l2)[clamp]
        np.multiply(this_scale, levels, out=prod)
        prod += this_min
        prod -= x
        err = seq_sum(_weighted_error(prod, weights, use_mad, out=prod))
        better = (det > 0) & (err < best)
        if better.any():
            best = np.where(better, err, best)
            win_iscale = np.where(better, iscale, win_iscale)
            win_lo = np.where(better, lo, win_lo)
            scale = np.where(better, this_scale, scale)
            lo = np.where(better, this_min, lo)
            span = np.where(flat, F32(1), xmax - lo)
            np.subtract(x, lo, out=shifted)

    np.subtract(x, win_lo, out=shifted)
    codes = _levels(win_iscale, shifted, xmin - win_lo, xmax - win_lo, nan_free, fnmax, levels)
    codes[:, flat] = 0
    scale[flat] = 0
    return scale, -lo, codes


def _levels(
    iscale: np.ndarray,
    shifted: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    nan_free: bool,
    fnmax: np.float32,
    out: np.ndarray,
) -> np.ndarray:
    """``MAX(0, MIN(nmax, nearest_int(iscale * shifted)))`` as float32 into ``out``.

    ``low``/``high`` bound ``shifted`` per sub-block; when every ``|iscale * shifted|`` is below 2**22
    (and no input is NaN), ``nearest_int`` is round-half-even and ``np.rint`` is used (the fast case).
    """
    np.multiply(iscale, shifted, out=out)
    reach = np.maximum(np.abs(iscale * low), np.abs(iscale * high))
    if nan_free and np.all(reach < F32(4194303)):
        np.rint(out, out=out)
    else:
        out[...] = nearest_int(out)
    return np.clip(out, F32(0), fnmax, out=out)


def _weighted_error(diff: np.ndarray, weights: np.ndarray, use_mad: bool, out: np.ndarray | None = None) -> np.ndarray:
    """``w * fabsf(diff)`` or ``w * (diff * diff)`` elementwise."""
    dist = np.abs(diff, out=out) if use_mad else np.multiply(diff, diff, out=out)
    return np.multiply(weights, dist, out=dist)


def make_qp_quants(x: np.ndarray, weights: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """``make_qp_quants`` for element-major sub-block scales or mins ``x`` and ``weights`` (float32 ``[n, m]``).

    Returns ``(scale [m], L [n, m])`` with ``L`` as the C ``uint8_t`` codes (int32, 0..255).
    """
    n = x.shape[0]
    fnmax = F32(nmax)
    xmax = np.zeros(x.shape[1], dtype=F32)
    for v in x:  # MAX(max, x[i]) = max > x[i] ? max : x[i]
        xmax = np.where(xmax > v, xmax, v)
    zero = xmax < GROUP_MAX_EPS
    top = np.where(zero, F32(1), xmax)
    iscale = fnmax / top
    codes = nearest_int(iscale * x) & 0xFF
    diff = x - (F32(1) / iscale) * codes.astype(F32)
    best = seq_sum(weights * diff * diff)
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        iscale_is = (F32(0.1) * F32(step) + fnmax) / top
        lvl = np.minimum(nmax, nearest_int(iscale_is * x)).astype(F32)
        diff = x - (F32(1) / iscale_is) * lvl
        mse = seq_sum(weights * diff * diff)
        better = mse < best
        best = np.where(better, mse, best)
        iscale = np.where(better, iscale_is, iscale)

    lvl_int = np.minimum(nmax, nearest_int(iscale * x))
    codes = lvl_int & 0xFF
    lvl = lvl_int.astype(F32)
    wx = weights * x
    sumlx = seq_sum(wx * lvl)
    suml2 = seq_sum(weights * lvl * lvl)
    for _ in range(5):
        changed = False
        for i in range(n):
            cur = codes[i].astype(F32)
            slx = sumlx - wx[i] * cur
            sl2 = suml2 - weights[i] * cur * cur
            usable = (slx > 0) & (sl2 > 0)
            new_l = np.minimum(nmax, nearest_int(x[i] * sl2 / slx))
            new_f = new_l.astype(F32)
            slx = slx + wx[i] * new_f
            sl2 = sl2 + weights[i] * new_f * new_f
            take = usable & (new_l != codes[i]) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            if take.any():
                changed = True
                codes[i] = np.where(take, new_l & 0xFF, codes[i])
                sumlx = np.where(take, slx, sumlx)
                suml2 = np.where(take, sl2, suml2)
        if not changed:  # C stops each block after a pass without change; further passes change nothing
            break
    scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    scale[zero] = 0
    codes[:, zero] = 0
    return scale, codes


def make_qp_quants_pair(
    scales: np.ndarray, mins: np.ndarray, weights: np.ndarray, nmax: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``make_qp_quants`` of the sub-block scales and of the mins ``[n, m]`` in one vectorised call.

    Returns ``(d, Ls, dmin, Lm)``.
    """
    m = scales.shape[1]
    both, codes = make_qp_quants(
        np.concatenate([scales, mins], axis=1), np.concatenate([weights, weights], axis=1), nmax
    )
    return both[:m], codes[:, :m], both[m:], codes[:, m:]


def requantize_with_mins(x: np.ndarray, d: np.ndarray, dm: np.ndarray, codes: np.ndarray, nmax: int) -> np.ndarray:
    """Final pass: ``L = clamp(nearest_int((x + dm) / d), 0, nmax)`` where ``d != 0``, else keep ``codes``.

    ``x``/``codes`` element-major ``[n, m]``; ``d``/``dm`` (the decoded sub-block scale and min) ``[m]``.
    """
    live = d != 0
    fresh = np.clip(nearest_int((x + dm) / np.where(live, d, F32(1))), 0, nmax).astype(F32)
    return np.where(live, fresh, codes)


def asymmetric_32_tiles(
    rows: np.ndarray, importance: np.ndarray | None, nmax: int, tile_weights: int = 1 << 17
) -> Iterator[tuple[slice, np.ndarray, np.ndarray, np.ndarray]]:
    """Q4_1/Q5_1's encoders (``nmax`` 15/31), tile by tile: ``(blocks, d, m, codes)``.

    ``blocks`` is the tile's slice of the row-major 32-blocks of ``rows``; ``d``/``m`` float32 scale and
    minimum (weight = d * q + m); ``codes`` the C ``uint8_t`` codes ``[tile, 32]`` (for Q4_1 after its
    ``MIN(15, (int8_t)...)``). Without importance ``quantize_row_q{4,5}_1_ref``: ``min``/``max`` of the
    block, ``d = (max - min) / nmax``, ``q = (x - min) * (1/d) + 0.5`` truncated. With importance
    ``quantize_row_q{4,5}_1_impl``: ``make_qkx3_quants(32, nmax, rmin -0.9, rdelta 0.05, 36 steps)``
    weighted by ``qw[j] * sqrtf(sigma2 + x[j]*x[j])``, ``sigma2`` the row's mean square, ``m = -the_min``.
    """
    blocks = rows.reshape(-1, 32)
    tile = tile_weights // 32
    with np.errstate(all="ignore"):  # like C, degenerate blocks overflow or divide by zero
        if importance is not None:
            sigma2 = np.repeat(row_sigma2(rows), rows.shape[1] // 32)
            qw = np.tile(importance.reshape(-1, 32).T, (1, rows.shape[0]))
        for start in range(0, blocks.shape[0], tile):
            part = slice(start, start + tile)
            if importance is None:
                yield (part, *_reference_min_max_codes(blocks[part], nmax))
            else:
                x = element_major(blocks[part], 32)
                scale, the_min, levels = make_qkx_quants(
                    x, qw[:, part] * np.sqrt(sigma2[part] + x * x), nmax, -0.9, 0.05, 36, False
                )
                yield part, scale, -the_min, np.ascontiguousarray(levels.T).astype(np.uint8)


def _reference_min_max_codes(blocks: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``quantize_row_q{4,5}_1_ref`` on ``blocks [G, 32]``: ``(d, min, codes [G, 32])``."""
    low, high = np.fmin.reduce(blocks, axis=1), np.fmax.reduce(blocks, axis=1)
    # C's ``if (v < min) min = v; if (v > max) max = v;`` from FLT_MAX / -FLT_MAX skips NaNs and keeps the first
    # of equal values; fmin/fmax may pick either zero of -0.0 and +0.0 and give NaN for an all-NaN block
    unsure = np.flatnonzero(np.isnan(low) | (low == 0) | (high == 0))
    if unsure.size:
        low[unsure], high[unsure] = _sequential_min_max(blocks[unsure])
    d = (high - low) / F32(nmax)
    inverse = np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0))
    shifted = blocks - low[:, None]
    shifted *= inverse[:, None]
    shifted += F32(0.5)
    codes = c_uint8_of(shifted)
    if nmax == 15:  # Q4_1: MIN(15, (int8_t)(...)) stored in a uint8_t
        codes = np.minimum(codes.view(np.int8), np.int8(15)).view(np.uint8)
    return d, low, codes


def _sequential_min_max(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """C's min/max loop over ``blocks [G, 32]``, element by element."""
    low = np.full(blocks.shape[0], np.finfo(F32).max, dtype=F32)
    high = -low
    for v in blocks.T:
        low = np.where(v < low, v, low)
        high = np.where(v > high, v, high)
    return low, high
