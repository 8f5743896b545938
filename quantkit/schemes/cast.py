"""Float casts as trivial schemes: ``fp16`` and ``bf16`` (no settings)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.schemes.base import SCHEMES, CastTensor, Scheme
from quantkit.schemes.config import SchemeConfig


@dataclass(frozen=True)
class CastConfig(SchemeConfig):
    """A cast to the method's float dtype."""

    def describe(self) -> str:
        return self.method

    def bits_per_weight(self, shape: tuple[int, ...], scale_bits: int) -> float:
        return 16.0


class CastScheme(Scheme[CastConfig]):
    config_type = CastConfig

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def quantize(
        self, weight: torch.Tensor, config: CastConfig, importance: torch.Tensor | None = None
    ) -> CastTensor:
        return CastTensor(weight.to(self.dtype), config)


SCHEMES.add("fp16", CastScheme(torch.float16))
SCHEMES.add("bf16", CastScheme(torch.bfloat16))
