"""NaN/Inf in the weights, found before any work: one line naming the tensor and its shard."""

from __future__ import annotations

import torch
from rich.console import Console

from quantkit.errors import QuantkitError
from quantkit.model.checkpoint import Checkpoint
from quantkit.progress import track

_CHUNK = 1 << 24  # elements checked at once: bounds the temporary mask to 16 MiB


def check_finite(name: str, tensor: torch.Tensor, checkpoint: Checkpoint) -> None:
    """Raise if the float ``tensor`` (``name`` in ``checkpoint``, or a view of it) holds NaN or Inf."""
    if not tensor.dtype.is_floating_point:
        return
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start : start + _CHUNK]
        if not bool(torch.isfinite(chunk).all()):
            value = "NaN" if bool(torch.isnan(chunk).any()) else "Inf"
            file = checkpoint.tensors[name].file.name if name in checkpoint.tensors else "the checkpoint"
            scale = checkpoint.fp8.scales.get(name) if checkpoint.fp8 is not None else None
            read = f" (FP8 times {scale.name})" if scale is not None else ""
            raise QuantkitError(f"{name}{read} in {file} contains {value} values; the checkpoint is damaged or was "
                                "saved after a diverged update: fix or re-download it")


def check_all_finite(checkpoint: Checkpoint, show_progress: bool = True, console: Console | None = None) -> None:
    """Check every float tensor of ``checkpoint``: calibration and GPTQ must not start on a damaged model."""
    names = [name for name, info in checkpoint.tensors.items() if info.dtype.is_floating_point]
    for name in track(names, "checking weights", show_progress, console):
        check_finite(name, checkpoint.get(name), checkpoint)
