"""``quantize --method kquant``: block types from presets, importance from calibration, ggml safetensors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
import transformers
from typer.testing import CliRunner

from quantkit.calib.artifact import load_calibration
from quantkit.calib.run import CalibrationSettings, calibrate
from quantkit.cli import app
from quantkit.errors import QuantkitError
from quantkit.formats.load import load_quantized
from quantkit.kquants import decode, encode
from quantkit.model.archs import get_arch
from quantkit.model.archs.base import Role
from quantkit.model.checkpoint import Checkpoint
from quantkit.plan import make_plan
from quantkit.recipe import get_preset
from tests.conftest import copy_tokenizer, save_model

runner = CliRunner()
WIDE = dict(  # rows of 256 so k-quants apply; kv_lora_rank 16 is not a multiple of 32 (F16 fallback)
    hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False,
    n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=2,
    topk_group=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
)
STARVED_EXPERT = 3  # layer 1's router never picks it


def run(*args: str | Path) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def wide_model(tiny_lm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DeepSeek-V3 with 256-wide rows, a tokenizer, and one expert its router never picks."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(5)
    config = transformers.AutoConfig.for_model("deepseek_v3", **WIDE)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:
                param.normal_(0, 0.05)
        model.model.layers[1].mlp.gate.e_score_correction_bias[STARVED_EXPERT] = -1e4
    return copy_tokenizer(tiny_lm, save_model(model, tmp_path_factory.mktemp("wide") / "deepseek_v3"))


@pytest.fixture(scope="module")
def wide_calibration(wide_model: Path, test_text: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wide_calib") / "calib"
    settings = CalibrationSettings(dataset=str(test_text), num_samples=8, seq_len=32, batch_size=4)
    calibrate(wide_model, out, settings, show_progress=False)
    return out


def stored(out: Path) -> tuple[dict[str, Any], Checkpoint]:
    checkpoint = Checkpoint.open(out)
    return checkpoint.config["quantization_config"], checkpoint


def test_type_q4_k_blocks_equal_the_encoder_and_load(wide_model: Path, tmp_path: Path) -> None:
    code, _, err = run("quantize", wide_model, "--method", "kquant", "--type", "Q4_K", "--out", tmp_path / "q")
    assert code == 0, err
    config, out = stored(tmp_path / "q")
    source = Checkpoint.open(wide_model)
    assert config["quant_method"] == "quantkit-ggml"
    weights = config["weights"]
    gate = "model.layers.1.mlp.experts.2.gate_proj"
    assert weights[gate] == {"type": "Q4_K", "ggml_type_id": 12, "shape": [256, 256]}
    expected = encode("Q4_K", source.get(f"{gate}.weight").numpy())
    assert torch.equal(out.get(f"{gate}.weight_blocks"), torch.from_numpy(expected))
    # kv_b_proj's rows hold kv_lora_rank = 16 weights: neither 256 nor 32 divides them, so it stays F16
    report = json.loads((tmp_path / "q" / "quantkit_report.json").read_text())
    records = {t["name"]: t for t in report["tensors"]}
    kv_b = records["model.layers.0.self_attn.kv_b_proj.weight"]
    assert kv_b["scheme"] == "fp16" and kv_b["type_rule"].startswith("fallback from Q4_K: row 16")
    assert records["model.layers.1.mlp.gate.weight"]["scheme"] == "float"  # routers are never quantized
    assert records["model.embed_tokens.weight"]["scheme"] == "float"  # --type alone leaves embeddings
    model = load_quantized(tmp_path / "q")
    dequantized = model.state_dict()["model.layers.1.mlp.experts.gate_up_proj"][2, :256]
    original = source.get(f"{gate}.weight")
    assert 0 < float((dequantized - original).norm() / original.norm()) < 0.1


def test_preset_assigns_llama_cpp_types_per_gguf_tensor(wide_model: Path, tmp_path: Path) -> None:
    code, _, err = run("quantize", wide_model, "--preset", "Q4_K_M", "--shared-experts-type", "Q8_0",
                       "--out", tmp_path / "q")
    assert code == 0, err
    types = {m: w["type"] for m, w in stored(tmp_path / "q")[0]["weights"].items()}
    assert types["lm_head"] == "Q6_K" and types["model.embed_tokens"] == "Q4_K"  # untied: output gets Q6_K
    # use_more_bits(i, 2 layers) holds for layer 1 only (i >= 7n/8): ffn_down Q6_K there, the base type on layer 0
    assert {types[f"model.layers.1.mlp.experts.{e}.down_proj"] for e in range(4)} == {"Q6_K"}
    assert types["model.layers.0.mlp.down_proj"] == "Q4_K"
    assert types["model.layers.1.mlp.shared_experts.up_proj"] == "Q8_0"
    assert types["model.layers.1.self_attn.q_proj"] == "Q4_K"
    assert "model.layers.1.mlp.gate" not in types


def test_importance_comes_from_calibration_per_expert(wide_model: Path, wide_calibration: Path,
                                                      tmp_path: Path) -> None:
    code, _, err = run("quantize", wide_model, "--method", "kquant", "--type", "Q3_K", "--calibration",
                       wide_calibration, "--out", tmp_path / "q")
    assert code == 0, err
    _, out = stored(tmp_path / "q")
    source, calib = Checkpoint.open(wide_model), load_calibration(wide_calibration)
    arch = get_arch("deepseek_v3")
    report = json.loads((tmp_path / "q" / "quantkit_report.json").read_text())
    records = {t["name"]: t for t in report["tensors"]}
    for expert in (0, STARVED_EXPERT):
        name = f"model.layers.1.mlp.experts.{expert}.up_proj.weight"
        importance, tokens = calib.importance(arch, name)
        assert (tokens == 0) == (expert == STARVED_EXPERT)
        if tokens == 0:
            assert torch.equal(importance, torch.ones(256))  # uniform, as llama.cpp does
        weighted = encode("Q3_K", source.get(name).numpy(), importance.numpy())
        assert torch.equal(out.get(name.replace(".weight", ".weight_blocks")), torch.from_numpy(weighted))
        assert not np.array_equal(weighted, encode("Q3_K", source.get(name).numpy()))
        assert records[name]["importance_tokens"] == tokens
    assert any("uniform importance" in note for note in report["notes"])


@pytest.mark.parametrize(("extra", "fragments"), [
    (["--method", "kquant"], ["kquant needs a block type"]),
    (["--method", "kquant", "--type", "Q7_K"], ["unknown ggml block type 'Q7_K'"]),
    (["--preset", "Q4_K_X"], ["unknown preset 'Q4_K_X'", "Q4_K_M"]),
    (["--preset", "Q4_K_M", "--format", "compressed-tensors"], ["--format ggml or gguf"]),
    (["--method", "absmax", "--shared-experts-type", "Q8_0"], ["--shared-experts-type applies to --method kquant"]),
    (["--preset", "Q4_K_M", "--shared-experts-type", "Q9_K"], ["'Q9_K' for --shared-experts-type; supported: Q2_K"]),
    (["--preset", "Q4_K_M", "--dense-ffn-type", "q8_0"], ["'q8_0' for --dense-ffn-type"]),
    (["--method", "absmax", "--format", "gguf"], ["use --method kquant"]),
    (["--method", "absmax", "--tensor-type", "attn_v=q8_0"], ["--tensor-type does not apply to method absmax"]),
    (["--method", "kquant", "--type", "Q4_K", "--output-tensor-type", "Q8_0"], ["override a k-quant preset's"]),
    (["--preset", "Q4_K_M", "--tensor-type", "attn_v"], ["--tensor-type 'attn_v': expected PATTERN=TYPE"]),
    (["--preset", "Q4_K_M", "--tensor-type", "attn_v[=q8_0"], ["bad regular expression"]),
    (["--preset", "Q4_K_M", "--token-embedding-type", "Q9_K"], ["'Q9_K' for --token-embedding-type; supported"]),
])
def test_kquant_errors_are_one_line(wide_model: Path, tmp_path: Path, extra: list[str],
                                    fragments: list[str]) -> None:
    code, _, err = run("quantize", wide_model, *extra, "--out", tmp_path / "q")
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not (tmp_path / "q").exists()


def test_presets_command_shows_rules() -> None:
    code, out, err = run("presets", "Q4_K_M", "--json")
    assert code == 0, err
    rules = json.loads(out)
    assert any("Q6_K" in row["type"] for row in rules)
    code, out, _ = run("presets")
    assert code == 0 and "Q4_K_M" in out and "Q2_K" in out


def test_gguf_holds_the_same_blocks_as_the_safetensors_output(wide_model: Path, wide_calibration: Path,
                                                              tmp_path: Path) -> None:
    import gguf

    common = ["--preset", "Q3_K_M", "--calibration", wide_calibration]
    code, _, err = run("quantize", wide_model, *common, "--out", tmp_path / "st")
    assert code == 0, err
    code, _, err = run("quantize", wide_model, *common, "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert code == 0, err
    assert (tmp_path / "m.quantkit_report.json").is_file()
    config, out = stored(tmp_path / "st")
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    checked = 0
    for gguf_name, hf_modules in (
        ("blk.1.ffn_up_exps.weight", [f"model.layers.1.mlp.experts.{e}.up_proj" for e in range(4)]),
        ("blk.1.ffn_down_shexp.weight", ["model.layers.1.mlp.shared_experts.down_proj"]),
        ("blk.0.attn_q.weight", ["model.layers.0.self_attn.q_proj"]),
        ("output.weight", ["lm_head"]),
    ):
        tensor = tensors[gguf_name]
        assert tensor.tensor_type.name == config["weights"][hf_modules[0]]["type"]
        blocks = np.stack([out.get(f"{m}.weight_blocks").numpy() for m in hf_modules])
        np.testing.assert_array_equal(np.asarray(tensor.data).reshape(-1), blocks.reshape(-1))
        checked += 1
    assert checked == 4
    assert tensors["blk.1.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    code, _, err = run("quantize", wide_model, *common, "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert code == 2 and "exists" in err


def test_importance_lowers_the_weighted_error_of_every_tensor(wide_model: Path, wide_calibration: Path) -> None:
    """What ggml's weighted encoders optimise: sum(importance * error^2) drops on every weight and type."""
    source, calib = Checkpoint.open(wide_model), load_calibration(wide_calibration)
    arch = get_arch("deepseek_v3")
    names = [n for n in source.tensors if n.endswith("proj.weight") and source.tensors[n].shape[1] % 256 == 0]
    assert len(names) >= 20
    for type_name in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q5_0", "Q4_1", "Q5_1"):
        for name in names:
            importance, tokens = calib.importance(arch, name)
            if tokens == 0:
                continue
            w, imp = source.get(name).numpy(), importance.numpy()
            plain = decode(type_name, encode(type_name, w), w.shape[1])
            weighted = decode(type_name, encode(type_name, w, imp), w.shape[1])
            assert ((weighted - w) ** 2 * imp).sum() < ((plain - w) ** 2 * imp).sum(), (type_name, name)


def test_shared_expert_and_dense_ffn_types_are_recipe_rules(wide_model: Path) -> None:
    """--shared-experts-type/--dense-ffn-type override the preset exactly (up or down, F16 too); the rest keeps it."""
    checkpoint = Checkpoint.open(wide_model)
    recipe = (get_preset("Q4_K_M").with_kquant_type(Role.SHARED_EXPERT, "Q8_0", "--shared-experts-type")
              .with_kquant_type(Role.DENSE_MLP, "Q5_K", "--dense-ffn-type"))
    plan = make_plan(checkpoint, recipe)
    preset_only = {t.name: t.scheme for t in make_plan(checkpoint, get_preset("Q4_K_M")).tensors}
    schemes = {t.name: t.scheme for t in plan.tensors}
    for proj in ("gate", "up", "down"):
        assert schemes[f"model.layers.1.mlp.shared_experts.{proj}_proj.weight"].ggml_type == "Q8_0"
        assert schemes[f"model.layers.0.mlp.{proj}_proj.weight"].ggml_type == "Q5_K"
    assert plan.type_rules["model.layers.1.mlp.shared_experts.up_proj.weight"] == "rule role:shared_expert"
    assert plan.type_rules["model.layers.0.mlp.down_proj.weight"] == "rule role:dense_mlp"
    for name, scheme in schemes.items():
        if ".shared_experts." not in name and not name.startswith("model.layers.0.mlp."):
            assert scheme == preset_only[name], name
    low = make_plan(checkpoint, get_preset("Q6_K").with_kquant_type(Role.SHARED_EXPERT, "Q2_K", "--shared-experts-type")
                    .with_kquant_type(Role.DENSE_MLP, "F16", "--dense-ffn-type"))
    lowered = {t.name: t.scheme for t in low.tensors}
    assert lowered["model.layers.1.mlp.shared_experts.down_proj.weight"].ggml_type == "Q2_K"
    assert lowered["model.layers.0.mlp.down_proj.weight"].method == "fp16"  # F16 never falls back


def test_preset_keeps_an_lm_head_that_a_tied_config_does_not_use(wide_model: Path, tmp_path: Path) -> None:
    """config.json says tied, yet lm_head.weight is stored: the preset keeps it as stored, as any unknown tensor."""
    model = Path(shutil.copytree(wide_model, tmp_path / "tied"))
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    code, _, err = run("quantize", model, "--preset", "Q4_K_M", "--out", tmp_path / "q")
    assert code == 0, err
    weights, checkpoint = stored(tmp_path / "q")
    # tied: llama.cpp gives token_embd the output's type, as it doubles as the output
    assert "lm_head" not in weights["weights"] and weights["weights"]["model.embed_tokens"]["type"] == "Q6_K"
    assert torch.equal(checkpoint.get("lm_head.weight"), Checkpoint.open(wide_model).get("lm_head.weight"))


def test_llama_quantize_overrides_on_a_tied_qwen2_moe_gguf(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """qwen2moe's GGUF holds an output.weight for tied embeddings: llama.cpp types it as an untied output."""
    model = tmp_path / "tied"
    shutil.copytree(tiny_models["qwen2_moe"], model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    plain, custom = tmp_path / "plain.gguf", tmp_path / "custom.gguf"
    code, _, err = run("quantize", model, "--preset", "Q4_K_M", "--format", "gguf", "--out", plain)
    assert code == 0, err
    # rows of 64: the output rule gives Q8_0 (256 does not divide them); token_embd, untied for llama.cpp,
    # keeps the base Q4_K and falls back to Q5_0
    got = {t.name: t.tensor_type.name for t in gguf.GGUFReader(plain).tensors}
    assert got["output.weight"] == "Q8_0" and got["token_embd.weight"] == "Q5_0"
    code, _, err = run("quantize", model, "--preset", "Q4_K_M", "--tensor-type", r"blk\.1\.attn_q=q8_0",
                       "--tensor-type", "ATTN_=F16", "--output-tensor-type", "q8_0", "--token-embedding-type", "F32",
                       "--format", "gguf", "--out", custom)
    assert code == 0, err
    got = {t.name: t.tensor_type.name for t in gguf.GGUFReader(custom).tensors}
    assert got["blk.1.attn_q.weight"] == "Q8_0" and got["blk.0.attn_q.weight"] == "F16"  # the first match wins
    assert got["blk.0.attn_output.weight"] == "F16" and got["blk.0.ffn_gate_exps.weight"] == "Q5_0"
    assert got["output.weight"] == "Q8_0" and got["token_embd.weight"] == "F32"
    report = {t["name"]: t for t in json.loads((tmp_path / "custom.quantkit_report.json").read_text())["tensors"]}
    assert report["output.weight"]["type_rule"] == "--output-tensor-type"
    assert report["blk.1.attn_q.weight"]["type_rule"] == r"--tensor-type blk\.1\.attn_q=Q8_0"


def test_overrides_apply_to_the_whole_preset() -> None:
    with pytest.raises(QuantkitError, match="output_tensor_type override the whole preset; set them in default"):
        get_preset("Q4_K_M").with_rule(["role:routed_expert"], output_tensor_type="Q8_0")


def test_n_gqa_comes_from_the_gguf_head_count_kv(tmp_path: Path) -> None:
    """DeepSeek's GGUF writes head_count_kv = head_count (MLA): llama.cpp's n_gqa is 1 whatever the config says."""
    transformers.logging.set_verbosity_error()
    config = transformers.AutoConfig.for_model("deepseek_v2", **{**WIDE, "num_hidden_layers": 1, "kv_lora_rank": 256,
                                                                  "num_key_value_heads": 1})
    model = save_model(transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32), tmp_path / "m")
    schemes = {t.name: t.scheme for t in make_plan(Checkpoint.open(model), get_preset("Q2_K")).tensors}
    # Q2_K's attn_kv_b (rows of 256): Q3_K with n_gqa < 4, Q4_K had the config's 4 query heads per KV head counted
    assert schemes["model.layers.0.self_attn.kv_b_proj.weight"].ggml_type == "Q3_K"  # type: ignore[union-attr]
