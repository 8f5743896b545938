"""The integer grid a group of weights is quantized onto: one implementation for absmax, zeropoint and GPTQ.

A :class:`Grid` finds each group's range (:mod:`quantkit.schemes.clipping`: minmax, percentile or MSE),
its scale (rounded to the storage dtype) and zero point, the codes, and the dequantized values computed
in the scale's dtype, as clients decode them. GPTQ's ``Quantizer`` (IST-DASLab/gptq ``quant.py``) puts a
group on the same grid:

- asymmetric: GPTQ's unsigned ``q = clamp(round(w / s) + z, 0, 2^b - 1)`` minus ``2^(b-1)`` is
  :mod:`~quantkit.schemes.zeropoint`'s signed code, its zero point likewise shifted;
  ``s = (max(w, 0) - min(w, 0)) / (2^b - 1)`` in both.
- symmetric (``sym=True``): ``s = 2 max|w| / (2^b - 1)`` with ``z = 2^(b-1)`` is
  :mod:`~quantkit.schemes.absmax`'s ``full`` range, ``s = max|w| / (2^(b-1) - 0.5)``, codes in
  ``[-2^(b-1), 2^(b-1) - 1]`` and no zero point.

Two cases where GPTQ's Quantizer
differs, both for degenerate groups: an all-zero group gets scale 1 (GPTQ widens it to [-1, 1]; both give
zero weights), and GPTQ's symmetric grid on a group with no negative weight uses only half its codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.schemes.base import finish_scale
from quantkit.schemes.clipping import clip_amax, clip_low_high
from quantkit.schemes.config import AbsmaxConfig, IntConfig, RangeMode, ZeropointConfig


def absmax_range(bits: int, mode: str) -> tuple[int, int]:
    """Integer code range ``(qmin, qmax)`` for ``bits`` under the restricted/full convention."""
    qmax = 2 ** (bits - 1) - 1
    return (-qmax, qmax) if mode == "restricted" else (-qmax - 1, qmax)


@dataclass(frozen=True)
class Grid:
    """``bits``-bit codes: zeropoint (full signed range), or absmax with ``range`` when ``symmetric``.

    Scales are stored in ``dtype``; ``clip`` and ``percentile`` choose each group's range.
    """

    bits: int
    symmetric: bool
    dtype: torch.dtype
    range: RangeMode = "full"
    clip: str = "minmax"
    percentile: float = 99.99

    @property
    def qmin(self) -> int:
        return absmax_range(self.bits, self.range if self.symmetric else "full")[0]

    @property
    def qmax(self) -> int:
        return absmax_range(self.bits, self.range if self.symmetric else "full")[1]

    @property
    def config(self) -> IntConfig:
        """The scheme whose codes these are (``granularity`` and ``group_size`` are the caller's)."""
        if self.symmetric:
            return AbsmaxConfig("absmax", bits=self.bits, clip=self.clip, percentile=self.percentile, range=self.range)
        return ZeropointConfig("zeropoint", bits=self.bits, clip=self.clip, percentile=self.percentile)

    def params(self, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scale (``dtype``) and zero point (float32 integers; None when symmetric) ``[rows, n_groups]``.

        ``groups`` is float32 ``[rows, n_groups, group]``; as GPTQ's ``Quantizer.find_params(W, weight=True)``.
        """
        if self.symmetric:
            return self._scale_for(clip_amax(groups, self.config, self._fake_quantize_amax)), None
        return self._params_for(*clip_low_high(groups, self.config, self._fake_quantize_low_high))

    def codes(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        """Float32 integer codes of ``w``; ``scale`` and ``zero`` broadcast against it."""
        shifted = torch.round(w / scale.to(torch.float32))
        if zero is not None:
            shifted = shifted + zero
        return torch.clamp(shifted, self.qmin, self.qmax)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        """``(codes - zero) * scale`` computed in ``dtype`` as clients do, returned as float32."""
        values = codes.to(self.dtype)
        if zero is not None:
            values = values - zero.to(self.dtype)
        return (values * scale).to(torch.float32)

    def _scale_for(self, amax: torch.Tensor) -> torch.Tensor:
        return finish_scale(amax / ((self.qmax - self.qmin) / 2), self.dtype)

    def _params_for(self, low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = finish_scale((high - low) / (self.qmax - self.qmin), self.dtype)
        zero = torch.clamp(torch.round(self.qmin - low / scale.to(torch.float32)), self.qmin, self.qmax)
        return scale, zero

    def _fake_quantize_amax(self, groups: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        scale = self._scale_for(amax).unsqueeze(-1)
        return self.dequantize(self.codes(groups, scale, None), scale, None)

    def _fake_quantize_low_high(self, groups: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        scale, zero = (t.unsqueeze(-1) for t in self._params_for(low, high))
        return self.dequantize(self.codes(groups, scale, zero), scale, zero)
