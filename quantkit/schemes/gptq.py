"""GPTQ as a registered method: its settings (:class:`GptqConfig`) and a solve without a Hessian.

GPTQ needs the Hessian of each weight's inputs, which only the layer-by-layer pipeline has
(:mod:`quantkit.gptq.sequential`, driven by ``quantize``). Called on a weight alone, as any scheme
can be, it solves with an identity Hessian: round-to-nearest on GPTQ's grid (zero points, or the
absmax ``full`` range with ``symmetric``). The solver is :mod:`quantkit.schemes.gptq_solver`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.errors import QuantkitError
from quantkit.schemes.base import SCHEMES, IntQuantized, Scheme
from quantkit.schemes.config import IntConfig
from quantkit.schemes.gptq_solver import GROUP_FITS, gptq_quantize


@dataclass(frozen=True)
class GptqConfig(IntConfig):
    """GPTQ's grid (zero points unless ``symmetric``) and its solver's settings."""

    symmetric: bool = False  # absmax grid (full range) instead of zero points
    act_order: bool = False  # columns in decreasing order of the Hessian diagonal
    static_groups: bool = False  # group parameters fixed before the act-order permutation
    damp: float = 0.01  # dampening added to the Hessian diagonal, as a fraction of its mean
    block_size: int = 128  # columns per lazy batch update
    group_fit: str = "block-start"  # a group fitted to its block's start weights (the reference's) or its current ones

    @property
    def writes_zero_points(self) -> bool:
        return not self.symmetric

    def _grid_details(self) -> str:
        details = (", sym" if self.symmetric else "") + (", act-order" if self.act_order else "")
        details += ", static groups" if self.static_groups else ""
        return details + (", groups fitted to current weights" if self.group_fit == "current" else "")

    def validate(self) -> None:
        super().validate()
        if not 0 < self.damp < 1:
            raise QuantkitError(f"damp must be in (0, 1), got {self.damp}")
        if self.block_size < 1:
            raise QuantkitError(f"block size must be positive, got {self.block_size}")
        if self.group_fit not in GROUP_FITS:
            raise QuantkitError(f"group_fit must be one of {', '.join(GROUP_FITS)}, got {self.group_fit!r}")


class GptqScheme(Scheme[GptqConfig]):
    config_type = GptqConfig
    needs_hessian = True

    def quantize(
        self, weight: torch.Tensor, config: GptqConfig, importance: torch.Tensor | None = None
    ) -> IntQuantized:
        result = gptq_quantize(
            weight, torch.eye(weight.shape[1]), bits=config.bits,
            group_size=config.group_size if config.granularity == "group" else None, symmetric=config.symmetric,
            block_size=config.block_size, damp=config.damp, mse_clip=config.clip == "mse", group_fit=config.group_fit,
        )
        return IntQuantized(codes=result.codes, scale=result.scale, zero_point=result.zero_point, config=config)


SCHEMES.add("gptq", GptqScheme())
