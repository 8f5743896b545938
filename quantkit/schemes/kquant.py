"""ggml k-quants (and Q4_0/Q5_0/Q8_0) as a registered method: weights become ggml block bytes.

The block type of each weight is ``config.ggml_type``, set by the plan (from ``--type`` or a
llama.cpp-style preset, see :mod:`quantkit.kquants.presets`). With an importance vector (from
``quantkit calibrate``) ggml's importance-weighted encoders run; without, its reference encoders.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.errors import QuantkitError
from quantkit.kquants import BLOCK_FORMATS, encode
from quantkit.kquants.preset_overrides import TypeOverrides
from quantkit.kquants.presets import KQUANT_PRESETS
from quantkit.schemes.base import SCHEMES, BlockQuantized, Scheme
from quantkit.schemes.config import SchemeConfig


@dataclass(frozen=True)
class KquantConfig(SchemeConfig):
    """One ggml block type for every weight, or a llama.cpp preset choosing each weight's type."""

    ggml_type: str | None = None  # the ggml block type (Q4_K, ...); None: chosen by kquant_preset
    kquant_preset: str | None = None  # llama.cpp-style preset deciding each tensor's type (Q4_K_M, ...)
    # llama-quantize's overrides of the preset (quantkit.kquants.preset_overrides): PATTERN=TYPE entries,
    # space-separated (--tensor-type), and the types of output.weight and token_embd.weight
    tensor_types: str | None = None
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None

    def overrides(self) -> TypeOverrides:
        """The preset's overrides, parsed."""
        return TypeOverrides.parse(self.tensor_types, self.output_tensor_type, self.token_embedding_type)

    def describe(self) -> str:
        return f"kquant {self.ggml_type or self.kquant_preset}"

    def validate(self) -> None:
        if self.ggml_type is None and self.kquant_preset is None:
            raise QuantkitError("kquant needs a block type (--type Q4_K) or a preset (--preset Q4_K_M)")
        if self.ggml_type is not None:
            BLOCK_FORMATS.get(self.ggml_type)
        if self.kquant_preset is not None:
            KQUANT_PRESETS.get(self.kquant_preset)
        overrides = self.overrides()
        if overrides != TypeOverrides() and self.kquant_preset is None:
            raise QuantkitError("--tensor-type, --output-tensor-type and --token-embedding-type override a "
                                "k-quant preset's choice: give one (--preset Q4_K_M)")

    def check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if len(shape) != 2:
            raise QuantkitError(f"{name}: kquant quantizes 2-D weights, got shape {list(shape)}")

    def bits_per_weight(self, shape: tuple[int, ...], scale_bits: int) -> float:
        assert self.ggml_type is not None, "plans resolve every kquant tensor's block type"
        return BLOCK_FORMATS.get(self.ggml_type).bits_per_weight


class KQuantScheme(Scheme[KquantConfig]):
    config_type = KquantConfig

    def quantize(
        self, weight: torch.Tensor, config: KquantConfig, importance: torch.Tensor | None = None
    ) -> BlockQuantized:
        assert config.ggml_type is not None, "plans resolve every kquant tensor's block type"
        rows = weight.detach().to(torch.float32).cpu().numpy()
        weights = None if importance is None else importance.to(torch.float32).cpu().numpy()
        data = encode(config.ggml_type, rows, weights)
        return BlockQuantized(data, config.ggml_type, (rows.shape[0], rows.shape[1]), config, importance is not None)


SCHEMES.add("kquant", KQuantScheme())
