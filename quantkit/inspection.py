"""``quantkit inspect``: what a checkpoint holds and what a recipe would do to it, without writing anything."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from quantkit.model.checkpoint import Checkpoint
from quantkit.plan import QuantPlan, TensorPlan, make_plan
from quantkit.recipe import Recipe


def inspect(model: str | Path | None, recipe: Recipe) -> dict[str, Any]:
    """Architecture, parameters by role, expert coverage and what ``recipe`` would do."""
    checkpoint = Checkpoint.open(model)
    plan = make_plan(checkpoint, recipe)
    params: dict[str, int] = defaultdict(int)
    actions: dict[str, dict[str, Any]] = {}
    for t in plan.tensors:
        numel = math.prod(t.shape)
        params[t.role.value] += numel
        key = f"{t.role.value} / {t.scheme.describe() if t.scheme else 'float (unchanged)'}"
        row = actions.setdefault(key, {"tensors": 0, "params": 0, "bits": 0.0})
        row["tensors"] += 1
        row["params"] += numel
        row["bits"] += numel * _planned_bits(t)
    total_params = sum(params.values())
    total_bits = sum(r["bits"] for r in actions.values())
    for row in actions.values():
        row["bits_per_weight"] = row.pop("bits") / row["params"] if row["params"] else 0.0
    return {
        "model": str(checkpoint.path),
        "architecture": plan.arch.summary(checkpoint.config),
        "params": {"total": total_params, **dict(sorted(params.items()))},
        "experts": expert_coverage(plan),
        "recipe": recipe.to_dict(),
        "plan": actions,
        "estimated_size_mb": total_bits / 8 / 2**20,
        "original_size_mb": checkpoint.total_bytes() / 2**20,
        "source_weights": checkpoint.fp8.describe() if checkpoint.fp8 is not None else None,
        "unexpected_tensors": plan.unexpected,
    }


def expert_coverage(plan: QuantPlan) -> dict[str, Any]:
    """Routed experts found per MoE layer vs. the config's count (every expert must be present)."""
    expected = plan.arch.num_experts(plan.checkpoint.config)
    if not expected or plan.arch.experts is None:
        return {}
    pattern = plan.arch.experts.per_expert_pattern
    found: dict[str, set[int]] = defaultdict(set)
    for t in plan.tensors:
        match = pattern.match(t.name)
        if match:
            found[match["layer"]].add(int(match["expert"]))
    return {
        "expected_per_layer": expected,
        "layers_with_experts": len(found),
        "complete": all(len(v) == expected for v in found.values())
        and len(found) == len(plan.arch.moe_layers(plan.checkpoint.config)),
    }


def _planned_bits(t: TensorPlan) -> float:
    dtype_bits = float(t.dtype.itemsize * 8)
    if t.scheme is None:
        return dtype_bits
    return t.scheme.bits_per_weight(t.shape, scale_bits=int(dtype_bits))
