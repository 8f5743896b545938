"""Asymmetric (zero-point) integer quantization: ``w ≈ (q - z) * scale``.

Codes are signed b-bit integers ``[-2^(b-1), 2^(b-1)-1]`` with an integer zero point
``z`` in the same range (compressed-tensors' convention). The range of each group is
widened to include 0 so that zero weights stay exactly zero; it is chosen by ``config.clip``
(:mod:`quantkit.schemes.clipping`).
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
from quantkit.schemes.clipping import clip_low_high


class ZeroPointScheme(Scheme):
    def quantize(self, weight: torch.Tensor, config: SchemeConfig) -> IntQuantized:
        qmin, qmax = -(2 ** (config.bits - 1)), 2 ** (config.bits - 1) - 1
        dtype = storage_dtype(weight)

        def params_for(low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            scale = finish_scale((high - low) / (qmax - qmin), dtype)
            zero_point = torch.clamp(torch.round(qmin - low / scale.to(torch.float32)), qmin, qmax)
            return scale, zero_point

        def codes_for(groups: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
            shifted = torch.round(groups / scale.to(torch.float32).unsqueeze(-1)) + zero_point.unsqueeze(-1)
            return torch.clamp(shifted, qmin, qmax)

        def fake_quantize(groups: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
            scale, zero_point = params_for(low, high)  # dequantized in the scale's dtype, as IntQuantized does
            codes = codes_for(groups, scale, zero_point).to(dtype) - zero_point.to(dtype).unsqueeze(-1)
            return (codes * scale.unsqueeze(-1)).to(torch.float32)

        groups = group_view(weight, config)  # (rows, n_groups, group)
        scale, zero_point = params_for(*clip_low_high(groups, config, fake_quantize))  # (rows, n_groups)
        return IntQuantized(
            codes=codes_for(groups, scale, zero_point).reshape(weight.shape).to(torch.int8),
            scale=scale.reshape(scale_shape(config, weight)),
            zero_point=zero_point.to(torch.int8).reshape(scale_shape(config, weight)),
            config=config,
        )


SCHEMES.add("zeropoint", ZeroPointScheme())
