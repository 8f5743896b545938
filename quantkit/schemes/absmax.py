"""Symmetric (absmax) integer quantization: ``w ≈ q * scale``, no zero point.

Ranges for b bits:
- ``restricted`` (default) ``[-(2^(b-1)-1), 2^(b-1)-1]``, scale = absmax / (2^(b-1)-1):
  the grid is symmetric, so +absmax and -absmax are both exact.
- ``full`` ``[-2^(b-1), 2^(b-1)-1]``, scale = absmax / (2^(b-1) - 0.5): the extra negative
  code is used; +absmax clips by half a step (PyTorch's and compressed-tensors' convention).

``absmax`` is per group and chosen by ``config.clip`` (:mod:`quantkit.schemes.clipping`).
"""

from __future__ import annotations

import torch

from quantkit.schemes.base import (
    SCHEMES,
    IntQuantized,
    Scheme,
    SchemeConfig,
    finish_scale,
    group_view,
    scale_shape,
    storage_dtype,
)
from quantkit.schemes.clipping import clip_amax


def absmax_range(bits: int, mode: str) -> tuple[int, int]:
    """Integer code range ``(qmin, qmax)`` for ``bits`` under the restricted/full convention."""
    qmax = 2 ** (bits - 1) - 1
    return (-qmax, qmax) if mode == "restricted" else (-qmax - 1, qmax)


class AbsmaxScheme(Scheme):
    def quantize(self, weight: torch.Tensor, config: SchemeConfig) -> IntQuantized:
        qmin, qmax = absmax_range(config.bits, config.range)
        dtype = storage_dtype(weight)

        def scale_for(amax: torch.Tensor) -> torch.Tensor:
            return finish_scale(amax / ((qmax - qmin) / 2), dtype)

        def codes_for(groups: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return torch.clamp(torch.round(groups / scale.to(torch.float32).unsqueeze(-1)), qmin, qmax)

        def fake_quantize(groups: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
            scale = scale_for(amax)  # dequantized in the scale's dtype, as IntQuantized.dequantize does
            return (codes_for(groups, scale).to(dtype) * scale.unsqueeze(-1)).to(torch.float32)

        groups = group_view(weight, config)  # (rows, n_groups, group)
        scale = scale_for(clip_amax(groups, config, fake_quantize))  # (rows, n_groups)
        return IntQuantized(
            codes=codes_for(groups, scale).reshape(weight.shape).to(torch.int8),
            scale=scale.reshape(scale_shape(config, weight)),
            zero_point=None,
            config=config,
        )


SCHEMES.add("absmax", AbsmaxScheme())
