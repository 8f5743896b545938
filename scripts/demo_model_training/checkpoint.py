"""Saving the trained model (bfloat16 weights, float32 routing bias) with its tokenizer, and reloading it offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import safetensors
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DeepseekV3ForCausalLM, PreTrainedTokenizerFast

from .architecture import moe_gates
from .common import OUTPUT_FILES, log


def save(model: DeepseekV3ForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """Save ``model`` in bfloat16 (routing bias kept float32) and ``tokenizer`` into ``out``, world-readable."""
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)
    biases = {i: gate.e_score_correction_bias.detach().clone() for i, gate in moe_gates(model)}
    model_any: Any = model  # transformers' typed ``to`` wrapper confuses mypy
    model_any.to(torch.bfloat16)
    # Like the official DeepSeek-V3 checkpoints (and transformers' _keep_in_fp32_modules_strict),
    # keep the routing-correction bias in float32: bf16 would round it and flip routing decisions.
    for i, gate in moe_gates(model):
        gate.e_score_correction_bias.data = biases[i]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for path in out.iterdir():  # safetensors may be written 0600; this ships as package data
        if path.name in OUTPUT_FILES:
            path.chmod(0o644)


def safetensors_inventory(path: Path) -> dict[str, Any]:
    """Tensor count, count per dtype and sorted tensor names of a safetensors file."""
    dtypes: dict[str, int] = {}
    names: list[str] = []
    with safetensors.safe_open(str(path), framework="pt") as f:
        for k in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
            names.append(k)
            dt = str(f.get_slice(k).get_dtype())
            dtypes[dt] = dtypes.get(dt, 0) + 1
    return {"num_tensors": len(names), "dtypes": dtypes, "names": sorted(names)}


def reload_offline(
    out: Path, tokenizer: PreTrainedTokenizerFast, probe: str, experts_implementation: str
) -> tuple[Any, Any]:
    """Reload the saved model (float32 compute) and tokenizer offline; check the tokenizer matches on ``probe``."""
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True)
    reloaded.set_experts_implementation(experts_implementation)
    reloaded.eval()
    tok2 = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert type(reloaded).__name__ == "DeepseekV3ForCausalLM", type(reloaded)
    assert len(tok2) == len(tokenizer)
    assert tok2(probe)["input_ids"] == tokenizer(probe)["input_ids"], "reloaded tokenizer differs"
    assert tok2.decode(tok2(probe)["input_ids"]) == probe, "tokenizer does not round-trip"
    log(f"reloaded offline: {type(reloaded).__name__}, {type(tok2).__name__} (vocab {len(tok2)})")
    return reloaded, tok2
