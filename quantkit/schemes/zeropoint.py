"""Asymmetric (zero-point) integer quantization: ``w ≈ (q - z) * scale``.

Codes are signed b-bit integers ``[-2^(b-1), 2^(b-1)-1]`` with an integer zero point
``z`` in the same range (compressed-tensors' convention). The range of each group is
widened to include 0 so that zero weights stay exactly zero.
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


class ZeroPointScheme(Scheme):
    def quantize(self, weight: torch.Tensor, config: SchemeConfig) -> IntQuantized:
        qmin, qmax = -(2 ** (config.bits - 1)), 2 ** (config.bits - 1) - 1
        groups = group_view(weight, config)  # (rows, n_groups, group)
        low = groups.amin(dim=-1).clamp(max=0)
        high = groups.amax(dim=-1).clamp(min=0)
        scale = finish_scale((high - low) / (qmax - qmin), storage_dtype(weight))
        scale32 = scale.to(torch.float32)
        zero_point = torch.clamp(torch.round(qmin - low / scale32), qmin, qmax)
        codes = torch.clamp(torch.round(groups / scale32.unsqueeze(-1)) + zero_point.unsqueeze(-1), qmin, qmax)
        return IntQuantized(
            codes=codes.reshape(weight.shape).to(torch.int8),
            scale=scale.reshape(scale_shape(config, weight)),
            zero_point=zero_point.to(torch.int8).reshape(scale_shape(config, weight)),
            config=config,
        )


SCHEMES.add("zeropoint", ZeroPointScheme())
