"""GPTQ on the 64 routed experts of one MoE layer: all experts in one batched solve vs one solve per expert.

A small DeepSeek-style layer (hidden 512, moe_intermediate 256, 64 experts, bf16 weights): the fused
gate_up projection ``[64, 512, 512]`` (gate and up see the same input, so they share one Hessian
``[64, 512, 512]``) and down ``[64, 512, 256]`` with Hessians ``[64, 256, 256]``. Each expert's Hessian is
accumulated from its own synthetic correlated tokens (128 to 1024 per expert). 4-bit, group 128,
act-order. The batched and looped results must be identical (codes, scales, zero points, g_idx, Q, losses).
Writes benchmarks/results/gptq_batched.json.

    python benchmarks/gptq_batched.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from quantkit.gptq import HessianAccumulator
from quantkit.schemes.gptq_solver import GptqResult, gptq_quantize

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "gptq_batched.json"
EXPERTS, HIDDEN, MOE_INTERMEDIATE = 64, 512, 256
OPTIONS: dict[str, Any] = dict(bits=4, group_size=128, act_order=True)


def expert_hessians(columns: int, seed: int) -> torch.Tensor:
    """``[EXPERTS, columns, columns]``: expert e sees 128 to 1024 tokens ``Z (I + 4 G / sqrt(in)) diag(s)``."""
    gen = torch.Generator().manual_seed(seed)
    acc = HessianAccumulator(columns, num_experts=EXPERTS)
    for expert in range(EXPERTS):
        tokens = int(torch.randint(128, 1025, (1,), generator=gen))
        mix = torch.eye(columns) + 4 * torch.randn(columns, columns, generator=gen) / math.sqrt(columns)
        scales = torch.exp(0.5 * torch.randn(columns, generator=gen))
        acc.add((torch.randn(tokens, columns, generator=gen) @ mix) * scales, expert=expert)
    return acc.hessian


def identical(batched: GptqResult, looped: list[GptqResult]) -> bool:
    fields = ("codes", "scale", "zero_point", "g_idx", "dequantized", "row_loss", "damp", "retries")
    return all(
        all((a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
            for a, b in ((getattr(one, f), getattr(other, f)) for f in fields))
        for one, other in zip(batched.experts(), looped, strict=True)
    )


def run(name: str, weight: torch.Tensor, hessian: torch.Tensor, repeats: int) -> dict[str, Any]:
    batched_s, looped_s = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        batched = gptq_quantize(weight, hessian, **OPTIONS)
        batched_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        looped = [gptq_quantize(weight[e], hessian[e], **OPTIONS) for e in range(EXPERTS)]
        looped_s.append(time.perf_counter() - started)
    same = identical(batched, looped)
    print(f"{name}: batched {min(batched_s):.2f} s, looped {min(looped_s):.2f} s, "
          f"speedup {min(looped_s) / min(batched_s):.2f}x, identical {same}")
    return {"weight": list(weight.shape), "hessian": list(hessian.shape), "batched_s": batched_s,
            "looped_s": looped_s, "speedup": min(looped_s) / min(batched_s), "identical": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    load_before = os.getloadavg()
    gen = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(EXPERTS, 2 * MOE_INTERMEDIATE, HIDDEN, generator=gen) / math.sqrt(HIDDEN)).bfloat16()
    down = (torch.randn(EXPERTS, HIDDEN, MOE_INTERMEDIATE, generator=gen) / math.sqrt(MOE_INTERMEDIATE)).bfloat16()
    projections = {
        "gate_up": run("gate_up", gate_up, expert_hessians(HIDDEN, seed=1), args.repeats),
        "down": run("down", down, expert_hessians(MOE_INTERMEDIATE, seed=2), args.repeats),
    }
    batched = sum(min(p["batched_s"]) for p in projections.values())
    looped = sum(min(p["looped_s"]) for p in projections.values())
    result = {
        "experts": EXPERTS, "hidden": HIDDEN, "moe_intermediate": MOE_INTERMEDIATE,
        "options": {**OPTIONS, "scale_dtype": "bfloat16", "block_size": 128, "damp": 0.01},
        "threads": torch.get_num_threads(), "repeats": args.repeats, "timing": "seconds per run; speedup of the best",
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0], "cpus": os.cpu_count()},
        "projections": projections,
        "layer_batched_s": batched, "layer_looped_s": looped, "layer_speedup": looped / batched,
        "identical": all(p["identical"] for p in projections.values()),
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"layer: batched {batched:.2f} s, looped {looped:.2f} s, speedup {looped / batched:.2f}x -> {RESULTS}")


if __name__ == "__main__":
    main()
