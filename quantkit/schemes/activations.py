"""INT8 input-activation quantization, simulated in float (what W8A8 kernels compute, up to accumulation).

compressed-tensors' symmetric int8 convention, which vLLM and transformers apply at run time::

    scale = amax / 127.5                 (bit range 255 over two)
    x_q   = clamp(round(x / scale), -128, 127) * scale

- ``static``: one scale per module (per expert), ``amax`` chosen offline from calibration
  histograms by a range selector, stored as ``<module>.input_scale``.
- ``dynamic``: one scale per token, ``amax = max|x_token|``, computed at run time.

A zero ``amax`` gives scale 1 (the input is all zeros and stays zero).
"""

from __future__ import annotations

import torch

ACT_QMIN, ACT_QMAX = -128, 127
_HALF_RANGE = (ACT_QMAX - ACT_QMIN) / 2


def static_input_scale(amax: float, dtype: torch.dtype) -> torch.Tensor:
    """The ``input_scale`` tensor ``[1]`` for a calibrated ``amax``, in the weights' scale dtype."""
    scale = torch.tensor([amax / _HALF_RANGE], dtype=torch.float32).to(dtype)
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def fake_quantize_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` through int8 with one fixed ``scale``."""
    s = scale.to(x.dtype)
    return torch.clamp(torch.round(x / s), ACT_QMIN, ACT_QMAX) * s


def fake_quantize_dynamic(x: torch.Tensor) -> torch.Tensor:
    """``x`` through int8 with a scale per token (last dimension = features)."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = amax / _HALF_RANGE
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.clamp(torch.round(x / scale), ACT_QMIN, ACT_QMAX) * scale
