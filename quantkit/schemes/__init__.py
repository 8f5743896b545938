"""Quantization schemes, registered by name in :data:`SCHEMES` (importing this package fills it)."""

from quantkit.schemes import absmax, cast, gptq, kquant, zeropoint  # noqa: F401  (registration)
from quantkit.schemes.base import SCHEMES, BlockQuantized, CastTensor, IntQuantized, Quantized, Scheme, SchemeConfig

__all__ = ["SCHEMES", "BlockQuantized", "CastTensor", "IntQuantized", "Quantized", "Scheme", "SchemeConfig"]
