"""The GPTQ pipeline: Hessians accumulated layer by layer and the expert solves of each layer.

The solver itself is pure math on one (batched) weight and lives with its scheme,
:mod:`quantkit.schemes.gptq_solver`.
"""

from quantkit.gptq.hessian import HessianAccumulator

__all__ = ["HessianAccumulator"]
