"""Ternary weights (``--method ternary``) in a GGUF file: ggml's TQ2_0 (default) or TQ1_0 blocks.

The scheme makes codes in ``{-1, 0, +1}`` and a scale per tensor, row or group; the file stores their values
``codes * scale`` through ggml's TQ encoder (:mod:`quantkit.kquants.tq2_0`), whose block scale is the block's
largest ``|value|``. Within a 256-weight block every non-zero value is ``±scale`` when one scale covers the
block, so the block holds exactly the ternary weight (with the scale rounded to fp16). Groups that split a
block would be re-ternarized by the block's rule, so they are refused; a row that 256 does not divide is
stored as F16 of the same values (exact but for fp16 rounding), since llama.cpp's TQ fallback (Q4_0) would
not keep them ternary.
"""

from __future__ import annotations

import numpy as np
import torch

from quantkit.errors import QuantkitError
from quantkit.formats.output import FileTensor, QuantizeItem, StoredTensor
from quantkit.kquants import QK_K, encode
from quantkit.plan import QuantPlan
from quantkit.schemes import BlockQuantized, IntConfig, IntQuantized, TernaryConfig
from quantkit.schemes.ternary import DEFAULT_TQ_TYPE


def has_ternary(plan: QuantPlan) -> bool:
    return any(isinstance(item.scheme, TernaryConfig) for item in plan.tensors)


def check_ternary(plan: QuantPlan, format_name: str) -> None:
    """One-line errors for a plan with ternary weights: other integer schemes, or groups that split a TQ block."""
    for item in plan.tensors:
        scheme = item.scheme
        if isinstance(scheme, IntConfig) and not isinstance(scheme, TernaryConfig):
            raise QuantkitError(f"--format {format_name} holds k-quant, ternary and float weights only; "
                                f"{item.name} is {scheme.describe()}")
        if isinstance(scheme, TernaryConfig) and scheme.granularity == "group" and (scheme.group_size or 0) % QK_K:
            raise QuantkitError(f"{item.name}: GGUF stores ternary weights in TQ blocks of {QK_K} with one scale "
                                f"each; group size {scheme.group_size} splits them (use a multiple of {QK_K}, "
                                "--granularity channel or tensor)")


def store_ternary(tensor: FileTensor, data: torch.Tensor, quantize: QuantizeItem) -> StoredTensor:
    """The TQ blocks of ``tensor``'s ternarized items (stacked experts), or F16 of their values."""
    scheme = tensor.items[0].scheme
    assert isinstance(scheme, TernaryConfig)
    type_name = scheme.ggml_type or DEFAULT_TQ_TYPE
    n_per_row = data.shape[-1]
    rows = data.reshape(len(tensor.items), -1, n_per_row)  # one slice per expert
    ternary = []
    for item, weight in zip(tensor.items, rows, strict=True):
        quantized = quantize(item, weight)
        assert isinstance(quantized, IntQuantized)
        ternary.append(quantized.dequantize().to(torch.float32).numpy())
    if n_per_row % QK_K:
        stored = np.stack(ternary).reshape(data.shape).astype(np.float16)
        return StoredTensor(tensor.name, "F16", stored, torch.from_numpy(stored.astype(np.float32)))
    blocks = [BlockQuantized(encode(type_name, values), type_name, (values.shape[0], values.shape[1]), scheme)
              for values in ternary]
    packed = np.stack([b.data for b in blocks]).reshape(*data.shape[:-1], -1)
    values = torch.stack([b.dequantize() for b in blocks]).reshape(data.shape)
    return StoredTensor(tensor.name, type_name, packed, values, tuple(blocks))
