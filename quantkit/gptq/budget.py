"""How many routed experts GPTQ solves at once: a memory budget, by default half of what is available."""

from __future__ import annotations

from quantkit import heap

BYTES_PER_HESSIAN_ELEMENT = 4 * 4  # float32 H, plus its damped copy, Cholesky factor and inverse
BYTES_PER_WEIGHT_ELEMENT = 4 * 4  # float32 W, its working copy, Q and the error block
AUTO_BUDGET_FRACTION = 0.5  # of the memory available when a stage's experts are solved


def experts_per_chunk(rows: int, columns: int, max_memory: int | None) -> int:
    """Experts GPTQ solves at once: ``max_memory // (16 * columns^2 + 16 * rows * columns)`` (at least 1).

    Per expert: float32 Hessian ``[columns, columns]`` with its dampened copy, Cholesky factor and
    inverse (16 bytes per element), and the float32 weight ``[rows, columns]`` with its working copy,
    dequantized result and error block (16 bytes per element). No budget (None): :func:`auto_budget`,
    or all experts at once where the available memory is unknown. The output does not depend on it.
    """
    if max_memory is None:
        max_memory = auto_budget()
        if max_memory is None:
            return 1 << 30
    per_expert = BYTES_PER_HESSIAN_ELEMENT * columns * columns + BYTES_PER_WEIGHT_ELEMENT * rows * columns
    return max(1, max_memory // per_expert)


def auto_budget() -> int | None:
    """GPTQ's default ``max_memory``: half the memory available now (None where unknown)."""
    available = heap.available()
    return None if available is None else int(available * AUTO_BUDGET_FRACTION)
