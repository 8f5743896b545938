"""Ternary weights (BitNet b1.58): codes in ``{-1, 0, +1}`` times one scale per tensor (default), row or group.

Codes follow BitNet b1.58's absmean rule: ``gamma = mean(|W|)`` over the tensor or group, ``codes =
clamp(round(W / gamma), -1, 1)``. The stored scale is then the mean ``|W|`` of the weights whose code is not
zero, the least-squares scale for those codes (``<W, c> / <c, c>``): a weight that is already ternary
(``W = s * c``, as in a model trained ternary) is stored exactly, where ``gamma`` itself (``s`` times the
share of non-zero codes) would shrink it. An all-zero group stores scale 1 and codes 0.

Codes are written as 2-bit symmetric integers (compressed-tensors ``pack-quantized``, ``num_bits: 2``, whose
range ``[-2, 1]`` holds ``{-1, 0, +1}``); ``--format gguf`` stores them as ggml's TQ2_0 (or TQ1_0 with
``--type TQ1_0``, see :mod:`quantkit.formats.gguf.ternary`).

This exists for models trained ternary. On a model trained in float, ternarizing after training destroys
it (docs/user-guide.md#ternary: stories260K's perplexity goes from 6.35 to 1,285); the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.errors import QuantkitError
from quantkit.schemes.base import SCHEMES, IntQuantized, Scheme, group_views, join_groups, scale_shape, storage_dtype
from quantkit.schemes.config import Granularity, IntConfig

TQ_TYPES = ("TQ1_0", "TQ2_0")  # ggml's ternary block types, for --format gguf
DEFAULT_TQ_TYPE = "TQ2_0"  # the faster of the two in llama.cpp; TQ1_0 is smaller (1.6875 vs 2.0625 bits/weight)
METHOD = "ternary"
# ||W - Q|| / ||W|| below this: the weight was already ternary (up to the fp16 rounding of a GGUF block scale)
ALREADY_TERNARY_ERROR = 1e-2
# measured (docs/user-guide.md#ternary): stories260K, float32, TinyStories validation, 512-token windows
MEASURED = "stories260K: perplexity 6.35 in float, 7.50 absmax int4, 1,285 ternary"


@dataclass(frozen=True)
class TernaryConfig(IntConfig):
    """Ternary codes with an absmean-chosen scale; ``ggml_type`` picks the GGUF block type."""

    bits: int = 2  # codes -1, 0, +1 stored as 2-bit integers
    granularity: Granularity = "tensor"
    ggml_type: str | None = None  # TQ1_0 or TQ2_0 in a GGUF file; None: TQ2_0

    @classmethod
    def carried_settings(cls) -> frozenset[str]:
        """From another method only the activation settings carry over: the grid is ternary's own."""
        return frozenset({"activations", "activation_range", "percentile"})

    @property
    def writes_zero_points(self) -> bool:
        return False

    def describe(self) -> str:
        grid = {"tensor": "per-tensor", "channel": "per-channel"}.get(self.granularity, f"g{self.group_size}")
        acts = {"static": f", A8 static {self.activation_range}", "dynamic": ", A8 dynamic"}.get(self.activations, "")
        gguf = f", GGUF {self.ggml_type}" if self.ggml_type else ""
        return f"{METHOD} {grid} absmean{acts}{gguf}"

    def validate(self) -> None:
        super().validate()
        if self.bits != 2:
            raise QuantkitError(f"ternary codes -1, 0, +1 are stored in 2 bits; bits must be 2, got {self.bits}")
        if self.clip != "minmax":
            raise QuantkitError(f"ternary scales are absmeans; weight clip {self.clip} does not apply")
        if self.ggml_type is not None and self.ggml_type not in TQ_TYPES:
            raise QuantkitError(f"ternary weights are GGUF {' or '.join(TQ_TYPES)}, not {self.ggml_type}")


def ternarize(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``[rows, n_groups, group]`` -> (scale float64 ``[rows, n_groups]``, codes int8, same shape).

    Sums are in float64: ``n`` copies of a float32 ``s`` add up exactly, so the mean is ``s`` again.
    """
    magnitude = groups.abs().to(torch.float64)
    gamma = magnitude.mean(dim=-1, keepdim=True)
    safe = torch.where(gamma > 0, gamma, torch.ones_like(gamma))
    codes = torch.clamp(torch.round(groups.to(torch.float64) / safe), -1, 1)
    kept = codes != 0
    count = kept.sum(dim=-1)
    total = torch.where(kept, magnitude, torch.zeros_like(magnitude)).sum(dim=-1)
    scale = torch.where(count > 0, total / count.clamp(min=1), torch.ones_like(total))
    return scale, codes.to(torch.int8)


class TernaryScheme(Scheme[TernaryConfig]):
    config_type = TernaryConfig

    def quantize(
        self, weight: torch.Tensor, config: TernaryConfig, importance: torch.Tensor | None = None
    ) -> IntQuantized:
        scales, codes = [], []
        for groups in group_views(weight, config):  # (rows, n_groups, group); a partial last group apart
            scale, code = ternarize(groups)
            scales.append(scale.to(storage_dtype(weight)))
            codes.append(code)
        rows = weight.shape[0]
        return IntQuantized(
            codes=join_groups(codes, rows).reshape(weight.shape),
            scale=join_groups(scales, rows).reshape(scale_shape(config, weight)),
            zero_point=None,
            config=config,
        )


def post_training_warning(records: list[tuple[str, float | None]]) -> str | None:
    """The report's note when ternary weights (``(scheme described, relative error)`` of each record) were not
    ternary before: ternarizing a model trained in float destroys it. None when every one was."""
    errors = [error or 0.0 for scheme, error in records if scheme.startswith(METHOD)]
    changed = [error for error in errors if error > ALREADY_TERNARY_ERROR]
    if not changed:
        return None
    return (f"{len(changed)} of {len(errors)} ternary weight(s) were not ternary before (mean ||W-Q||/||W|| "
            f"{sum(changed) / len(changed):.2f}): post-training ternarization destroys the quality of a model "
            f"trained in float ({MEASURED}). --method ternary is for models trained ternary (BitNet b1.58)")


SCHEMES.add(METHOD, TernaryScheme())
