"""The tensors llama.cpp's presets speak of: GGUF name categories, file order, and what is never quantized.

Ports of ``tensor_get_category``, ``weight_name_comparer`` (llama-model-loader.h) and the name and shape
checks of ``tensor_allows_quantization`` from ``src/llama-quant.cpp`` (llama-cpp-python 0.3.36) that do
not depend on the architecture.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class TensorSpec:
    """One tensor to place: its GGUF name and numpy shape ``[..., n_rows, n_per_row]``."""

    name: str
    shape: tuple[int, ...]


# tensor_get_category: the first substring that occurs names the category (order matters)
_CATEGORIES = (
    ("attn_qkv.weight", "attn_qkv"),
    ("attn_kv_b.weight", "attn_kv_b"),
    ("attn_v.weight", "attn_v"),
    ("attn_k.weight", "attn_k"),
    ("attn_q.weight", "attn_q"),
    ("attn_output.weight", "attn_output"),
    ("ffn_up", "ffn_up"),
    ("ffn_gate", "ffn_gate"),
    ("ffn_down", "ffn_down"),
)
ATTN_V_LIKE = ("attn_v", "attn_qkv", "attn_kv_b")
_TOKEN_EMBD = ("token_embd.weight", "per_layer_token_embd.weight")

# tensor_allows_quantization's name checks that do not depend on the architecture
_KEPT_EXACT = ("position_embd.weight", "token_types.weight")
_KEPT_SUBSTRINGS = (
    "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight",
    "indexer.k_proj.weight", "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight",
    "time_mix_w1.weight", "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight",
    "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight",
    "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight",
    ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger",
    "a.rvq.codebook", "mm.a.code_embd",
)

_BLOCK = re.compile(r"blk\.(\d+)\.")


def tensor_category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in _TOKEN_EMBD:
        return "token_embd"
    return next((category for text, category in _CATEGORIES if text in name), "other")


def block_of(name: str) -> int | None:
    match = _BLOCK.match(name)
    return int(match[1]) if match else None


def file_order(spec: TensorSpec) -> tuple[int, str]:
    block = block_of(spec.name)
    return (-1 if block is None else block, spec.name)


def ggml_n_dims(shape: tuple[int, ...]) -> int:
    """``ggml_n_dims``: dimensions up to the last one (ggml order) longer than 1."""
    ne = shape[::-1]
    return next((i + 1 for i in range(len(ne) - 1, 0, -1) if ne[i] > 1), 1)


def kept_reason(spec: TensorSpec) -> str | None:
    """Why ``tensor_allows_quantization`` leaves this tensor as it is, or None if it is quantized."""
    name = spec.name
    if ggml_n_dims(spec.shape) < 2:
        return "1-D: never quantized"
    if not name.endswith("weight"):
        return "not a weight: never quantized"
    if "_norm.weight" in name:
        return "norm: never quantized"
    if "ffn_gate_inp.weight" in name:
        return "router: never quantized"
    if name in _KEPT_EXACT:
        return "position/token-type embedding: never quantized"
    kept = next((text for text in _KEPT_SUBSTRINGS if text in name), None)
    return f"{kept}: never quantized" if kept else None


