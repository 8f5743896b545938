"""Reading GGUF back (formats/gguf/config.py, read.py, scan.py): every architecture quantkit exports.

An F32 export read back must be the float model: the same config where GGUF records it, and logits equal
to float rounding (names, expert stacking, llama's q/k permutation and tied heads all undone). transformers'
own GGUF loader, an independent implementation, must agree where it supports the architecture.
"""

from __future__ import annotations

import contextlib
import io
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.formats.gguf import GgufLayout
from quantkit.formats.gguf.config import hf_config, open_gguf
from quantkit.formats.gguf.scan import check_gguf
from quantkit.formats.load import load_gguf, load_quantized
from quantkit.formats.output import StoredTensor
from quantkit.model.checkpoint import Checkpoint
from quantkit.plan import make_plan
from quantkit.recipe import get_preset
from tests.conftest import build_model, save_model

EXPORTED = ["llama", "mixtral", "qwen2_moe", "deepseek_v2", "deepseek_v3"]
# the keys GGUF records (or llama.cpp's graph fixes) that shape the model, per architecture
CONFIG_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size",
               "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "num_experts_per_tok",
               "num_local_experts", "num_experts", "moe_intermediate_size", "shared_expert_intermediate_size",
               "n_routed_experts", "n_shared_experts", "first_k_dense_replace", "n_group", "topk_group",
               "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
               "routed_scaling_factor", "norm_topk_prob", "head_dim", "num_key_value_heads")


def export_f32(model_dir: Path, out: Path) -> Path:
    """A GGUF of ``model_dir`` with every tensor in F32 (the CLI's GGUF holds k-quants)."""
    layout = GgufLayout(make_plan(Checkpoint.open(model_dir), get_preset("Q8_0")))
    layout.write(out, (StoredTensor(t.name, "F32", layout.load(t).numpy()) for t in layout.tensors))
    return out


def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, use_cache=False).logits  # type: ignore[no-any-return]


@pytest.mark.parametrize("arch", EXPORTED)
def test_f32_export_reads_back_as_the_float_model(arch: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    path = export_f32(tiny_models[arch], tmp_path / "model.gguf")
    original = load_quantized(tiny_models[arch], dtype=torch.float32)
    config = hf_config(open_gguf(path), path)
    assert config["model_type"] == arch
    expected = original.config.to_dict()
    expected["head_dim"] = expected.get("head_dim") or expected["hidden_size"] // expected["num_attention_heads"]
    unused = ("n_group", "topk_group") if expected.get("topk_method") == "greedy" else ()  # V2: routing ignores them
    for key in CONFIG_KEYS:
        if key in expected and key in config and key not in unused:
            assert config[key] == expected[key], key
    model = load_quantized(path)  # a GGUF file goes to load_gguf
    tokens = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    want = logits(original, tokens)
    assert torch.allclose(logits(model, tokens), want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_transformers_gguf_loader_agrees(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """transformers' GGUF reader gives our logits for llama. It has no deepseek2, reads Mixtral's stacked experts
    as a dense llama, and 5.25's qwen2moe misses the expert and shared-expert sizes (its model gets the defaults).

    Its config and tensors (``load_gguf_checkpoint``: its own names, reverse permutation and dequantization)
    go into a model of its config; ``from_pretrained(gguf_file=...)`` does the same but needs accelerate.
    """
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = export_f32(tiny_models["llama"], tmp_path / "model.gguf")
    with contextlib.redirect_stderr(io.StringIO()):
        config = transformers.AutoConfig.for_model(**load_gguf_checkpoint(str(path))["config"])
        theirs = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=theirs)["tensors"]
    result = theirs.load_state_dict(tensors, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}
    theirs.tie_weights()
    tokens = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    want = logits(theirs, tokens)
    assert torch.allclose(logits(load_gguf(path), tokens), want, rtol=0, atol=1e-5 * float(want.abs().max()))


ROPE_SCALING = {
    "llama-linear": ("llama", {"rope_type": "linear", "factor": 4.0}),
    # Llama 3 survives only as rope_freqs: the loader divides the frequencies by them
    "llama-llama3": ("llama", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 16}),
    # YaRN with DeepSeek's mscale (GGUF holds 0.1 x mscale_all_dim; llama.cpp assumes mscale = mscale_all_dim)
    "deepseek_v2-yarn": ("deepseek_v2", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                         "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32.0,
                                         "beta_slow": 1.0}),
    "deepseek_v3-yarn": ("deepseek_v3", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                         "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32.0, "beta_slow": 1.0}),
}


@pytest.mark.parametrize("case", ROPE_SCALING)
def test_rope_scaling_reads_back(case: str, tmp_path: Path) -> None:
    """60 positions, past the 16 the scaling starts from (llama3 logits without rope_freqs: 9% of their scale off)."""
    arch, rope = ROPE_SCALING[case]
    model = build_model(arch)
    model.config.rope_parameters = {"rope_theta": 10000.0, **rope}
    source = save_model(model, tmp_path / case)
    original = load_quantized(source, dtype=torch.float32)
    path = export_f32(source, tmp_path / f"{case}.gguf")
    tokens = torch.randint(0, 128, (1, 60), generator=torch.Generator().manual_seed(2))
    want = logits(original, tokens)
    assert torch.allclose(logits(load_gguf(path), tokens), want, rtol=0, atol=1e-5 * float(want.abs().max()))


def _minimal_gguf(path: Path, array_count: int) -> Path:
    """A GGUF header with one UINT8 array that claims ``array_count`` elements, then end of file."""
    key = b"general.junk"
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
    path.write_bytes(header + struct.pack("<IIQ", 9, 0, array_count) + b"\0" * 16)
    return path


@pytest.mark.parametrize("damage", ["garbage", "empty", "huge array", "cut header", "cut data", "no arch",
                                    "foreign arch"])
def test_bad_gguf_is_one_line_error(damage: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "bad.gguf"
    good = export_f32(tiny_models["llama"], tmp_path / "good.gguf").read_bytes()
    if damage == "garbage":
        path.write_bytes(b"not a gguf at all" * 10)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "huge array":  # GGUFReader alone would loop 2**60 times over empty views
        _minimal_gguf(path, 2**60)
    elif damage == "cut header":
        path.write_bytes(good[:300])
    elif damage == "cut data":
        path.write_bytes(good[: len(good) - 100])
    elif damage == "no arch":
        _minimal_gguf(path, 4)
    else:  # a valid GGUF of an architecture quantkit does not export
        writer = gguf.GGUFWriter(path, "qwen3moe")
        writer.add_block_count(1)
        writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    with pytest.raises(QuantkitError) as error:
        load_gguf(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_scan_counts_tensor_types(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    path = export_f32(tiny_models["mixtral"], tmp_path / "model.gguf")
    types = check_gguf(path)
    assert set(types) == {"F32"} and sum(types.values()) == len(open_gguf(path).tensors)
