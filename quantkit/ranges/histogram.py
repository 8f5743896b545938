"""A histogram of |x| collected batch by batch, bin for bin as NVIDIA ModelOpt's ``HistogramCalibrator``.

The first batch fixes the bin width: ``num_bins`` bins over ``[0, max|x|]``
(``edges = torch.linspace(0, max, num_bins + 1)`` in float32). A later batch whose
max lies above the top edge appends bins of the *same* width; old counts stay where
they are::

    batch 1, max = m1:  |0 .. w .. 2w .. ............ m1|              num_bins bins
    batch 2, max = m2:  |0 .. w .. 2w .. ............ m1| .. | .. |m2  ceil(m2 / w) bins
                        edges = torch.arange(0, m2 + w, w)

Each batch is binned the way ``torch.histc(|x|, bins=n, min=0, max=edges[-1])`` bins
it (float32 ``|x| * n / edges[-1]``, truncated; the top edge belongs to the last bin),
which is ModelOpt's default ``torch_hist=True`` path on CPU: edges and counts match it
exactly. Where we differ on purpose:

- counts are int64 (ModelOpt keeps float32 counts, which stop being exact past 2^24
  values in one bin);
- if float rounding makes ``arange`` stop below the new max, one more bin is added
  (ModelOpt would silently drop the values above its top edge), and the bin count is
  always ``len(edges) - 1`` (ModelOpt computes it separately with ``ceil``);
- all-zero batches before the first non-zero one are counted into bin 0 once the
  range is known (ModelOpt builds a zero-width histogram and breaks);
- NaN or infinite values are an error instead of a corrupt histogram.
"""

from __future__ import annotations

import math

import torch

from quantkit.errors import QuantkitError

DEFAULT_BINS = 2048
_BIN_CHUNK = 1 << 24  # values binned at once: bounds the int64 index buffer (128 MiB)


class AbsHistogram:
    """Observer of ``|x|``: fixed-width bins from 0 that grow with the max, plus min/max/absmax/count.

    ``counts`` (int64, ``(num_bins,)``) and ``edges`` (float32, ``(num_bins + 1,)``,
    ``edges[0] == 0``) are empty until a batch with a non-zero value arrives.
    """

    def __init__(self, num_bins: int = DEFAULT_BINS, *, skip_zeros: bool = False, name: str = "tensor") -> None:
        if num_bins < 2:
            raise QuantkitError(f"a calibration histogram needs at least 2 bins, got {num_bins}")
        self.initial_bins = num_bins
        self.skip_zeros = skip_zeros
        self.name = name
        self.counts = torch.zeros(0, dtype=torch.int64)
        self.edges = torch.zeros(0, dtype=torch.float32)
        self.min = math.inf  # signed extremes of everything observed
        self.max = -math.inf
        self.count = 0  # values observed (zeros included, even with skip_zeros)
        self._early_zeros = 0  # zeros seen before the range was known

    @property
    def num_bins(self) -> int:
        return int(self.counts.numel())

    @property
    def absmax(self) -> float:
        return max(-self.min, self.max, 0.0) if self.count else 0.0

    @property
    def width(self) -> float:
        """Bin width fixed by the first non-zero batch (0 before it)."""
        return float(self.edges[1]) if self.num_bins else 0.0

    def observe(self, x: torch.Tensor) -> None:
        """Add one batch (any shape, any float dtype, any device)."""
        x = x.detach()
        if x.numel() == 0:
            return
        lo, hi = (float(v) for v in torch.aminmax(x.flatten()))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise QuantkitError(f"{self.name}: calibration batch contains NaN or infinite values")
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.count += x.numel()

        mags = x.flatten().float().abs()  # (N,) ModelOpt bins float32 magnitudes
        if self.skip_zeros:
            mags = mags[mags != 0]
        if mags.numel() == 0:
            return
        top = mags.max().cpu()  # 0-dim float32
        if not self.num_bins:
            if top == 0:
                self._early_zeros += mags.numel()
                return
            self.edges = torch.linspace(0.0, float(top), self.initial_bins + 1, dtype=torch.float32)
            self.counts = torch.zeros(self.initial_bins, dtype=torch.int64, device=mags.device)
            self.counts[0] += self._early_zeros
            self._early_zeros = 0
        elif top > self.edges[-1]:
            self._extend(top)
        self.counts += self._bin(mags).to(self.counts.device)

    def _extend(self, top: torch.Tensor) -> None:
        """Append bins of the current width until the top edge covers ``top`` (old bins unchanged)."""
        width = self.edges[1] - self.edges[0]  # float32, as ModelOpt reads it
        end = top + width  # float32 sum, as ModelOpt
        edges = torch.arange(0.0, float(end), float(width), dtype=torch.float32)
        if edges[-1] < top:  # float rounding stopped arange one bin short
            edges = torch.arange(0.0, float(end + width), float(width), dtype=torch.float32)
        grown = torch.zeros(edges.numel() - 1, dtype=torch.int64, device=self.counts.device)
        grown[: self.num_bins] = self.counts
        self.edges, self.counts = edges, grown

    def _bin(self, mags: torch.Tensor) -> torch.Tensor:
        """Counts per bin for float32 magnitudes ``<= edges[-1]``, bin for bin as ``torch.histc``."""
        n, top = self.num_bins, float(self.edges[-1])
        counts = torch.zeros(n, dtype=torch.int64, device=mags.device)
        for chunk in mags.split(_BIN_CHUNK):
            # histc: pos = (int64)((x - 0) * n / top) in float32; x == top goes to the last bin
            pos = chunk.mul(n).div_(top).to(torch.int64).clamp_(max=n - 1)
            counts += torch.bincount(pos, minlength=n)
        return counts

    def __repr__(self) -> str:
        top = float(self.edges[-1]) if self.num_bins else 0.0
        return f"AbsHistogram({self.name!r}, bins={self.num_bins}, top={top:.6g}, count={self.count})"
