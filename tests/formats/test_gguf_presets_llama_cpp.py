"""llama.cpp's own quantizer as the reference for quantkit's k-quant presets and llama-quantize's overrides.

``llama_model_quantize`` (llama-cpp-python's binding of llama.cpp's quantizer, without an importance
matrix) quantizes quantkit's F32 GGUF export; quantkit's ``--preset`` GGUF export of the same checkpoint
must hold, tensor for tensor, the same ggml type and the same bytes. The tiny models have rows that are
not multiples of 256 (or of 32) so that llama.cpp's fallbacks run, enough layers for the n/16, n/8 and
use_more_bits rules, and the layouts llama.cpp treats specially: a dense Llama with grouped KV heads
(and one of 80 blocks, which llama.cpp takes for a 70B), a Mixtral layout with exactly 8 experts,
Qwen2-MoE (shared expert, tied embeddings: its GGUF holds an ``output.weight`` all the same) and
DeepSeek-V2/V3 (shared experts, a dense first layer, MLA's ``attn_kv_b``; V3 with 8 routed experts
and a low-rank ``attn_q``).

llama-cpp-python is not a dependency; the tests skip without it (see test_gguf_llama_cpp.py to build it).
"""

from __future__ import annotations

import contextlib
import ctypes
import io
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

from quantkit.api import QuantizeOptions, quantize
from quantkit.model.checkpoint import Checkpoint
from quantkit.recipe import get_preset

pytestmark = pytest.mark.slow
llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: no llama_model_quantize")
from tests.formats.test_gguf_llama_cpp import export  # noqa: E402  (needs llama_cpp, as this module)

PRESETS = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0"]
_MOE = dict(num_experts_per_tok=2, tie_word_embeddings=False, vocab_size=160, max_position_embeddings=64)
_DEEPSEEK = dict(num_attention_heads=4, num_key_value_heads=4, n_group=2, topk_group=1, first_k_dense_replace=1,
                 qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32, **_MOE)
# model name -> (transformers model_type, config); row lengths noted where they are not multiples of 256
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    # 16 layers (n/16 = 1, n/8 = 2), n_gqa 4; ffn_down rows 96 (Q*_K fall back to 32-blocks)
    "llama": ("llama", dict(hidden_size=256, intermediate_size=96, num_hidden_layers=16, num_attention_heads=8,
                            num_key_value_heads=2, **_MOE)),
    # llama.cpp's LLM_TYPE_70B: 80 blocks with grouped KV heads raise attn_v (rows of 64: seen through the fallback)
    "llama_80_blocks": ("llama", dict(hidden_size=64, intermediate_size=32, num_hidden_layers=80,
                                      num_attention_heads=4, num_key_value_heads=1, **_MOE)),
    # exactly 8 experts (llama.cpp's n_expert == 8 rules), n_gqa 3; every row 96 but ffn_down_exps' 256
    "mixtral": ("mixtral", dict(hidden_size=96, intermediate_size=256, num_hidden_layers=8, num_attention_heads=3,
                                num_key_value_heads=1, num_local_experts=8, **_MOE)),
    # tied embeddings; expert rows 80 (no 32-block fits: F16), shared expert's ffn_down rows 160
    "qwen2_moe": ("qwen2_moe", dict(hidden_size=256, intermediate_size=128, num_hidden_layers=4,
                                    num_attention_heads=4, num_key_value_heads=1, num_experts=4,
                                    moe_intermediate_size=80, shared_expert_intermediate_size=160,
                                    **{**_MOE, "tie_word_embeddings": True})),
    # 6 routed + 2 shared experts, dense ffn_down rows 200 (F16), attn_kv_b rows 32, attn_output rows 128
    "deepseek_v2": ("deepseek_v2", dict(hidden_size=256, intermediate_size=200, num_hidden_layers=8,
                                        n_routed_experts=6, moe_intermediate_size=64, n_shared_experts=2,
                                        kv_lora_rank=32, q_lora_rank=None, **_DEEPSEEK)),
    # 8 routed experts, q_lora_rank 64; expert rows 96, attn_kv_b/attn_q_b rows 64
    "deepseek_v3": ("deepseek_v3", dict(hidden_size=256, intermediate_size=288, num_hidden_layers=4,
                                        n_routed_experts=8, moe_intermediate_size=96, n_shared_experts=1,
                                        kv_lora_rank=64, q_lora_rank=64, **_DEEPSEEK)),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """name -> (checkpoint directory, quantkit's F32 GGUF of it)."""
    import transformers

    transformers.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("preset_models")
    built = {}
    for name, (model_type, config) in MODELS.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(model_type, **config), dtype=torch.float32)
        with torch.no_grad():
            for param in model.parameters():
                if param.ndim >= 2:
                    param.normal_(0, 0.05)
        with contextlib.redirect_stderr(io.StringIO()):
            model.save_pretrained(root / name)
        built[name] = (root / name, export(Checkpoint.open(root / name), root / f"{name}-f32.gguf", "F32"))
    return built


def ggml_type_id(name: str) -> int:
    return int(gguf.GGMLQuantizationType[name.upper()])


def llama_quantize(source: Path, out: Path, preset: str, *, tensor_types: tuple[str, ...] = (),
                   output_tensor_type: str | None = None, token_embedding_type: str | None = None) -> Path:
    """llama-quantize's library call: ``preset`` with the same overrides as the CLI, no imatrix, one thread."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(gguf.LlamaFileType[f"MOSTLY_{preset}"])
    params.nthread = 1
    if output_tensor_type is not None:
        params.output_tensor_type = ggml_type_id(output_tensor_type)
    if token_embedding_type is not None:
        params.token_embedding_type = ggml_type_id(token_embedding_type)
    patterns = [entry.partition("=") for entry in tensor_types]  # quantize.cpp: split at the first '=', lower-case
    names = [pattern.lower().encode() for pattern, _, _ in patterns]  # kept alive until the call returns
    overrides = (llama_cpp.llama_model_tensor_override * (len(patterns) + 1))()  # zeroed: a NULL pattern ends it
    for i, (name, (_, _, type_name)) in enumerate(zip(names, patterns, strict=True)):
        overrides[i].pattern, overrides[i].type = name, ggml_type_id(type_name)
    if patterns:
        params.tt_overrides = overrides
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) == 0
    return out


def quantkit_gguf(model: Path, out: Path, preset: str, **overrides: Any) -> Path:
    recipe = get_preset(preset)
    if overrides:
        recipe = recipe.with_default(**overrides)
    quantize(model, recipe, out, options=QuantizeOptions(output_format="gguf", show_progress=False))
    return out


def tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(path).tensors}


def differences(ours: Path, reference: Path) -> tuple[list[str], int]:
    """Tensors whose type or bytes differ (as 'name: ours vs llama.cpp'), and the reference's tensor count."""
    mine, theirs = tensors(ours), tensors(reference)
    assert sorted(mine) == sorted(theirs)
    diffs = [f"{name}: {mine[name][0]} vs {t}" + (" (bytes)" if mine[name][0] == t else "")
             for name, (t, data) in theirs.items() if mine[name] != (t, data)]
    return diffs, len(theirs)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("model", list(MODELS))
def test_preset_gives_llama_cpp_types_and_bytes(model: str, preset: str, models: dict[str, tuple[Path, Path]],
                                                tmp_path: Path) -> None:
    checkpoint, f32 = models[model]
    reference = llama_quantize(f32, tmp_path / "llama.gguf", preset)
    ours = quantkit_gguf(checkpoint, tmp_path / "quantkit.gguf", preset)
    diffs, total = differences(ours, reference)
    print(f"\n| {model} | {preset} | {total - len(diffs)}/{total} | {ours.stat().st_size:,} | "
          f"{reference.stat().st_size:,} |")
    assert diffs == []


# (model, preset, --tensor-type entries, --output-tensor-type, --token-embedding-type)
OVERRIDES = [
    # blk.0's attn_v by hand: the Q3_K_M counter of attn_v skips it; the first pattern wins; a 32-block type
    # on rows of 96; F32 keeps a tensor; the output's type takes no fallback
    ("llama", "Q3_K_M", (r"blk\.0\.attn_v=q6_k", "ffn_down=q8_0", "FFN_=q2_k", "attn_output=Q5_1",
                         r"blk\.1[0-5]\.attn_q=f32"), "Q8_0", "Q4_K"),
    # n_expert == 8 rules replaced by patterns; expert rows of 96: Q2_K falls back to Q4_0
    ("mixtral", "Q4_K_M", ("attn_k=q4_k", r"blk\.[0-3]\.ffn_.*_exps=q2_k"), None, "Q8_0"),
    # tied embeddings and qwen2moe's output.weight: --output-tensor-type reaches output.weight, not token_embd
    ("qwen2_moe", "Q5_K_M", ("shexp=q4_k",), "Q5_K", None),
    ("qwen2_moe", "Q2_K", (r"token_embd=q6_k", "output=q3_k"), None, None),
    ("deepseek_v2", "Q4_K_S", ("kv_b=q8_0", "ffn_down_exps=f16", r"blk\.0\.=q5_0"), "F16", "F16"),
    ("deepseek_v3", "Q3_K_L", ("attn_q_b=q4_1", "attn_kv_a_mqa=q6_k"), None, "Q5_K"),
]


@pytest.mark.parametrize(("model", "preset", "tensor_types", "output_type", "embedding_type"), OVERRIDES)
def test_overrides_give_llama_cpp_types_and_bytes(
    model: str, preset: str, tensor_types: tuple[str, ...], output_type: str | None, embedding_type: str | None,
    models: dict[str, tuple[Path, Path]], tmp_path: Path,
) -> None:
    checkpoint, f32 = models[model]
    reference = llama_quantize(f32, tmp_path / "llama.gguf", preset, tensor_types=tensor_types,
                               output_tensor_type=output_type, token_embedding_type=embedding_type)
    ours = quantkit_gguf(checkpoint, tmp_path / "quantkit.gguf", preset, tensor_types=" ".join(tensor_types),
                         output_tensor_type=output_type, token_embedding_type=embedding_type)
    diffs, total = differences(ours, reference)
    print(f"\n| {model} | {preset} + overrides | {total - len(diffs)}/{total} |")
    assert diffs == []
    plain = tensors(llama_quantize(f32, tmp_path / "plain.gguf", preset))
    assert tensors(reference) != plain  # the overrides changed something in llama.cpp's file
