"""Asymmetric (zero-point) integer quantization: ``w ≈ (q - z) * scale``.

Codes are signed b-bit integers ``[-2^(b-1), 2^(b-1)-1]`` with an integer zero point
``z`` in the same range (compressed-tensors' convention). The range of each group is
widened to include 0 so that zero weights stay exactly zero; it is chosen by ``config.clip``
(:mod:`quantkit.schemes.clipping`).
"""

from __future__ import annotations

import torch

from quantkit.schemes.base import SCHEMES, IntQuantized, Scheme, group_views, join_groups, scale_shape, storage_dtype
from quantkit.schemes.config import ZeropointConfig
from quantkit.schemes.grid import Grid


class ZeroPointScheme(Scheme[ZeropointConfig]):
    config_type = ZeropointConfig

    def quantize(
        self, weight: torch.Tensor, config: ZeropointConfig, importance: torch.Tensor | None = None
    ) -> IntQuantized:
        grid = Grid(config.bits, False, storage_dtype(weight), clip=config.clip, percentile=config.percentile)
        scales, zeros, codes = [], [], []
        for groups in group_views(weight, config):  # (rows, n_groups, group); a partial last group apart
            scale, zero_point = grid.params(groups)  # (rows, n_groups)
            assert zero_point is not None
            scales.append(scale)
            zeros.append(zero_point)
            codes.append(grid.codes(groups, scale.unsqueeze(-1), zero_point.unsqueeze(-1)))
        rows = weight.shape[0]
        return IntQuantized(
            codes=join_groups(codes, rows).reshape(weight.shape).to(torch.int8),
            scale=join_groups(scales, rows).reshape(scale_shape(config, weight)),
            zero_point=join_groups(zeros, rows).to(torch.int8).reshape(scale_shape(config, weight)),
            config=config,
        )


SCHEMES.add("zeropoint", ZeroPointScheme())
