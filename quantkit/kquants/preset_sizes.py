"""What the k-quant presets cost: bits per weight of a type mix, and each preset on Llama-3-8B's tensor list.

llama-quantize prints each preset's file size for Llama-3-8B; ``quantkit presets`` shows the same figure,
computed from the preset's rules (tested to match llama.cpp's numbers within 0.015 GiB).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from quantkit.kquants.presets import (
    PRESET_ORDER,
    Assignment,
    TensorSpec,
    assign_types,
    preset_rules,
    type_bits_per_weight,
)


def mix_bits_per_weight(assignments: dict[str, Assignment], tensors: Sequence[TensorSpec]) -> float:
    """Average storage bits per weight of ``tensors`` under ``assignments`` (kept tensors count as F32)."""
    bits = sum(math.prod(spec.shape) * type_bits_per_weight(assignments[spec.name].type) for spec in tensors)
    return bits / sum(math.prod(spec.shape) for spec in tensors)


def llama3_8b_tensors() -> list[TensorSpec]:
    """The tensor list of a Llama-3-8B GGUF: the shape llama-quantize's size notes refer to."""
    hidden, kv, ffn, vocab = 4096, 1024, 14336, 128256
    specs = [
        TensorSpec("token_embd.weight", (vocab, hidden)),
        TensorSpec("output.weight", (vocab, hidden)),
        TensorSpec("output_norm.weight", (hidden,)),
    ]
    for i in range(32):
        shapes = {
            "attn_norm": (hidden,), "attn_q": (hidden, hidden), "attn_k": (kv, hidden), "attn_v": (kv, hidden),
            "attn_output": (hidden, hidden), "ffn_norm": (hidden,), "ffn_gate": (ffn, hidden),
            "ffn_up": (ffn, hidden), "ffn_down": (hidden, ffn),
        }
        specs += [TensorSpec(f"blk.{i}.{name}.weight", shape) for name, shape in shapes.items()]
    return specs


def preset_summaries() -> list[dict[str, str]]:
    """Every preset with its base type, bits per weight (alone and on Llama-3-8B) and the rules that set it apart."""
    reference = llama3_8b_tensors()
    summaries = []
    for preset in PRESET_ORDER:
        placed = assign_types(preset.name, reference, n_layers=32, n_experts=0, n_head=32, n_head_kv=8)
        rows = dict(preset_rules(preset.name))
        rules = "\n".join(f"{pattern}: {rows[pattern]}" for pattern in (
            "output.weight", "attn_v, attn_qkv, attn_kv_b", "attn_output", "ffn_down, ffn_down_exps, ffn_down_shexp"))
        summaries.append({"preset": preset.name, "base": preset.base,
                          "base bpw": f"{type_bits_per_weight(preset.base):.4g}",
                          "bpw @ Llama-3-8B": f"{mix_bits_per_weight(placed, reference):.2f}",
                          "llama.cpp note": preset.note, "rules": rules})
    return summaries
