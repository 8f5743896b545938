"""The scheme interface: pure functions from a float weight to its quantized form and back.

A scheme never touches files. It turns a 2-D weight ``[out, in]`` into an
:class:`IntQuantized` (integer codes plus scales and zero points on a grid of
``tensor``/``channel``/``group`` granularity) or a :class:`CastTensor` (a float cast).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
import torch

from quantkit.kquants import decode
from quantkit.registry import Registry
from quantkit.schemes.config import IntConfig, SchemeConfig


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
    config: IntConfig
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
        return torch.from_numpy(decode(self.ggml_type, self.data, self.shape[1]))

    @property
    def bits_per_weight(self) -> float:
        return self.data.size * 8 / (self.shape[0] * self.shape[1])


Quantized = IntQuantized | CastTensor | BlockQuantized


ConfigT = TypeVar("ConfigT", bound=SchemeConfig)


class Scheme(ABC, Generic[ConfigT]):
    """A registered quantization method and the config class of its settings."""

    config_type: ClassVar[type[SchemeConfig]]
    needs_hessian: bool = False  # quantized by the layer-by-layer GPTQ pipeline, not tensor by tensor

    @abstractmethod
    def quantize(self, weight: torch.Tensor, config: ConfigT, importance: torch.Tensor | None = None) -> Quantized:
        """Quantize a 2-D float weight ``[out, in]``.

        ``importance`` (float32 ``[in]``, the mean square of each input channel from calibration) is
        used by schemes that weight their error by it (k-quants) and ignored by the others.
        """


SCHEMES: Registry[Scheme[Any]] = Registry("method")


def group_view(weight: torch.Tensor, config: IntConfig) -> torch.Tensor:
    """``weight`` as ``[rows, n_groups, group]`` for the config's granularity, in float32.

    Only for groups that divide the row; :func:`group_views` also splits off a partial last group.
    """
    out_features, in_features = weight.shape
    w = weight.to(torch.float32)
    if config.granularity == "tensor":
        return w.reshape(1, 1, -1)
    if config.granularity == "channel":
        return w.reshape(out_features, 1, in_features)
    assert config.group_size is not None
    return w.reshape(out_features, in_features // config.group_size, config.group_size)


def group_views(weight: torch.Tensor, config: IntConfig) -> list[torch.Tensor]:
    """``weight`` as float32 ``[rows, n_groups, group]`` pieces whose groups, in order, cover each row.

    One piece when the groups divide the row (:func:`group_view`); otherwise the full groups
    ``[rows, in // g, g]`` (left out when the row is shorter than a group) and the partial last
    group ``[rows, 1, in % g]``: groups are columns ``[k * g, (k + 1) * g)``, the last one shorter, as
    in the reference GPTQ and compressed-tensors. Each group's range is then its own columns only.
    """
    partial = config.partial_group(int(weight.shape[1]))
    if partial is None:
        return [group_view(weight, config)]
    assert config.group_size is not None
    w = weight.to(torch.float32)
    full = weight.shape[1] - partial
    pieces = [w[:, :full].reshape(weight.shape[0], full // config.group_size, config.group_size)] if full else []
    return [*pieces, w[:, full:].reshape(weight.shape[0], 1, partial)]


def join_groups(pieces: list[torch.Tensor], rows: int) -> torch.Tensor:
    """Per-group values of :func:`group_views`' pieces side by side as ``[rows, ...]`` (inverse of the split)."""
    if len(pieces) == 1:
        return pieces[0]
    return torch.cat([p.reshape(rows, -1) for p in pieces], dim=1)


def group_index(in_features: int, group_size: int, device: torch.device | None = None) -> torch.Tensor:
    """Each column's group ``c // group_size`` (int64 ``[in]``); the last group may be shorter."""
    return torch.arange(in_features, device=device) // group_size


def storage_dtype(weight: torch.Tensor) -> torch.dtype:
    """Scales are stored in the weight's own float dtype, as compressed-tensors writers do."""
    return weight.dtype if weight.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


def finish_scale(raw_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round the scale to its storage dtype; all-zero groups get scale 1 (their codes are 0)."""
    scale = raw_scale.to(dtype)
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def scale_shape(config: IntConfig, weight: torch.Tensor) -> tuple[int, ...]:
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
    (act-order groups); otherwise groups are contiguous runs of ``group_size`` columns, the last one
    shorter when ``group_size`` does not divide the row (without a ``group_size``, ``in / n_groups``).
    """
    out_features, in_features = codes.shape
    if scale.ndim == 1:  # per-tensor
        values = codes.to(scale.dtype)
        if zero_point is not None:
            values = values - zero_point.to(scale.dtype)
        return values * scale
    if g_idx is None and group_size and scale.shape[1] > 1 and in_features % group_size:  # a partial last group
        g_idx = group_index(in_features, group_size, codes.device)
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
