"""GPTQ (Frantar et al., 2022) as pure functions: Hessian accumulation and the solver, batched over experts."""

from quantkit.gptq.hessian import HessianAccumulator
from quantkit.gptq.solver import GptqResult, gptq_quantize

__all__ = ["GptqResult", "HessianAccumulator", "gptq_quantize"]
