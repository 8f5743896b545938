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

from quantkit.schemes.base import SCHEMES, IntQuantized, Scheme, group_views, join_groups, scale_shape, storage_dtype
from quantkit.schemes.config import AbsmaxConfig
from quantkit.schemes.grid import Grid


class AbsmaxScheme(Scheme[AbsmaxConfig]):
    config_type = AbsmaxConfig

    def quantize(
        self, weight: torch.Tensor, config: AbsmaxConfig, importance: torch.Tensor | None = None
    ) -> IntQuantized:
        grid = Grid(config.bits, True, storage_dtype(weight), config.range, config.clip, config.percentile)
        scales, codes = [], []
        for groups in group_views(weight, config):  # (rows, n_groups, group); a partial last group apart
            scale, _ = grid.params(groups)  # (rows, n_groups)
            scales.append(scale)
            codes.append(grid.codes(groups, scale.unsqueeze(-1), None))
        rows = weight.shape[0]
        return IntQuantized(
            codes=join_groups(codes, rows).reshape(weight.shape).to(torch.int8),
            scale=join_groups(scales, rows).reshape(scale_shape(config, weight)),
            zero_point=None,
            config=config,
        )


SCHEMES.add("absmax", AbsmaxScheme())
