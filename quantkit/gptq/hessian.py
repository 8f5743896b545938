"""GPTQ's Hessian ``H = 2/n * sum x x^T`` of a linear layer's inputs, one per expert of an MoE layer.

Accumulated batch by batch with the running normalisation of ``GPTQ.add_batch`` (IST-DASLab/gptq
``gptq.py``), in float32: ``H *= n / (n + t); n += t; x *= sqrt(2 / n); H += x x^T``. Unlike the reference,
``n`` counts tokens, not sequences (the reference counts ``inp.shape[0]`` after ``unsqueeze(0)``, i.e.
batches of sequences), so experts that receive different numbers of tokens per batch are weighted right.

Memory: ``in_features^2 * 4`` bytes per expert (64 experts with 2048 inputs: 1 GiB).
"""

from __future__ import annotations

import math

import torch

from quantkit.errors import QuantkitError


class HessianAccumulator:
    """Running ``2/n * sum x x^T``: float32 ``[E, in, in]`` for ``num_experts`` experts, or ``[in, in]``."""

    def __init__(self, in_features: int, num_experts: int | None = None, device: torch.device | str = "cpu") -> None:
        self.num_experts = num_experts
        self._hessians = torch.zeros(num_experts or 1, in_features, in_features, dtype=torch.float32, device=device)
        self._tokens = [0] * (num_experts or 1)

    @property
    def hessian(self) -> torch.Tensor:
        """``[E, in, in]``, or ``[in, in]`` without experts; all zeros for an expert that got no token."""
        return self._hessians if self.num_experts is not None else self._hessians[0]

    @property
    def tokens(self) -> list[int]:
        """Tokens seen per expert (one entry without experts)."""
        return list(self._tokens)

    def add(self, x: torch.Tensor, expert: int | None = None) -> None:
        """Add the inputs ``x`` ``[tokens, in]`` of one batch (of ``expert``, for an MoE layer)."""
        if (expert is None) != (self.num_experts is None):
            raise QuantkitError("HessianAccumulator.add: pass expert= exactly when the accumulator has experts")
        if x.ndim != 2 or x.shape[1] != self._hessians.shape[-1]:
            raise QuantkitError(f"HessianAccumulator.add: inputs must be [tokens, {self._hessians.shape[-1]}], "
                                f"got {list(x.shape)}")
        index = expert or 0
        t = x.shape[0]
        if t == 0:  # an expert no token was routed to in this batch
            return
        n = self._tokens[index]
        H = self._hessians[index]  # a view: updated in place
        H *= n / (n + t)  # self.H *= self.nsamples / (self.nsamples + tmp)
        n += t  # self.nsamples += tmp
        inp = math.sqrt(2 / n) * x.t().float()  # inp = math.sqrt(2 / self.nsamples) * inp.float()
        H += inp.matmul(inp.t())  # self.H += inp.matmul(inp.t())
        self._tokens[index] = n
