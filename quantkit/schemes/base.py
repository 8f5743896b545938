"""The scheme interface: pure functions from a float weight to its quantized form and back.

A scheme never touches files. It turns a 2-D weight ``[out, in]`` into an
:class:`IntQuantized` (integer codes plus scales and zero points on a grid of
``tensor``/``channel``/``group`` granularity) or a :class:`CastTensor` (a float cast).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch

from quantkit.errors import QuantkitError
from quantkit.registry import Registry

Granularity = Literal["tensor", "channel", "group"]
RangeMode = Literal["restricted", "full"]
MIN_BITS, MAX_BITS = 2, 8
WEIGHT_CLIPS = ("minmax", "percentile", "mse")
ACTIVATION_MODES = ("none", "static", "dynamic")
ACTIVATION_BITS = 8


@dataclass(frozen=True)
class SchemeConfig:
    """What to do with one weight: method name plus its integer-grid parameters."""

    method: str
    bits: int = 8
    granularity: Granularity = "channel"
    group_size: int | None = None
    range: RangeMode = "restricted"
    clip: str = "minmax"  # weight clipping per channel/group: one of WEIGHT_CLIPS
    percentile: float = 99.99  # for clip/activation_range "percentile"
    activations: str = "none"  # INT8 input activations: none (weight-only), static or dynamic
    activation_range: str = "minmax"  # selector for static input scales (quantkit.calib.ranges)
    symmetric: bool = False  # gptq: absmax grid (full range) instead of zero points
    act_order: bool = False  # gptq: columns in decreasing order of the Hessian diagonal
    static_groups: bool = False  # gptq: group parameters fixed before the act-order permutation
    damp: float = 0.01  # gptq: dampening added to the Hessian diagonal, as a fraction of its mean
    block_size: int = 128  # gptq: columns per lazy batch update
    ggml_type: str | None = None  # kquant: the ggml block type (Q4_K, ...); None: chosen by kquant_preset
    kquant_preset: str | None = None  # kquant: llama.cpp-style preset deciding each tensor's type (Q4_K_M, ...)

    def describe(self) -> str:
        scheme = SCHEMES.get(self.method)
        if self.method == "kquant":
            return f"kquant {self.ggml_type or self.kquant_preset}"
        if not scheme.integer:
            return self.method
        grid = {"tensor": "per-tensor", "channel": "per-channel"}.get(self.granularity, f"g{self.group_size}")
        rng = f", {self.range}" if self.method == "absmax" else ""
        if self.method == "gptq":
            rng = (", sym" if self.symmetric else "") + (", act-order" if self.act_order else "")
            rng += ", static groups" if self.static_groups else ""
        clip = f", clip {self.clip}" if self.clip != "minmax" else ""
        acts = {"none": "", "static": f", A8 static {self.activation_range}", "dynamic": ", A8 dynamic"}
        return f"{self.method} int{self.bits} {grid}{rng}{clip}{acts.get(self.activations, '')}"

    def with_updates(self, **changes: object) -> SchemeConfig:
        """A copy with ``changes``; a group size implies group granularity."""
        changes = {k: v for k, v in changes.items() if v is not None}
        updated = replace(self, **changes)  # type: ignore[arg-type]
        if "group_size" in changes and "granularity" not in changes:
            updated = replace(updated, granularity="group")
        if updated.granularity != "group":
            updated = replace(updated, group_size=None)
        return updated

    def validate(self) -> None:
        """One-line errors for impossible settings (independent of any tensor)."""
        scheme = SCHEMES.get(self.method)
        if self.method == "kquant":
            self._validate_kquant()
        if not scheme.integer:
            if self.activations != "none":
                raise QuantkitError(f"activation quantization needs an integer weight method, not {self.method}")
            return
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise QuantkitError(f"bits must be between {MIN_BITS} and {MAX_BITS} for {self.method}, got {self.bits}")
        if self.granularity not in ("tensor", "channel", "group"):
            raise QuantkitError(f"granularity must be tensor, channel or group, got {self.granularity!r}")
        if self.granularity == "group" and (self.group_size is None or self.group_size <= 0):
            raise QuantkitError(f"group granularity needs a positive group size, got {self.group_size}")
        if self.range not in ("restricted", "full"):
            raise QuantkitError(f"range must be restricted or full, got {self.range!r}")
        if self.clip not in WEIGHT_CLIPS:
            raise QuantkitError(f"weight clip must be one of {', '.join(WEIGHT_CLIPS)}, got {self.clip!r}")
        if not 0 < self.percentile <= 100:
            raise QuantkitError(f"percentile must be in (0, 100], got {self.percentile}")
        if self.activations not in ACTIVATION_MODES:
            raise QuantkitError(
                f"activations must be one of {', '.join(ACTIVATION_MODES)}, got {self.activations!r}"
            )
        if not 0 < self.damp < 1:
            raise QuantkitError(f"damp must be in (0, 1), got {self.damp}")
        if self.block_size < 1:
            raise QuantkitError(f"block size must be positive, got {self.block_size}")
        from quantkit.calib.ranges import RANGE_SELECTORS

        RANGE_SELECTORS.get(self.activation_range)

    def _validate_kquant(self) -> None:
        from quantkit.kquants import BLOCK_FORMATS
        from quantkit.kquants.presets import KQUANT_PRESETS

        if self.ggml_type is None and self.kquant_preset is None:
            raise QuantkitError("kquant needs a block type (--type Q4_K) or a preset (--preset Q4_K_M)")
        if self.ggml_type is not None:
            BLOCK_FORMATS.get(self.ggml_type)
        if self.kquant_preset is not None:
            KQUANT_PRESETS.get(self.kquant_preset)

    def check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        """One-line error when ``name`` of ``shape`` cannot take this scheme."""
        if self.method == "kquant" and len(shape) != 2:
            raise QuantkitError(f"{name}: kquant quantizes 2-D weights, got shape {list(shape)}")
        if not SCHEMES.get(self.method).integer:
            return
        if len(shape) != 2:
            raise QuantkitError(f"{name}: {self.method} quantizes 2-D weights, got shape {list(shape)}")
        if self.granularity == "group" and self.group_size and shape[1] % self.group_size:
            raise QuantkitError(
                f"{name}: group size {self.group_size} does not divide its row length {shape[1]}"
            )


@dataclass
class IntQuantized:
    """Signed integer codes with scales (and zero points): ``w ≈ (codes - zero_point) * scale``.

    ``codes`` int8 ``[out, in]``; ``scale`` and ``zero_point`` ``[out, n_groups]`` for
    channel (n_groups = 1) and group granularity, ``[1]`` for tensor granularity.

    ``g_idx`` (int32 ``[in]``, optional) maps each input column to its scale column: column ``c``
    uses ``scale[:, g_idx[c]]``. GPTQ with act-order (without static groups) makes groups that are
    not contiguous; without ``g_idx`` column ``c`` belongs to group ``c // group_size``.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    config: SchemeConfig
    g_idx: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    def dequantize(self) -> torch.Tensor:
        """The float weight, computed exactly as compressed-tensors does (in the scale's dtype)."""
        return dequantize_codes(self.codes, self.scale, self.zero_point, self.config.group_size, self.g_idx)

    @property
    def bits_per_weight(self) -> float:
        """Storage cost per weight, scales and zero points included."""
        numel = self.codes.numel()
        overhead = self.scale.numel() * self.scale.element_size() * 8
        if self.zero_point is not None:
            overhead += self.zero_point.numel() * self.config.bits
        return self.config.bits + overhead / numel


@dataclass
class CastTensor:
    """A weight kept in float, cast to another dtype (the fp16/bf16 schemes)."""

    tensor: torch.Tensor
    config: SchemeConfig

    def dequantize(self) -> torch.Tensor:
        return self.tensor

    @property
    def bits_per_weight(self) -> float:
        return float(self.tensor.element_size() * 8)


@dataclass
class BlockQuantized:
    """A weight as ggml blocks: uint8 ``data [out, row_bytes]`` of block type ``ggml_type``.

    ``importance`` records whether ggml's importance-weighted encoder made the blocks.
    """

    data: np.ndarray
    ggml_type: str
    shape: tuple[int, int]
    config: SchemeConfig
    importance: bool = False

    def dequantize(self) -> torch.Tensor:
        from quantkit.kquants import decode

        return torch.from_numpy(decode(self.ggml_type, self.data, self.shape[1]))

    @property
    def bits_per_weight(self) -> float:
        return self.data.size * 8 / (self.shape[0] * self.shape[1])


Quantized = IntQuantized | CastTensor | BlockQuantized


class Scheme(ABC):
    """A registered quantization method."""

    integer: bool = True
    needs_hessian: bool = False  # quantized by the layer-by-layer GPTQ pipeline, not tensor by tensor

    @abstractmethod
    def quantize(self, weight: torch.Tensor, config: SchemeConfig, importance: torch.Tensor | None = None) -> Quantized:
        """Quantize a 2-D float weight ``[out, in]``.

        ``importance`` (float32 ``[in]``, the mean square of each input channel from calibration) is
        used by schemes that weight their error by it (k-quants) and ignored by the others.
        """


SCHEMES: Registry[Scheme] = Registry("method")


def group_view(weight: torch.Tensor, config: SchemeConfig) -> torch.Tensor:
    """``weight`` as ``[rows, n_groups, group]`` for the config's granularity, in float32."""
    out_features, in_features = weight.shape
    w = weight.to(torch.float32)
    if config.granularity == "tensor":
        return w.reshape(1, 1, -1)
    if config.granularity == "channel":
        return w.reshape(out_features, 1, in_features)
    assert config.group_size is not None
    return w.reshape(out_features, in_features // config.group_size, config.group_size)


def storage_dtype(weight: torch.Tensor) -> torch.dtype:
    """Scales are stored in the weight's own float dtype, as compressed-tensors writers do."""
    return weight.dtype if weight.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


def finish_scale(raw_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round the scale to its storage dtype; all-zero groups get scale 1 (their codes are 0)."""
    scale = raw_scale.to(dtype)
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def scale_shape(config: SchemeConfig, weight: torch.Tensor) -> tuple[int, ...]:
    if config.granularity == "tensor":
        return (1,)
    return (weight.shape[0], -1)


def dequantize_codes(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    group_size: int | None,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(codes - zero_point) * scale`` broadcast over groups, in ``scale.dtype``.

    With ``g_idx`` (int ``[in]``), column ``c`` uses scale and zero-point column ``g_idx[c]``
    (act-order groups); otherwise groups are contiguous runs of ``in / n_groups`` columns.
    """
    out_features, in_features = codes.shape
    if scale.ndim == 1:  # per-tensor
        values = codes.to(scale.dtype)
        if zero_point is not None:
            values = values - zero_point.to(scale.dtype)
        return values * scale
    if g_idx is not None:
        index = g_idx.to(torch.long)
        values = codes.to(scale.dtype)
        if zero_point is not None:
            values = values - zero_point.to(scale.dtype)[:, index]
        return values * scale[:, index]
    n_groups = scale.shape[1]
    grouped = codes.reshape(out_features, n_groups, in_features // n_groups).to(scale.dtype)
    if zero_point is not None:
        grouped = grouped - zero_point.to(scale.dtype).unsqueeze(-1)
    return (grouped * scale.unsqueeze(-1)).reshape(out_features, in_features)


def estimate_bits_per_weight(config: SchemeConfig, shape: tuple[int, ...], scale_bits: int) -> float:
    """Storage bits per weight of ``config`` on a weight of ``shape``, without quantizing it."""
    if config.method == "kquant":
        from quantkit.kquants import BLOCK_FORMATS

        assert config.ggml_type is not None, "plans resolve every kquant tensor's block type"
        return BLOCK_FORMATS.get(config.ggml_type).bits_per_weight
    if not SCHEMES.get(config.method).integer:
        return 16.0
    out_features, in_features = shape
    n_scales = {"tensor": 1, "channel": out_features}.get(
        config.granularity, out_features * in_features // (config.group_size or in_features)
    )
    has_zero_point = config.method == "zeropoint" or (config.method == "gptq" and not config.symmetric)
    per_scale = scale_bits + (config.bits if has_zero_point else 0)
    return config.bits + n_scales * per_scale / (out_features * in_features)
