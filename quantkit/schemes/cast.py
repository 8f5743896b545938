"""Float casts as trivial schemes: ``fp16`` and ``bf16``."""

from __future__ import annotations

import torch

from quantkit.schemes.base import SCHEMES, CastTensor, Scheme, SchemeConfig


class CastScheme(Scheme):
    integer = False

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def quantize(
        self, weight: torch.Tensor, config: SchemeConfig, importance: torch.Tensor | None = None
    ) -> CastTensor:
        return CastTensor(weight.to(self.dtype), config)


SCHEMES.add("fp16", CastScheme(torch.float16))
SCHEMES.add("bf16", CastScheme(torch.bfloat16))
