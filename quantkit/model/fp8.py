"""FP8 sources: DeepSeek-V3/R1's block-scaled FP8 checkpoints, read as bf16 one weight at a time.

The official layout stores each linear weight as ``float8_e4m3fn`` with a float32 ``<name>_scale_inv``
of shape ``[ceil(out/bm), ceil(in/bn)]`` (``weight_block_size: [bm, bn]`` in config.json's
``quantization_config``, ``quant_method: "fp8"``); the last block of a row or column is partial when
the size is not a multiple of the block. A weight is read as ``(fp8.float() * scale_inv per block)``
rounded to bfloat16: DeepSeek's own ``inference/fp8_cast_bf16.py`` (its ``weight_dequant`` kernel
multiplies in float32 and stores into a bfloat16 tensor) does exactly this, so quantizing an FP8
source gives the same bytes as quantizing its official BF16 conversion. Other FP8 layouts are refused
with one line each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from quantkit.errors import QuantkitError

if TYPE_CHECKING:
    from quantkit.model.checkpoint import TensorInfo

QUANT_METHOD = "fp8"
SCALE_SUFFIX = "_scale_inv"
DEQUANTIZED_DTYPE = torch.bfloat16  # what fp8_cast_bf16.py writes
FP8_DTYPES = {torch.float8_e4m3fn: "e4m3", torch.float8_e5m2: "e5m2"}
_PER_TENSOR_SCALES = ("_scale", "_scale_2")  # compressed-tensors / ModelOpt: weight -> weight_scale
_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CHUNK = 1 << 23  # FP8 elements dequantized at once: 32 MiB of float32 temporaries


@dataclass(frozen=True)
class Fp8Source:
    """An accepted FP8 checkpoint: its block size and each FP8 weight's scale tensor."""

    block: tuple[int, int]
    scales: dict[str, TensorInfo]  # FP8 weight name -> its ``<name>_scale_inv``
    formats: tuple[str, ...]  # the FP8 formats of its weights: e4m3, e5m2

    def describe(self) -> str:
        """One line for inspect and the report, e.g. ``FP8 (e4m3, 128x128 block scales), read as bfloat16``."""
        return (f"FP8 ({'/'.join(self.formats) or 'no FP8 weights'}, {self.block[0]}x{self.block[1]} block scales), "
                f"read as {str(DEQUANTIZED_DTYPE).removeprefix('torch.')}")


def open_fp8(tensors: dict[str, TensorInfo], config: dict[str, Any], path: Path) -> Fp8Source | None:
    """The FP8 layout of a checkpoint, validated, or None when it has no FP8 tensors and no fp8 config.

    On success the scale tensors leave ``tensors`` and each FP8 weight's entry takes the dtype it is
    read as (bfloat16); a one-line error for any layout this module cannot read exactly.
    """
    stored_fp8 = sorted(name for name, info in tensors.items() if info.dtype in FP8_DTYPES)
    fp8 = [name for name in stored_fp8 if not name.endswith(SCALE_SUFFIX)]  # an FP8 scale is refused as a scale
    quant = config.get("quantization_config")
    is_fp8_config = isinstance(quant, dict) and quant.get("quant_method") == QUANT_METHOD
    if not stored_fp8 and not is_fp8_config:
        return None
    if stored_fp8 and not is_fp8_config:
        first = tensors[stored_fp8[0]]
        method = f"a quant_method {quant.get('quant_method')!r} checkpoint" if isinstance(quant, dict) else (
            "a checkpoint whose config.json has no fp8 quantization_config")
        raise QuantkitError(f"{first.name} in {first.file.name} is {_dtype(first)} in {method}: quantkit reads only "
                            "DeepSeek-V3's block-scaled FP8 (quant_method fp8, weight_block_size, <name>_scale_inv); "
                            "convert it to bf16 first")
    assert isinstance(quant, dict)
    block = _block_size(quant, path)
    _check_config(quant, fp8, tensors, path)
    formats = tuple(sorted({FP8_DTYPES[tensors[name].dtype] for name in fp8}))
    scales = {}
    for name in fp8:
        info = tensors[name]
        scales[name] = _scale_of(info, tensors, block)
        tensors[name] = replace(info, dtype=DEQUANTIZED_DTYPE)
        del tensors[scales[name].name]
    orphans = sorted(n for n in tensors if n.endswith(SCALE_SUFFIX))
    if orphans:
        base = orphans[0].removesuffix(SCALE_SUFFIX)
        what = f"is {_dtype(tensors[base])}, not FP8" if base in tensors else "is not in the checkpoint"
        raise QuantkitError(f"{orphans[0]} in {tensors[orphans[0]].file.name} scales {base}, which {what}")
    return Fp8Source(block, scales, formats)


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``weight`` (FP8, ``[out, in]``) times its per-block ``scale_inv``, in float32, rounded to bfloat16.

    A few rows of blocks at a time (about ``_CHUNK`` elements), so the float32 temporaries stay small.
    """
    rows, cols = weight.shape
    block_rows, block_cols = block
    column_scales = scale_inv.to(torch.float32).repeat_interleave(block_cols, dim=1)[:, :cols]
    out = torch.empty((rows, cols), dtype=DEQUANTIZED_DTYPE)
    step = block_rows * max(1, _CHUNK // (block_rows * max(cols, 1)))
    for start in range(0, rows, step):
        values = weight[start : start + step].to(torch.float32)
        first, whole = start // block_rows, len(values) // block_rows
        if whole:  # whole blocks of rows: each row block times its row of scales
            blocks = values[: whole * block_rows].unflatten(0, (whole, block_rows))
            products = (blocks * column_scales[first : first + whole, None]).flatten(0, 1)
            out[start : start + whole * block_rows] = products.to(DEQUANTIZED_DTYPE)
        if len(values) > whole * block_rows:  # the partial last block of rows
            tail = values[whole * block_rows :] * column_scales[first + whole]
            out[start + whole * block_rows : start + len(values)] = tail.to(DEQUANTIZED_DTYPE)
    return out


def _block_size(quant: dict[str, Any], path: Path) -> tuple[int, int]:
    block = quant.get("weight_block_size")
    if block is None:
        raise QuantkitError(f"config.json in {path}: an fp8 quantization_config without weight_block_size (per-tensor "
                            "FP8 scales) is not read; quantkit reads block-scaled FP8 (DeepSeek-V3's layout)")
    if (not isinstance(block, list) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise QuantkitError(f"config.json in {path}: weight_block_size must be two positive integers, got {block!r}")
    return block[0], block[1]


def _check_config(quant: dict[str, Any], fp8: list[str], tensors: dict[str, TensorInfo], path: Path) -> None:
    """Refuse static activation scales and an ``fmt`` the FP8 tensors do not have."""
    scheme = quant.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise QuantkitError(f"config.json in {path}: fp8 activation_scheme {scheme!r} is not read "
                            "(only 'dynamic': quantkit reads the weights, not stored activation scales)")
    fmt = quant.get("fmt")
    if fmt is None:
        return
    if fmt not in FP8_DTYPES.values():
        raise QuantkitError(f"config.json in {path}: fp8 fmt must be 'e4m3' or 'e5m2', got {fmt!r}")
    other = next((n for n in fp8 if FP8_DTYPES[tensors[n].dtype] != fmt), None)
    if other is not None:
        raise QuantkitError(f"{other} in {tensors[other].file.name} is {_dtype(tensors[other])} but config.json's "
                            f"quantization_config says fmt {fmt!r}")


def _scale_of(info: TensorInfo, tensors: dict[str, TensorInfo], block: tuple[int, int]) -> TensorInfo:
    """The ``<name>_scale_inv`` of the FP8 weight ``info``, checked against its shape and the block size."""
    where = f"{info.name} in {info.file.name}"
    if len(info.shape) != 2:
        raise QuantkitError(f"{where} is a {len(info.shape)}-D FP8 tensor {list(info.shape)}: "
                            "quantkit reads block-scaled FP8 weights of 2 dimensions only")
    scale = tensors.get(info.name + SCALE_SUFFIX)
    if scale is None:
        per_tensor = next((info.name + s for s in _PER_TENSOR_SCALES if info.name + s in tensors), None)
        if per_tensor is not None:
            raise QuantkitError(f"{where} is FP8 with a per-tensor scale {per_tensor}, not block scales "
                                f"({info.name}{SCALE_SUFFIX}): that layout is not read; convert it to bf16 first")
        raise QuantkitError(f"{where} is FP8 but its block scales {info.name}{SCALE_SUFFIX} are missing")
    expected = [math.ceil(info.shape[0] / block[0]), math.ceil(info.shape[1] / block[1])]
    if list(scale.shape) != expected:
        raise QuantkitError(f"{scale.name} in {scale.file.name} has shape {list(scale.shape)}; {list(info.shape)} "
                            f"in blocks of {list(block)} needs {expected}")
    if scale.dtype not in _SCALE_DTYPES:
        raise QuantkitError(f"{scale.name} in {scale.file.name} is {_dtype(scale)}; FP8 block scales must be "
                            "float32, bfloat16 or float16")
    return scale


def _dtype(info: TensorInfo) -> str:
    return str(info.dtype).removeprefix("torch.")
