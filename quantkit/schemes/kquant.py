"""ggml k-quants (and Q4_0/Q5_0/Q8_0) as a registered method: weights become ggml block bytes.

The block type of each weight is ``config.ggml_type``, set by the plan (from ``--type`` or a
llama.cpp-style preset, see :mod:`quantkit.kquants.presets`). With an importance vector (from
``quantkit calibrate``) ggml's importance-weighted encoders run; without, its reference encoders.
"""

from __future__ import annotations

import torch

from quantkit.kquants import encode
from quantkit.schemes.base import SCHEMES, BlockQuantized, Scheme, SchemeConfig


class KQuantScheme(Scheme):
    integer = False

    def quantize(
        self, weight: torch.Tensor, config: SchemeConfig, importance: torch.Tensor | None = None
    ) -> BlockQuantized:
        assert config.ggml_type is not None, "plans resolve every kquant tensor's block type"
        rows = weight.detach().to(torch.float32).cpu().numpy()
        weights = None if importance is None else importance.to(torch.float32).cpu().numpy()
        data = encode(config.ggml_type, rows, weights)
        return BlockQuantized(data, config.ggml_type, (rows.shape[0], rows.shape[1]), config, importance is not None)


SCHEMES.add("kquant", KQuantScheme())
