"""Quantization schemes, registered by name in :data:`SCHEMES` (importing this package fills it)."""

from quantkit.schemes import absmax, cast, gptq, zeropoint  # noqa: F401  (registration)
from quantkit.schemes.base import SCHEMES, CastTensor, IntQuantized, Quantized, Scheme, SchemeConfig

__all__ = ["SCHEMES", "CastTensor", "IntQuantized", "Quantized", "Scheme", "SchemeConfig"]
