"""GPTQ as a registered method (the solver lives in :mod:`quantkit.gptq`).

GPTQ needs the Hessian of each weight's inputs, which only the layer-by-layer pipeline has
(:mod:`quantkit.gptq.sequential`, driven by ``quantize``). Called on a weight alone, as any scheme
can be, it solves with an identity Hessian: round-to-nearest on GPTQ's grid (zero points, or the
absmax ``full`` range with ``symmetric``).
"""

from __future__ import annotations

import torch

from quantkit.schemes.base import SCHEMES, IntQuantized, Scheme, SchemeConfig


class GptqScheme(Scheme):
    needs_hessian = True

    def quantize(
        self, weight: torch.Tensor, config: SchemeConfig, importance: torch.Tensor | None = None
    ) -> IntQuantized:
        from quantkit.gptq.solver import gptq_quantize

        result = gptq_quantize(
            weight, torch.eye(weight.shape[1]), bits=config.bits,
            group_size=config.group_size if config.granularity == "group" else None, symmetric=config.symmetric,
            block_size=config.block_size, damp=config.damp, mse_clip=config.clip == "mse",
        )
        return IntQuantized(codes=result.codes, scale=result.scale, zero_point=result.zero_point, config=config)


SCHEMES.add("gptq", GptqScheme())
