"""GGUF export: the GGUF tensors grouped from the plan, their layout, metadata, tokenizer, checked and atomic writes."""

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
from safetensors.torch import load_file, save_file

import quantkit
from quantkit.api import QuantizeOptions
from quantkit.errors import QuantkitError
from quantkit.formats.gguf import GgufLayout
from quantkit.formats.gguf.hparams import exportable
from quantkit.formats.gguf.tensors import keeps_f32
from quantkit.formats.output import FileTensor, StoredTensor
from quantkit.kquants import BLOCK_FORMATS, encode
from quantkit.model.archs import ARCHS
from quantkit.model.checkpoint import Checkpoint
from quantkit.model.gguf_names import GGUF_ARCH
from quantkit.plan import make_plan
from quantkit.recipe import Recipe, get_preset
from quantkit.schemes import make_config
from tests.conftest import build_model, save_model

GGML = gguf.GGMLQuantizationType
EXPORTED = ["llama", "mixtral", "qwen2_moe", "deepseek_v2", "deepseek_v3"]
# block types the matrices cycle through, where their rows fit the block
QUANT_TYPES = [name for name in ("Q8_0", "Q4_K", "Q6_K", "Q4_1", "Q5_1") if name in BLOCK_FORMATS]

KQUANT_Q8_0 = Recipe(make_config("kquant", ggml_type="Q8_0"))  # --method kquant --type Q8_0: no preset
Item = StoredTensor


def layout_of(model: Path | str | None, recipe: Recipe = KQUANT_Q8_0) -> GgufLayout:
    """The GGUF of ``model`` quantized with ``recipe`` (the data tests store decide the tensor types)."""
    return GgufLayout(make_plan(Checkpoint.open(model), recipe))


def load(layout: GgufLayout, name: str) -> np.ndarray:
    return layout.load(by_name(layout.tensors)[name]).numpy()


def encoded(tensor: FileTensor, data: np.ndarray, type_name: str | None) -> Item:
    """``tensor``'s data as F32 (norms, routers), as ``type_name`` blocks where the rows fit, else F16."""
    if keeps_f32(tensor):
        return StoredTensor(tensor.name, "F32", data)
    n_per_row = tensor.shape[-1]
    if type_name is None or n_per_row % BLOCK_FORMATS.get(type_name).block_size:
        return StoredTensor(tensor.name, "F16", data.astype(np.float16))
    blocks = encode(type_name, data.reshape(-1, n_per_row)).reshape(*tensor.shape[:-1], -1)
    return StoredTensor(tensor.name, type_name, blocks)


def export_items(layout: GgufLayout, quantized: bool) -> list[Item]:
    types = QUANT_TYPES if quantized else [None]
    return [encoded(t, layout.load(t).numpy(), types[i % len(types)]) for i, t in enumerate(layout.tensors)]


def f32_items(layout: GgufLayout) -> list[Item]:
    return [StoredTensor(t.name, "F32", layout.load(t).numpy()) for t in layout.tensors]


def metadata(path: Path) -> dict[str, Any]:
    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items()}


def assert_tensors_equal(path: Path, items: list[Item], planned: list[FileTensor]) -> None:
    shapes = {t.name: t.shape for t in planned}
    tensors = gguf.GGUFReader(path).tensors
    assert [t.name for t in tensors] == [item.name for item in items]
    for tensor, item in zip(tensors, items, strict=True):
        assert tensor.tensor_type == GGML[item.type_name], item.name
        assert tuple(reversed(tensor.shape.tolist())) == shapes[item.name], item.name  # GGUF stores ggml's ne order
        assert tensor.data.tobytes() == np.ascontiguousarray(item.data).tobytes(), item.name


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "blocks"])
@pytest.mark.parametrize("model_type", EXPORTED)
def test_every_tensor_reads_back_exactly(
    model_type: str, quantized: bool, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    layout = layout_of(tiny_models[model_type])
    items = export_items(layout, quantized)
    path = tmp_path / "model.gguf"
    layout.write(path, items)
    assert_tensors_equal(path, items, layout.tensors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # no temporary file left


def test_demo_model_with_blocks_reads_back_exactly(tmp_path: Path) -> None:
    layout = layout_of(None)
    items = export_items(layout, quantized=True)
    assert {item.type_name for item in items} >= set(QUANT_TYPES)  # every block type is exercised
    path = tmp_path / "demo.gguf"
    layout.write(path, items)
    assert_tensors_equal(path, items, layout.tensors)
    meta = metadata(path)
    assert meta["general.architecture"] == "deepseek2"
    assert "output.weight" not in {item.name for item in items}  # tied: llama.cpp reuses token_embd
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
    layout = layout_of(tiny_models[model_type], get_preset("Q8_0"))
    path = tmp_path / "model.gguf"
    layout.write(path, export_items(layout, quantized=False))
    meta = metadata(path)
    assert {k: meta.get(k) for k in EXPECTED_METADATA[model_type]} == EXPECTED_METADATA[model_type]
    assert meta["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)  # the preset's
    assert meta["tokenizer.ggml.model"] == "none"  # the tiny models have no tokenizer
    if model_type == "deepseek_v2":  # topk_method greedy: no group-limited routing
        assert "deepseek2.expert_group_count" not in meta


def test_file_type_names_the_preset_else_guessed(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    assert layout_of(tiny_models["mixtral"], get_preset("Q4_K_M")).file_type == gguf.LlamaFileType.MOSTLY_Q4_K_M
    layout = layout_of(tiny_models["mixtral"])
    assert layout.file_type == gguf.LlamaFileType.GUESSED
    layout.write(tmp_path / "guessed.gguf", f32_items(layout))
    assert metadata(tmp_path / "guessed.gguf")["general.file_type"] == int(gguf.LlamaFileType.GUESSED)


def by_name(tensors: list[FileTensor]) -> dict[str, FileTensor]:
    return {t.name: t for t in tensors}


def item_names(tensor: FileTensor) -> tuple[str, ...]:
    return tuple(item.name for item in tensor.items)


def test_plan_merges_experts_in_expert_order(tiny_models: dict[str, Path]) -> None:
    mixtral = by_name(layout_of(tiny_models["mixtral"]).tensors)
    gate = mixtral["blk.1.ffn_gate_exps.weight"]
    assert gate.shape == (4, 128, 64)
    assert item_names(gate) == tuple(f"model.layers.1.block_sparse_moe.experts.{e}.w1.weight" for e in range(4))
    assert mixtral["blk.1.ffn_down_exps.weight"].shape == (4, 64, 128)
    assert keeps_f32(mixtral["blk.1.ffn_gate_inp.weight"]) and "output.weight" in mixtral

    qwen = by_name(layout_of(tiny_models["qwen2_moe"]).tensors)
    assert qwen["blk.0.ffn_gate_inp_shexp.weight"].shape == (1, 64)
    assert keeps_f32(qwen["blk.0.ffn_gate_inp_shexp.weight"]) and keeps_f32(qwen["blk.0.attn_q.bias"])
    assert qwen["blk.0.ffn_up_shexp.weight"].shape == (64, 64)

    v3 = by_name(layout_of(tiny_models["deepseek_v3"]).tensors)
    assert {"blk.0.ffn_gate.weight", "blk.0.attn_q.weight", "blk.1.ffn_gate_shexp.weight"} <= set(v3)
    assert item_names(v3["blk.1.exp_probs_b.bias"]) == ("model.layers.1.mlp.gate.e_score_correction_bias",)
    assert v3["blk.1.attn_kv_b.weight"].shape == (4 * (8 + 16), 16)  # heads x (qk_nope + v), kv_lora_rank
    assert not any(name.startswith(("blk.0.ffn_gate_exps", "blk.1.ffn_gate.")) for name in v3)


def test_llama_q_and_k_rows_are_permuted_to_interleaved_rope(tiny_models: dict[str, Path]) -> None:
    for model_type in ("llama", "mixtral"):
        layout = layout_of(tiny_models[model_type])
        for kind, n_head in (("q", 4), ("k", 2)):
            original = layout.plan.checkpoint.get(f"model.layers.0.self_attn.{kind}_proj.weight").numpy()
            permuted = load(layout, f"blk.0.attn_{kind}.weight")
            half = original.shape[0] // n_head // 2
            for head in range(n_head):
                rows = original[head * 2 * half : (head + 1) * 2 * half]
                # llama.cpp rotates pairs (2i, 2i+1); Hugging Face rotates (i, i + half)
                np.testing.assert_array_equal(permuted[head * 2 * half : (head + 1) * 2 * half : 2], rows[:half])
                np.testing.assert_array_equal(permuted[head * 2 * half + 1 : (head + 1) * 2 * half : 2], rows[half:])
    qwen = layout_of(tiny_models["qwen2_moe"])  # NEOX RoPE in llama.cpp: rows unchanged
    np.testing.assert_array_equal(load(qwen, "blk.0.attn_q.weight"),
                                  qwen.plan.checkpoint.get("model.layers.0.self_attn.q_proj.weight").numpy())


def test_fused_experts_on_disk_export_like_per_expert_ones(tmp_path: Path) -> None:
    model = build_model("qwen2_moe", seed=2)
    per_expert = layout_of(save_model(model, tmp_path / "per_expert"))
    fused_dir = save_model(model, tmp_path / "fused")
    (fused_dir / "model.safetensors").unlink()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(fused_dir / "model.safetensors"),
              metadata={"format": "pt"})
    fused = layout_of(fused_dir)
    assert any(name.endswith("experts.gate_up_proj") for name in fused.plan.checkpoint.tensors)
    assert fused.tensors == per_expert.tensors
    for tensor in fused.tensors:
        np.testing.assert_array_equal(fused.load(tensor), per_expert.load(tensor))


def test_tied_qwen2_moe_gets_the_output_weight_llama_cpp_requires(tiny_models: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    path = shutil.copytree(tiny_models["qwen2_moe"], tmp_path / "tied")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    layout = layout_of(path)
    np.testing.assert_array_equal(load(layout, "output.weight"), load(layout, "token_embd.weight"))


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
        GgufLayout(make_plan(checkpoint, get_preset("Q8_0")))
    out = tmp_path / "out.gguf"
    with pytest.raises(QuantkitError, match=message):
        quantkit.quantize(checkpoint.path, get_preset("Q8_0"), out,
                          options=QuantizeOptions(output_format="gguf", show_progress=False))
    assert not out.exists()


def failing(items: list[Item], after: int, error: BaseException) -> Iterator[Item]:
    yield from items[:after]
    raise error


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_interrupted_export_leaves_no_file_and_keeps_the_old_one(
    error: BaseException, tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, out = tiny_models["deepseek_v3"], tmp_path / "out" / "model.gguf"
    options = QuantizeOptions(output_format="gguf", show_progress=False, overwrite=True)
    quantkit.quantize(model, get_preset("Q8_0"), out, options=options)
    before = out.read_bytes()
    store = GgufLayout.store
    calls = []

    def fail_late(self: GgufLayout, *args: Any) -> StoredTensor:
        calls.append(1)
        if len(calls) == len(self.tensors):
            raise error
        return store(self, *args)

    monkeypatch.setattr(GgufLayout, "store", fail_late)
    with pytest.raises(type(error)):
        quantkit.quantize(model, get_preset("Q4_K_M"), out, options=options)
    assert out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.gguf", "model.quantkit_report.json"]


def test_wrong_tensors_raise_before_anything_is_written(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    layout = layout_of(tiny_models["llama"])
    items = export_items(layout, quantized=False)
    norm = next(i for i, item in enumerate(items) if item.name.endswith("attn_norm.weight"))
    matrix = next(i for i, item in enumerate(items) if item.name.endswith("attn_q.weight"))
    name, data = items[matrix].name, items[matrix].data

    def replaced(i: int, item: Item) -> list[Item]:
        return [*items[:i], item, *items[i + 1 :]]

    cases = {
        "got no data for 1 tensor": items[:-1],
        "comes twice": [*items, items[0]],
        "not planned": [*items, StoredTensor("blk.9.attn_q.weight", "F32", data)],
        "must stay F32": replaced(norm, StoredTensor(items[norm].name, "F16", items[norm].data.astype(np.float16))),
        "holds shape": replaced(matrix, StoredTensor(name, "F16", data[:, :32])),
        "uint8 ggml blocks": replaced(matrix, StoredTensor(name, "Q8_0", data)),
    }
    for message, case in cases.items():
        with pytest.raises(QuantkitError, match=message):
            layout.write(tmp_path / "out.gguf", case)
        assert list(tmp_path.iterdir()) == []


def test_demo_model_bpe_tokenizer(tmp_path: Path) -> None:
    layout = layout_of(None)
    path = tmp_path / "demo.gguf"
    layout.write(path, export_items(layout, quantized=False))
    meta = metadata(path)
    tokenizer = json.loads((layout.plan.checkpoint.path / "tokenizer.json").read_text())
    vocab = sorted(tokenizer["model"]["vocab"].items(), key=lambda kv: kv[1])
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.tokens"] == [text for text, _ in vocab]
    assert len(meta["tokenizer.ggml.merges"]) == len(tokenizer["model"]["merges"])
    assert meta["tokenizer.ggml.token_type"][:5] == [gguf.TokenType.CONTROL] * 4 + [gguf.TokenType.NORMAL]
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (0, 1)


def stories_tokenizer(path: Path) -> dict[str, Any]:
    layout = layout_of(path)
    out = path.parent / f"{path.name}.gguf"
    layout.write(out, f32_items(layout))
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


def test_load_reads_float32_of_any_stored_dtype() -> None:
    layout = layout_of(None)  # bfloat16 weights
    data = load(layout, "blk.0.attn_kv_b.weight")
    assert data.dtype == np.float32 and data.shape == by_name(layout.tensors)["blk.0.attn_kv_b.weight"].shape
    expected = layout.plan.checkpoint.get("model.layers.0.self_attn.kv_b_proj.weight").to(torch.float32).numpy()
    np.testing.assert_array_equal(data, expected)


def test_one_table_says_which_architectures_export() -> None:
    """Every architecture declares its llama.cpp tensor names; those that also declare hparams export."""
    assert set(GGUF_ARCH) == set(ARCHS)
    assert exportable() == ["deepseek_v2", "deepseek_v3", "llama", "mixtral", "qwen2_moe"]
    assert set(EXPORTED) == set(exportable())


def test_layers_past_the_decoder_and_rope_caches_are_left_out(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """DeepSeek's multi-token-prediction layer and an inv_freq buffer are in the plan but not in the GGUF."""
    path = shutil.copytree(tiny_models["deepseek_v3"], tmp_path / "mtp")
    tensors = load_file(str(path / "model.safetensors"))
    tensors.update({k.replace(".layers.1.", ".layers.2."): v.clone() for k, v in tensors.items() if ".layers.1." in k})
    tensors["model.layers.2.eh_proj.weight"] = torch.zeros(64, 128)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    layout = layout_of(path)
    assert "model.layers.2.eh_proj.weight" in {item.name for item in layout.plan.tensors}
    assert layout.tensors == layout_of(tiny_models["deepseek_v3"]).tensors


def test_experts_of_one_tensor_share_a_type(tiny_models: dict[str, Path]) -> None:
    recipe = KQUANT_Q8_0.with_rule([r"re:.*\.experts\.0\..*"], ggml_type="Q4_0")
    message = r"blk\.0\.ffn_gate_exps\.weight: GGUF stores all experts of a tensor in one type"
    with pytest.raises(QuantkitError, match=message):
        GgufLayout(make_plan(Checkpoint.open(tiny_models["mixtral"]), recipe))
