"""GGUF export: the tensor plan, the GGUF layout of the data, metadata, tokenizer, atomic writes."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from quantkit.errors import QuantkitError
from quantkit.formats.gguf_export import GgufSource, gguf_sources, load_source, write_gguf
from quantkit.kquants import BLOCK_FORMATS, encode
from quantkit.model.checkpoint import Checkpoint
from tests.conftest import build_model, save_model

GGML = gguf.GGMLQuantizationType
EXPORTED = ["llama", "mixtral", "qwen2_moe", "deepseek_v2", "deepseek_v3"]
# block types the matrices cycle through, where their rows fit the block
QUANT_TYPES = [name for name in ("Q8_0", "Q4_K", "Q6_K") if name in BLOCK_FORMATS]

Item = tuple[str, GGML, np.ndarray]


def encoded(source: GgufSource, data: np.ndarray, type_name: str | None) -> Item:
    """``source``'s data as F32 (norms, routers), as ``type_name`` blocks where the rows fit, else F16."""
    if source.keeps_f32:
        return source.name, GGML.F32, data
    n_per_row = source.shape[-1]
    if type_name is None or n_per_row % BLOCK_FORMATS.get(type_name).block_size:
        return source.name, GGML.F16, data.astype(np.float16)
    blocks = encode(type_name, data.reshape(-1, n_per_row)).reshape(*source.shape[:-1], -1)
    return source.name, gguf.GGMLQuantizationType[type_name], blocks


def export_items(checkpoint: Checkpoint, quantized: bool) -> list[Item]:
    types = QUANT_TYPES if quantized else [None]
    return [encoded(s, load_source(checkpoint, s), types[i % len(types)])
            for i, s in enumerate(gguf_sources(checkpoint))]


def metadata(path: Path) -> dict[str, Any]:
    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items()}


def assert_tensors_equal(path: Path, items: list[Item], sources: list[GgufSource]) -> None:
    shapes = {s.name: s.shape for s in sources}
    tensors = gguf.GGUFReader(path).tensors
    assert [t.name for t in tensors] == [name for name, _, _ in items]
    for tensor, (name, ggml_type, data) in zip(tensors, items, strict=True):
        assert tensor.tensor_type == ggml_type, name
        assert tuple(reversed(tensor.shape.tolist())) == shapes[name], name  # GGUF stores ggml's ne order
        assert tensor.data.tobytes() == np.ascontiguousarray(data).tobytes(), name


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "blocks"])
@pytest.mark.parametrize("model_type", EXPORTED)
def test_every_tensor_reads_back_exactly(
    model_type: str, quantized: bool, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    checkpoint = Checkpoint.open(tiny_models[model_type])
    items = export_items(checkpoint, quantized)
    path = tmp_path / "model.gguf"
    write_gguf(path, checkpoint, items)
    assert_tensors_equal(path, items, gguf_sources(checkpoint))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # no temporary file left


def test_demo_model_with_blocks_reads_back_exactly(tmp_path: Path) -> None:
    checkpoint = Checkpoint.open(None)
    items = export_items(checkpoint, quantized=True)
    # every block type is exercised
    assert {t for _, t, _ in items} >= {gguf.GGMLQuantizationType[name] for name in QUANT_TYPES}
    path = tmp_path / "demo.gguf"
    write_gguf(path, checkpoint, items, extra_metadata={"quantkit.recipe": "test", "quantkit.bits": 4})
    assert_tensors_equal(path, items, gguf_sources(checkpoint))
    meta = metadata(path)
    assert meta["general.architecture"] == "deepseek2"
    assert meta["quantkit.recipe"] == "test" and meta["quantkit.bits"] == 4
    assert "output.weight" not in {name for name, _, _ in items}  # tied: llama.cpp reuses token_embd
    assert meta["deepseek2.expert_gating_func"] == int(gguf.ExpertGatingFuncType.SIGMOID)
    assert meta["deepseek2.expert_group_count"] == 4 and meta["deepseek2.expert_group_used_count"] == 2
    assert meta["deepseek2.attention.q_lora_rank"] == 128 and meta["deepseek2.expert_weights_scale"] == 2.5
    assert "deepseek2.attention.key_length_mla" not in meta  # legacy attn_kv_b graph, not MLA
    assert meta["general.quantization_version"] == gguf.GGML_QUANT_VERSION


EXPECTED_METADATA: dict[str, dict[str, Any]] = {
    "llama": {"general.architecture": "llama", "llama.block_count": 2, "llama.embedding_length": 64,
              "llama.feed_forward_length": 128, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
              "llama.rope.dimension_count": 16, "llama.vocab_size": 128, "llama.context_length": 64},
    "mixtral": {"general.architecture": "llama", "llama.expert_count": 4, "llama.expert_used_count": 2,
                "llama.attention.head_count_kv": 2},
    "qwen2_moe": {"general.architecture": "qwen2moe", "qwen2moe.expert_count": 4, "qwen2moe.expert_used_count": 2,
                  "qwen2moe.expert_feed_forward_length": 32, "qwen2moe.expert_shared_feed_forward_length": 64},
    "deepseek_v2": {"general.architecture": "deepseek2", "deepseek2.leading_dense_block_count": 1,
                    "deepseek2.attention.q_lora_rank": 0, "deepseek2.attention.kv_lora_rank": 16,
                    "deepseek2.attention.key_length": 16, "deepseek2.attention.value_length": 16,
                    "deepseek2.attention.head_count_kv": 4, "deepseek2.rope.dimension_count": 8,
                    "deepseek2.expert_count": 8, "deepseek2.expert_shared_count": 1,
                    "deepseek2.expert_feed_forward_length": 32,
                    "deepseek2.expert_gating_func": int(gguf.ExpertGatingFuncType.SOFTMAX)},
    "deepseek_v3": {"general.architecture": "deepseek2", "deepseek2.expert_gating_func":
                    int(gguf.ExpertGatingFuncType.SIGMOID), "deepseek2.expert_group_count": 2,
                    "deepseek2.expert_group_used_count": 1, "deepseek2.expert_weights_norm": True},
}


@pytest.mark.parametrize("model_type", EXPORTED)
def test_metadata_holds_the_hparams_llama_cpp_reads(model_type: str, tiny_models: dict[str, Path],
                                                    tmp_path: Path) -> None:
    checkpoint = Checkpoint.open(tiny_models[model_type])
    path = tmp_path / "model.gguf"
    write_gguf(path, checkpoint, export_items(checkpoint, quantized=False))
    meta = metadata(path)
    assert {k: meta.get(k) for k in EXPECTED_METADATA[model_type]} == EXPECTED_METADATA[model_type]
    assert meta["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)
    assert meta["tokenizer.ggml.model"] == "none"  # the tiny models have no tokenizer
    if model_type == "deepseek_v2":  # topk_method greedy: no group-limited routing
        assert "deepseek2.expert_group_count" not in meta


def test_file_type_follows_the_main_block_type_unless_given(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    checkpoint = Checkpoint.open(tiny_models["mixtral"])
    blocks = [encoded(s, load_source(checkpoint, s), "Q8_0") for s in gguf_sources(checkpoint)]
    write_gguf(tmp_path / "q8.gguf", checkpoint, blocks)
    assert metadata(tmp_path / "q8.gguf")["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    floats = [(s.name, GGML.F32, load_source(checkpoint, s)) for s in gguf_sources(checkpoint)]
    write_gguf(tmp_path / "f32.gguf", checkpoint, floats)
    assert metadata(tmp_path / "f32.gguf")["general.file_type"] == int(gguf.LlamaFileType.ALL_F32)
    write_gguf(tmp_path / "given.gguf", checkpoint, floats, file_type=int(gguf.LlamaFileType.MOSTLY_Q4_K_M))
    assert metadata(tmp_path / "given.gguf")["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)


def by_name(sources: list[GgufSource]) -> dict[str, GgufSource]:
    return {s.name: s for s in sources}


def test_plan_merges_experts_in_expert_order(tiny_models: dict[str, Path]) -> None:
    mixtral = by_name(gguf_sources(Checkpoint.open(tiny_models["mixtral"])))
    gate = mixtral["blk.1.ffn_gate_exps.weight"]
    assert gate.shape == (4, 128, 64)
    assert gate.hf_names == tuple(f"model.layers.1.block_sparse_moe.experts.{e}.w1.weight" for e in range(4))
    assert mixtral["blk.1.ffn_down_exps.weight"].shape == (4, 64, 128)
    assert mixtral["blk.1.ffn_gate_inp.weight"].keeps_f32 and "output.weight" in mixtral

    qwen = by_name(gguf_sources(Checkpoint.open(tiny_models["qwen2_moe"])))
    assert qwen["blk.0.ffn_gate_inp_shexp.weight"].shape == (1, 64)
    assert qwen["blk.0.ffn_gate_inp_shexp.weight"].keeps_f32 and qwen["blk.0.attn_q.bias"].keeps_f32
    assert qwen["blk.0.ffn_up_shexp.weight"].shape == (64, 64)

    v3 = by_name(gguf_sources(Checkpoint.open(tiny_models["deepseek_v3"])))
    assert {"blk.0.ffn_gate.weight", "blk.0.attn_q.weight", "blk.1.ffn_gate_shexp.weight"} <= set(v3)
    assert v3["blk.1.exp_probs_b.bias"].hf_names == ("model.layers.1.mlp.gate.e_score_correction_bias",)
    assert v3["blk.1.attn_kv_b.weight"].shape == (4 * (8 + 16), 16)  # heads x (qk_nope + v), kv_lora_rank
    assert not any(name.startswith(("blk.0.ffn_gate_exps", "blk.1.ffn_gate.")) for name in v3)


def test_llama_q_and_k_rows_are_permuted_to_interleaved_rope(tiny_models: dict[str, Path]) -> None:
    for model_type in ("llama", "mixtral"):
        checkpoint = Checkpoint.open(tiny_models[model_type])
        sources = by_name(gguf_sources(checkpoint))
        for kind, n_head in (("q", 4), ("k", 2)):
            original = checkpoint.get(f"model.layers.0.self_attn.{kind}_proj.weight").numpy()
            permuted = load_source(checkpoint, sources[f"blk.0.attn_{kind}.weight"])
            half = original.shape[0] // n_head // 2
            for head in range(n_head):
                rows = original[head * 2 * half : (head + 1) * 2 * half]
                # llama.cpp rotates pairs (2i, 2i+1); Hugging Face rotates (i, i + half)
                np.testing.assert_array_equal(permuted[head * 2 * half : (head + 1) * 2 * half : 2], rows[:half])
                np.testing.assert_array_equal(permuted[head * 2 * half + 1 : (head + 1) * 2 * half : 2], rows[half:])
    qwen = Checkpoint.open(tiny_models["qwen2_moe"])  # NEOX RoPE in llama.cpp: rows unchanged
    np.testing.assert_array_equal(load_source(qwen, by_name(gguf_sources(qwen))["blk.0.attn_q.weight"]),
                                  qwen.get("model.layers.0.self_attn.q_proj.weight").numpy())


def test_fused_experts_on_disk_export_like_per_expert_ones(tmp_path: Path) -> None:
    model = build_model("qwen2_moe", seed=2)
    per_expert = Checkpoint.open(save_model(model, tmp_path / "per_expert"))
    fused_dir = save_model(model, tmp_path / "fused")
    (fused_dir / "model.safetensors").unlink()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(fused_dir / "model.safetensors"),
              metadata={"format": "pt"})
    fused = Checkpoint.open(fused_dir)
    assert any(name.endswith("experts.gate_up_proj") for name in fused.tensors)
    assert gguf_sources(fused) == gguf_sources(per_expert)
    for source in gguf_sources(fused):
        np.testing.assert_array_equal(load_source(fused, source), load_source(per_expert, source))


def test_tied_qwen2_moe_gets_the_output_weight_llama_cpp_requires(tiny_models: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    path = shutil.copytree(tiny_models["qwen2_moe"], tmp_path / "tied")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    checkpoint = Checkpoint.open(path)
    sources = by_name(gguf_sources(checkpoint))
    np.testing.assert_array_equal(load_source(checkpoint, sources["output.weight"]),
                                  load_source(checkpoint, sources["token_embd.weight"]))


def with_config(source: Path, target: Path, **changes: Any) -> Checkpoint:
    path = shutil.copytree(source, target)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))
    return Checkpoint.open(path)


@pytest.mark.parametrize(("model_type", "changes", "message"), [
    ("olmoe", {}, "does not support model_type 'olmoe'"),
    ("qwen3_moe", {}, "does not support model_type 'qwen3_moe'"),
    ("qwen2_moe", {"norm_topk_prob": True}, "norm_topk_prob"),
    ("deepseek_v3", {"rope_interleave": False}, "rope_interleave"),
    ("llama", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "longrope"),
])
def test_unsupported_models_raise(model_type: str, changes: dict[str, Any], message: str,
                                  tiny_models: dict[str, Path], tmp_path: Path) -> None:
    checkpoint = with_config(tiny_models[model_type], tmp_path / "model", **changes)
    with pytest.raises(QuantkitError, match=message):
        gguf_sources(checkpoint)
    with pytest.raises(QuantkitError, match=message):
        write_gguf(tmp_path / "out.gguf", checkpoint, [])
    assert not (tmp_path / "out.gguf").exists()


def failing(items: list[Item], after: int, error: BaseException) -> Iterator[Item]:
    yield from items[:after]
    raise error


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_interrupted_write_leaves_no_file_and_keeps_the_old_one(
    error: BaseException, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    checkpoint = Checkpoint.open(tiny_models["deepseek_v3"])
    items = export_items(checkpoint, quantized=False)
    with pytest.raises(type(error)):
        write_gguf(tmp_path / "new.gguf", checkpoint, failing(items, 3, error))
    assert list(tmp_path.iterdir()) == []
    old = tmp_path / "old.gguf"
    write_gguf(old, checkpoint, items)
    before = old.read_bytes()
    with pytest.raises(type(error)):
        write_gguf(old, checkpoint, failing(items, len(items) - 1, error))
    assert old.read_bytes() == before and list(tmp_path.iterdir()) == [old]


def test_wrong_tensors_raise_before_anything_is_written(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    checkpoint = Checkpoint.open(tiny_models["llama"])
    items = export_items(checkpoint, quantized=False)
    norm = next(i for i, (name, _, _) in enumerate(items) if name.endswith("attn_norm.weight"))
    name, _, data = items[norm]
    matrix = next(i for i, (name, _, _) in enumerate(items) if name.endswith("attn_q.weight"))
    cases = {
        "got no data for 1 tensor": items[:-1],
        "comes twice": [*items, items[0]],
        "not planned": [*items, ("blk.9.attn_q.weight", GGML.F32, items[matrix][2])],
        "must stay F32": [*items[:norm], (name, GGML.F16, data.astype(np.float16)), *items[norm + 1 :]],
        "holds shape": [*items[:matrix], (items[matrix][0], GGML.F16, items[matrix][2][:, :32]), *items[matrix + 1 :]],
        "uint8 ggml blocks": [*items[:matrix], (items[matrix][0], GGML.Q8_0, items[matrix][2]), *items[matrix + 1 :]],
    }
    for message, case in cases.items():
        with pytest.raises(QuantkitError, match=message):
            write_gguf(tmp_path / "out.gguf", checkpoint, case)
        assert list(tmp_path.iterdir()) == []


def test_demo_model_bpe_tokenizer(tmp_path: Path) -> None:
    checkpoint = Checkpoint.open(None)
    path = tmp_path / "demo.gguf"
    write_gguf(path, checkpoint, export_items(checkpoint, quantized=False))
    meta = metadata(path)
    tokenizer = json.loads((checkpoint.path / "tokenizer.json").read_text())
    vocab = sorted(tokenizer["model"]["vocab"].items(), key=lambda kv: kv[1])
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.tokens"] == [text for text, _ in vocab]
    assert len(meta["tokenizer.ggml.merges"]) == len(tokenizer["model"]["merges"])
    assert meta["tokenizer.ggml.token_type"][:5] == [gguf.TokenType.CONTROL] * 4 + [gguf.TokenType.NORMAL]
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (0, 1)


def stories_tokenizer(path: Path) -> dict[str, Any]:
    checkpoint = Checkpoint.open(path)
    out = path.parent / f"{path.name}.gguf"
    sources = gguf_sources(checkpoint)
    write_gguf(out, checkpoint, [(s.name, GGML.F32, load_source(checkpoint, s)) for s in sources])
    return {k: v for k, v in metadata(out).items() if k.startswith("tokenizer.")}


def test_sentencepiece_tokenizer_with_and_without_tokenizer_model(stories_model: Path, tmp_path: Path) -> None:
    spm = stories_tokenizer(stories_model)
    assert spm["tokenizer.ggml.model"] == "llama" and len(spm["tokenizer.ggml.tokens"]) == 512
    assert spm["tokenizer.ggml.tokens"][259:261] == ["▁t", "he"]
    assert spm["tokenizer.ggml.scores"][259:262] == [0.0, -1.0, -2.0]
    assert spm["tokenizer.ggml.token_type"][:4] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL,
                                                     gguf.TokenType.CONTROL, gguf.TokenType.BYTE]
    assert (spm["tokenizer.ggml.bos_token_id"], spm["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert spm["tokenizer.ggml.add_space_prefix"] is True  # SentencePiece's add_dummy_prefix default
    copy = tmp_path / "json_only"
    copy.mkdir()
    for file in stories_model.iterdir():
        if file.name != "tokenizer.model":
            shutil.copy2(file, copy / file.name)  # a copy: symlinks out of a model directory are refused
    from_json = stories_tokenizer(copy)  # SentencePiece scores rebuilt from tokenizer.json's piece order
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.add_space_prefix"):
        assert from_json[key] == spm[key], key
    types = from_json["tokenizer.ggml.token_type"]
    assert types[1:] == spm["tokenizer.ggml.token_type"][1:] and types[0] == gguf.TokenType.CONTROL


def test_load_source_reads_float32_of_any_stored_dtype() -> None:
    checkpoint = Checkpoint.open(None)  # bfloat16 weights
    source = by_name(gguf_sources(checkpoint))["blk.0.attn_kv_b.weight"]
    data = load_source(checkpoint, source)
    assert data.dtype == np.float32 and data.shape == source.shape
    expected = checkpoint.get("model.layers.0.self_attn.kv_b_proj.weight").to(torch.float32).numpy()
    np.testing.assert_array_equal(data, expected)
