"""Quantization schemes, registered by name in :data:`SCHEMES` (importing this package fills it).

Each method is one module: a :class:`Scheme` registered under its name, whose ``config_type`` is the
dataclass of its settings (:mod:`quantkit.schemes.config`).
"""

from quantkit.schemes import absmax, cast, gptq, kquant, ternary, zeropoint  # noqa: F401  (registration)
from quantkit.schemes.base import SCHEMES, BlockQuantized, CastTensor, IntQuantized, Quantized, Scheme
from quantkit.schemes.cast import CastConfig
from quantkit.schemes.config import (
    AbsmaxConfig,
    IntConfig,
    SchemeConfig,
    ZeropointConfig,
    config_type,
    make_config,
)
from quantkit.schemes.gptq import GptqConfig
from quantkit.schemes.kquant import KquantConfig
from quantkit.schemes.ternary import TernaryConfig

__all__ = [
    "SCHEMES",
    "AbsmaxConfig",
    "BlockQuantized",
    "CastConfig",
    "CastTensor",
    "GptqConfig",
    "IntConfig",
    "IntQuantized",
    "KquantConfig",
    "Quantized",
    "Scheme",
    "SchemeConfig",
    "TernaryConfig",
    "ZeropointConfig",
    "config_type",
    "make_config",
]
