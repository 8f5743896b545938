"""Range selectors: the clipping value ``amax`` for a tensor, chosen from its |x| histogram.

Each selector is ``select(hist, *, num_bits=8, ...) -> amax`` and is registered by name
in :data:`RANGE_SELECTORS`. The histogram-based ones reproduce NVIDIA TensorRT /
ModelOpt's ``HistogramCalibrator.compute_amax`` (defaults: start_bin 128, stride 1,
percentile 99.99) bin for bin; ``edges`` and ``counts`` are the histogram's, ``c`` its
bin centres ``(edges[:-1] + edges[1:]) / 2`` (float32).

- ``minmax``: the largest |x| observed (no histogram needed).
- ``percentile``: share = cumsum(counts / total) (float64); amax = ``edges[k]``, the
  *left* edge of the first bin ``k`` where the share reaches p/100. At p = 100 it is
  the top edge of the highest non-empty bin instead: nothing is clipped (ModelOpt's
  float cumsum lands on either side of 1.0 and may clip the top bin).
- ``mse``: every bin ``i >= start_bin`` is a candidate with amax = ``c[i]``; all
  centres are fake-quantized on the symmetric grid ``scale = (2^(b-1)-1) / amax``,
  ``q = clamp(round_half_even(c * scale), -(2^(b-1)-1), 2^(b-1)-1) / scale`` (float32,
  as the quantizer computes it); loss = ``mean(counts * (q - c)^2)`` (float64). The
  first minimum wins.
- ``kl`` (TensorRT's "entropy"): bin 0 (mostly exact zeros) is replaced by bin 1's
  count. For every ``i >= start_bin`` (up to and including ``num_bins``): P =
  ``counts[:i]`` with the clipped tail ``sum(counts[i:])`` added to its last bin; Q =
  ``counts[:i]`` merged into ``2^(b-1)`` groups (bin ``j`` joins group
  ``floor(2^(b-1) * j / i)``), each group's count spread evenly over its non-empty
  bins, empty bins staying empty. Score KL(P || Q) on the normalised pair (infinite
  when P has mass where Q has none); the *last* minimum wins; amax = ``edges[i]``.

The mse and kl sweeps are vectorised: all candidates at once as a ``(candidates, bins)``
matrix, chunked to bound memory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from quantkit.errors import QuantkitError
from quantkit.ranges.histogram import AbsHistogram
from quantkit.registry import Registry

RangeSelector = Callable[..., float]
RANGE_SELECTORS: Registry[RangeSelector] = Registry("range selector")

DEFAULT_START_BIN = 128
DEFAULT_PERCENTILE = 99.99
MIN_BITS, MAX_BITS = 2, 16
_SWEEP_CHUNK = 1 << 21  # elements of one (candidates, bins) float64 matrix per step (16 MiB)


@RANGE_SELECTORS.register("minmax")
def minmax(hist: AbsHistogram, *, num_bits: int = 8) -> float:
    """The largest |x| observed."""
    _require_data(hist)
    return hist.absmax


@RANGE_SELECTORS.register("percentile")
def percentile(hist: AbsHistogram, *, num_bits: int = 8, percentile: float = DEFAULT_PERCENTILE) -> float:
    """Left edge of the bin where the cumulative share of |x| reaches ``percentile`` %."""
    if not 0 <= percentile <= 100:
        raise QuantkitError(f"percentile must be between 0 and 100, got {percentile}")
    _require_data(hist)
    if not hist.num_bins:
        return 0.0
    counts = hist.counts.cpu()
    if percentile == 100:
        return float(hist.edges[int(counts.nonzero().max()) + 1])
    share = torch.cumsum(counts.double() / counts.sum(), dim=0)
    k = int(torch.searchsorted(share, torch.tensor([percentile / 100], dtype=torch.float64)))
    return float(hist.edges[k])


@RANGE_SELECTORS.register("mse")
def mse(hist: AbsHistogram, *, num_bits: int = 8, start_bin: int = DEFAULT_START_BIN, stride: int = 1) -> float:
    """The bin centre that minimises the count-weighted squared fake-quantization error."""
    _require_data(hist)
    if not hist.num_bins:
        return 0.0
    n = hist.num_bins
    _check_bits(num_bits)
    candidates = _candidates(hist, start_bin, 0, n - 1, stride)
    centres = (hist.edges[1:] + hist.edges[:-1]) / 2  # (n,) float32, as ModelOpt
    counts = hist.counts.cpu().double()
    qmax = torch.tensor(2.0 ** (num_bits - 1) - 1.0)  # float32
    losses = []
    for chunk in candidates.split(max(1, _SWEEP_CHUNK // n)):
        scale = qmax / centres[chunk].unsqueeze(1)  # (C, 1) float32
        quant = torch.clamp(torch.round(centres * scale), -qmax, qmax) / scale  # (C, n) float32
        err = quant.double() - centres.double()
        losses.append((err * err * counts).mean(dim=1))  # (C,)
    best = int(torch.argmin(torch.cat(losses)))  # first minimum
    return float(centres[candidates[best]])


@RANGE_SELECTORS.register("kl")
def kl(hist: AbsHistogram, *, num_bits: int = 8, start_bin: int = DEFAULT_START_BIN, stride: int = 1) -> float:
    """The bin edge whose clipped, 2^(b-1)-level requantized histogram is closest in KL divergence."""
    _require_data(hist)
    if not hist.num_bins:
        return 0.0
    n = hist.num_bins
    _check_bits(num_bits)
    candidates = _candidates(hist, start_bin, 1, n, stride)
    levels = 1 << (num_bits - 1)
    h = hist.counts.cpu().double()
    h[0] = h[1]  # bin 0 holds the exact zeros (dead units, padding): give it its neighbour's weight
    cum = torch.cat([h.new_zeros(1), torch.cumsum(h, 0)])  # (n + 1,) cum[k] = sum(h[:k]), exact integers
    cum_filled = torch.cat([h.new_zeros(1), torch.cumsum((h > 0).double(), 0)])  # non-empty bins in h[:k]
    total = cum[-1]
    level = torch.arange(levels + 1)
    scores = []
    for chunk in candidates.split(max(1, _SWEEP_CHUNK // n)):
        i = chunk.unsqueeze(1)  # (C, 1)
        j = torch.arange(int(chunk[-1]))  # (w,) bins kept by the widest candidate of the chunk
        # group k of candidate i holds bins [ceil(k i / L), ceil((k + 1) i / L)), i.e. bin j is in floor(L j / i)
        bounds = (level * i + levels - 1) // levels  # (C, L + 1)
        spread = cum[bounds].diff(dim=1) / cum_filled[bounds].diff(dim=1).clamp(min=1)  # (C, L) per non-empty bin
        p = torch.where(j < i, h[: len(j)], 0.0)  # (C, w) the kept bins
        group = (levels * j // i).clamp(max=levels - 1)  # (C, w); bins past i are masked out by p == 0
        q = torch.where(p > 0, spread.gather(1, group), 0.0)
        p.scatter_add_(1, i - 1, (total - cum[chunk]).unsqueeze(1))  # clipped tail into the last kept bin
        p = p / total
        q = q / q.sum(dim=1, keepdim=True)
        terms = torch.where(p > 0, p * torch.log(p / q), 0.0)  # inf where q == 0 < p
        scores.append(terms.sum(dim=1))
    score = torch.cat(scores).nan_to_num(nan=torch.inf)  # nan: every kept bin empty, no Q at all
    last_best = len(score) - 1 - int(torch.argmin(score.flip(0)))  # last minimum
    return float(hist.edges[candidates[last_best]])


def _require_data(hist: AbsHistogram) -> None:
    if not hist.count:
        raise QuantkitError(f"{hist.name}: no calibration data was observed, cannot choose a range")


def _check_bits(num_bits: int) -> None:
    if not MIN_BITS <= num_bits <= MAX_BITS:
        raise QuantkitError(f"num_bits must be between {MIN_BITS} and {MAX_BITS} for a range sweep, got {num_bits}")


def _candidates(hist: AbsHistogram, start_bin: int, first: int, last: int, stride: int) -> torch.Tensor:
    """Candidate bins ``start_bin, start_bin + stride, ... <= last``; ``start_bin`` must lie in ``[first, last]``."""
    if stride < 1:
        raise QuantkitError(f"stride must be at least 1, got {stride}")
    if not first <= start_bin <= last:
        raise QuantkitError(
            f"{hist.name}: start_bin must be between {first} and {last} for a histogram of {hist.num_bins} bins, "
            f"got {start_bin}"
        )
    return torch.arange(start_bin, last + 1, stride)
