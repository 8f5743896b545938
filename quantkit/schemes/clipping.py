"""Per-group weight clipping (``--weight-clip``): the range each integer scheme puts its grid on.

Given the grouped float32 weight ``[rows, n_groups, group]`` (:func:`~quantkit.schemes.base.group_view`),
:func:`clip_amax` returns absmax's per-group amax and :func:`clip_low_high` zeropoint's per-group
``(low, high)``, always widened to include 0:

- ``minmax``: the group's extremes (max |w|; min and max of w). Nothing is clipped.
- ``percentile``: absmax takes the p-th percentile of |w|; zeropoint the (100 - p)-th of w as
  ``low`` and the p-th as ``high``. Percentiles interpolate linearly between order statistics,
  NumPy's default method: for ``n`` sorted values ``v``, rank ``r = p / 100 * (n - 1)`` (float64)
  and value ``lerp(v[floor r], v[floor r + 1], r - floor r)`` (``torch.quantile`` uses the same rule
  but rounds the rank to float32, and refuses more than 2^24 values). p = 100 gives exactly minmax.
  A group whose clipped range is 0 (mostly exact zeros) keeps its minmax range, so no non-zero
  weight meets the scale-1 fallback meant for all-zero groups.
- ``mse``: GPTQ's ``Quantizer.find_params(mse=True)`` (IST-DASLab/gptq ``quant.py``): starting from
  the minmax range, for ``i`` in ``range(int(0.8 * 100))`` shrink it by ``p = 1 - i / 100``, quantize
  the group on the scheme's own grid (its scale rounded to the storage dtype and the dequantization
  done in that dtype, exactly as the scheme will), and keep the shrink with the smallest
  ``sum |Q - W|^2.4``; ties keep the earlier (larger) range. ``i = 0`` is minmax, so mse never does
  worse than minmax in that norm.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from quantkit.schemes.config import IntConfig

MSE_GRID = 100
MSE_MAX_SHRINK = 0.8
MSE_NORM = 2.4
_SEARCH_CHUNK = 1 << 18  # weights fake-quantized at once in the mse search (bounds its temporaries)

AmaxQuantizer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(groups, amax) -> dequantized groups`` on absmax's grid."""
LowHighQuantizer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(groups, low, high) -> dequantized groups`` on zeropoint's grid."""


def clip_amax(groups: torch.Tensor, config: IntConfig, fake_quantize: AmaxQuantizer) -> torch.Tensor:
    """Per-group amax ``[rows, n_groups]`` for absmax under ``config.clip``."""
    amax = groups.abs().amax(dim=-1)
    if config.clip == "percentile":
        clipped = sorted_percentile(groups.abs().sort(dim=-1).values, config.percentile)
        return torch.where(clipped == 0, amax, clipped)
    if config.clip == "mse":
        (amax,) = _shrink_search(groups, (amax,), fake_quantize)
    return amax


def clip_low_high(
    groups: torch.Tensor, config: IntConfig, fake_quantize: LowHighQuantizer
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``(low, high)`` ``[rows, n_groups]`` for zeropoint under ``config.clip``, with low <= 0 <= high."""
    low = groups.amin(dim=-1).clamp(max=0)
    high = groups.amax(dim=-1).clamp(min=0)
    if config.clip == "percentile":
        ordered = groups.sort(dim=-1).values
        low_p = sorted_percentile(ordered, 100 - config.percentile).clamp(max=0)
        high_p = sorted_percentile(ordered, config.percentile).clamp(min=0)
        empty = low_p == high_p
        return torch.where(empty, low, low_p), torch.where(empty, high, high_p)
    if config.clip == "mse":
        low, high = _shrink_search(groups, (low, high), fake_quantize)
    return low, high


def sorted_percentile(ordered: torch.Tensor, percentile: float) -> torch.Tensor:
    """The ``percentile``-th percentile along the last dim of already sorted values (linear interpolation)."""
    n = ordered.shape[-1]
    rank = percentile / 100 * (n - 1)
    below = math.floor(rank)  # <= n - 1 as percentile <= 100
    above = min(below + 1, n - 1)
    return torch.lerp(ordered[..., below], ordered[..., above], rank - below)


def _shrink_search(
    groups: torch.Tensor, bounds: tuple[torch.Tensor, ...], fake_quantize: Callable[..., torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    """GPTQ's shrink grid: per group, the ``p * bounds`` with the least ``sum |Q - W|^norm`` (first minimum wins)."""
    best = tuple(b.clone() for b in bounds)
    rows_per_chunk = max(1, _SEARCH_CHUNK // max(1, groups.shape[1] * groups.shape[2]))
    for start in range(0, groups.shape[0], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        chunk = groups[rows]
        best_err = torch.full(chunk.shape[:-1], math.inf, device=chunk.device)
        for i in range(int(MSE_MAX_SHRINK * MSE_GRID)):
            p = 1 - i / MSE_GRID
            candidate = tuple(p * b[rows] for b in bounds)
            err = (fake_quantize(chunk, *candidate) - chunk).abs_().pow_(MSE_NORM).sum(dim=-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            for kept, value in zip(best, candidate, strict=True):
                kept[rows] = torch.where(better, value, kept[rows])
    return best
