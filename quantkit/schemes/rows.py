"""Large weights quantized and measured a block of rows at a time, so that temporaries stay small.

A row-wise scheme (channel or group granularity, no Hessian) gives each row's codes and scales from
that row alone, so quantizing blocks of rows and concatenating the results is exact. Whole, a weight
costs about 30 bytes of float temporaries per parameter (float32 group views, the float64 error): 4 GB
for one 132M-parameter DeepSeek-V3 dense MLP weight, more than the rest of the run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from quantkit.schemes.base import IntQuantized, Quantized, Scheme, dequantize_codes
from quantkit.schemes.config import IntConfig, SchemeConfig

ROW_BLOCK_ELEMENTS = 1 << 22  # weights per block of rows: 32 MB of float64 temporaries


def row_blocks(rows: int, columns: int, elements: int = ROW_BLOCK_ELEMENTS) -> Iterator[slice]:
    """Consecutive row ranges of at most ``elements`` weights (at least one row each)."""
    step = max(1, elements // max(columns, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def quantize_rows(scheme: Scheme[Any], weight: torch.Tensor, config: SchemeConfig,
                  importance: torch.Tensor | None = None, elements: int = ROW_BLOCK_ELEMENTS) -> Quantized:
    """``scheme.quantize(weight, config, importance)``, by blocks of rows where that is exact."""
    row_wise = (isinstance(config, IntConfig) and config.granularity in ("channel", "group")
                and not scheme.needs_hessian and weight.ndim == 2)
    if not row_wise or weight.numel() <= elements:
        return scheme.quantize(weight, config, importance)
    ints: list[IntQuantized] = []
    for rows in row_blocks(weight.shape[0], weight.shape[1], elements):
        part = scheme.quantize(weight[rows], config, importance)
        if not isinstance(part, IntQuantized) or part.g_idx is not None:
            raise TypeError(f"{config.method}: a row-wise integer scheme must give IntQuantized without g_idx")
        ints.append(part)
    zeros = [part.zero_point for part in ints if part.zero_point is not None]
    return IntQuantized(codes=torch.cat([part.codes for part in ints]), scale=torch.cat([part.scale for part in ints]),
                        zero_point=torch.cat(zeros) if len(zeros) == len(ints) else None, config=ints[0].config)


def relative_error(weight: torch.Tensor, approx: torch.Tensor | Quantized,
                   elements: int = ROW_BLOCK_ELEMENTS) -> float:
    """``||W - Q|| / ||W||`` in float64 (0 for an all-zero weight reproduced exactly), by blocks of rows.

    ``approx`` is the dequantized weight or a quantized one (integer codes are dequantized block by block).
    """
    rows_of = _dequantizer(approx)
    blocks = list(row_blocks(weight.shape[0], weight[0].numel(), elements)) if weight.ndim > 1 else [slice(None)]
    if len(blocks) == 1:  # the whole-tensor formula, so small weights keep their reported digits bit for bit
        w = weight.to(torch.float64)
        norm = torch.linalg.vector_norm(w)
        diff = torch.linalg.vector_norm(w - rows_of(slice(None)).to(torch.float64))
        return float(diff / norm) if norm > 0 else float(diff)
    norm_sq = diff_sq = torch.zeros((), dtype=torch.float64)
    for rows in blocks:
        w = weight[rows].to(torch.float64)
        norm_sq = norm_sq + torch.linalg.vector_norm(w) ** 2
        diff_sq = diff_sq + torch.linalg.vector_norm(w - rows_of(rows).to(torch.float64)) ** 2
    norm, diff = norm_sq.sqrt(), diff_sq.sqrt()
    return float(diff / norm) if norm > 0 else float(diff)


def _dequantizer(approx: torch.Tensor | Quantized) -> Callable[[slice], torch.Tensor]:
    """Rows of the dequantized weight: sliced from a tensor, or decoded per block from integer codes."""
    if isinstance(approx, torch.Tensor):
        return lambda rows: approx[rows]
    if isinstance(approx, IntQuantized) and approx.scale.ndim == 2:
        q = approx
        return lambda rows: dequantize_codes(q.codes[rows], q.scale[rows],
                                             None if q.zero_point is None else q.zero_point[rows],
                                             q.config.group_size, q.g_idx)
    whole = approx.dequantize()
    return lambda rows: whole[rows]
