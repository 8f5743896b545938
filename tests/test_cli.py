"""The command line through Typer's runner: commands, overrides, and one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from quantkit.cli import app
from quantkit.cli_values import parse_size

runner = CliRunner()


def run(*args: str | Path) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def assert_one_line_error(code: int, stderr: str, *fragments: str) -> None:
    assert code == 2, stderr
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_presets_lists_every_preset() -> None:
    code, out, _ = run("presets", "--json")
    assert code == 0
    listed = json.loads(out)
    presets = listed["recipes"]
    assert {"int8", "int4-g128", "int4-g128-moe", "fp16", "bf16"} <= set(presets)
    assert presets["int4-g128-moe"]["rules"][0]["match"][0] == "role:shared_expert"
    kquant = {"Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"}
    assert kquant <= set(listed["kquant"])


def test_inspect_reports_architecture_and_plan(tiny_models: dict[str, Path]) -> None:
    code, out, _ = run("inspect", tiny_models["deepseek_v3"], "--preset", "int4-g128-moe", "-g", "16", "--json")
    assert code == 0
    info = json.loads(out)
    arch = info["architecture"]
    assert (arch["routed_experts_per_layer"], arch["n_shared_experts"], arch["n_group"]) == (8, 1, 2)
    assert arch["dense_layers"] == [0]
    assert info["experts"]["complete"] is True
    assert info["plan"]["routed_expert / zeropoint int4 g16"]["tensors"] == 24
    assert info["plan"]["shared_expert / absmax int8 per-channel, restricted"]["tensors"] == 3
    assert info["params"]["total"] == sum(v for k, v in info["params"].items() if k != "total")


def test_quantize_with_shared_expert_override(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "q"
    code, stdout, stderr = run("quantize", tiny_models["qwen2_moe"], "--method", "zeropoint", "--bits", "4",
                               "--group-size", "16", "--shared-experts-bits", "8", "--out", out, "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    bits = {t["name"]: t["bits"] for t in report["tensors"]}
    assert bits["model.layers.0.mlp.shared_expert.up_proj.weight"] == 8
    assert bits["model.layers.0.mlp.experts.3.up_proj.weight"] == 4
    assert bits["model.layers.0.mlp.gate.weight"] is None and bits["lm_head.weight"] is None
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and len(config["config_groups"]) == 2


def test_quantize_with_recipe_file(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "version: 1\n"
        "default: {method: absmax, bits: 4, group_size: 32}\n"
        "rules:\n"
        "  - match: 're:model\\.layers\\.0\\..*'\n"
        "    method: float\n"
        "  - match: ['*.self_attn.*']\n"
        "    bits: 8\n"
        "    granularity: channel\n"
        "ignore: ['role:lm_head']\n"
    )
    out = tmp_path / "q"
    code, stdout, stderr = run("quantize", tiny_models["mixtral"], "--recipe", recipe, "--out", out, "--json")
    assert code == 0, stderr
    by_name = {t["name"]: t for t in json.loads(stdout)["tensors"]}
    assert by_name["model.layers.0.self_attn.q_proj.weight"]["scheme"] == "float"
    assert by_name["model.layers.1.self_attn.q_proj.weight"]["scheme"] == "absmax int8 per-channel, restricted"
    assert by_name["model.layers.1.block_sparse_moe.experts.2.w1.weight"]["scheme"] == "absmax int4 g32, restricted"


def test_fp16_cast_method(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "q"
    code, _, stderr = run("quantize", tiny_models["llama"], "--method", "fp16", "--out", out)
    assert code == 0, stderr
    weights = load_file(str(out / "model.safetensors"))
    assert weights["model.layers.0.mlp.up_proj.weight"].dtype == torch.float16
    assert weights["model.norm.weight"].dtype == torch.float32
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_tokenizer_and_other_files_are_copied(stories_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    code, stdout, stderr = run("quantize", stories_model, "--method", "absmax", "--bits", "8", "--out", out)
    assert code == 0, stderr
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (stories_model / name).read_bytes()
    assert "bits/weight" in stdout


def test_default_output_name(tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, stderr = run("quantize", tiny_models["olmoe"], "--method", "absmax", "--bits", "8")
    assert code == 0, stderr
    assert (tmp_path / "olmoe-absmax-int8-per-channel-restricted" / "config.json").is_file()


# --- errors: one line, exit code 2, nothing written -------------------------------------------------


def test_missing_directory(tmp_path: Path) -> None:
    code, _, err = run("quantize", tmp_path / "nope", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "model directory not found", "nope")
    assert not (tmp_path / "o").exists()


def test_unsupported_model_type(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model = copy_model(tiny_models["llama"], tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    code, _, err = run("inspect", model)
    assert_one_line_error(code, err, "unsupported model_type 'gpt2'", "qwen2_moe")


def test_missing_shard(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model = tmp_path / "m"
    out = tmp_path / "sharded_src"
    code, _, err = run("quantize", tiny_models["qwen3_moe"], "--method", "fp16", "--max-shard-size", "50KB",
                       "--out", out)
    assert code == 0, err
    shutil.copytree(out, model)
    (model / "config.json").write_text(
        json.dumps({k: v for k, v in json.loads((out / "config.json").read_text()).items()})
    )
    victim = sorted(model.glob("model-*.safetensors"))[1]
    victim.unlink()
    code, _, err = run("quantize", model, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "missing shard", victim.name)
    assert not (tmp_path / "o").exists()


def test_corrupt_shard(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model = copy_model(tiny_models["llama"], tmp_path / "m")
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, _, err = run("quantize", model, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "corrupt shard model.safetensors")
    assert not (tmp_path / "o").exists()


def test_shape_mismatch_with_config(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model = copy_model(tiny_models["qwen2_moe"], tmp_path / "m")
    weights = load_file(str(model / "model.safetensors"))
    weights["model.layers.1.mlp.experts.2.up_proj.weight"] = torch.zeros(16, 64)
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = run("quantize", model, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "shape mismatch for model.layers.1.mlp.experts.2.up_proj.weight", "[16, 64]")


def test_missing_expert_tensor(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model = copy_model(tiny_models["deepseek_v3"], tmp_path / "m")
    weights = load_file(str(model / "model.safetensors"))
    del weights["model.layers.1.mlp.experts.5.down_proj.weight"]
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = run("inspect", model)
    assert_one_line_error(code, err, "model.layers.1.mlp.experts.5.down_proj.weight is missing")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weights(bad: float, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model = copy_model(tiny_models["olmoe"], tmp_path / "m")
    weights = load_file(str(model / "model.safetensors"))
    weights["model.layers.1.self_attn.o_proj.weight"][3, 5] = bad
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = run("quantize", model, "--out", tmp_path / "o")
    value = "NaN" if bad != bad else "Inf"
    assert_one_line_error(
        code, err, f"model.layers.1.self_attn.o_proj.weight in model.safetensors contains {value} values"
    )
    assert list(tmp_path.iterdir()) == [model]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("version: 2\ndefault: {method: absmax}\n", "recipe version must be 1"),
        ("version: 1\ndefault: {method: magic}\n", "unknown method 'magic'"),
        ("version: 1\ndefault: {method: absmax, bits: 12}\n", "bits must be between 2 and 8"),
        ("version: 1\ndefault: {method: absmax}\nrules: [{match: 're:(', bits: 4}]\n", "bad regex"),
        ("version: 1\ndefault: {method: absmax}\nrules: [{match: 'role:expert'}]\n", "unknown role 'expert'"),
        ("version: 1\ndefault: {method: absmax, colour: red}\n", "unknown field(s) in 'default': colour"),
        ("version: 1\ndefault: [absmax\n", "invalid recipe"),
    ],
)
def test_invalid_recipe(text: str, fragment: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    code, _, err = run("quantize", tiny_models["llama"], "--recipe", recipe, "--out", tmp_path / "o")
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "o").exists()


def test_group_size_that_does_not_divide_a_row(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """The last group of a row is shorter (issue 15): 128 columns in groups of 48 are 48 + 48 + 32."""
    code, _, err = run("quantize", tiny_models["deepseek_v3"], "--method", "zeropoint", "--bits", "4",
                       "--group-size", "48", "--out", tmp_path / "o")
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "quantkit_report.json").read_text())
    (down,) = [t for t in report["tensors"] if t["name"] == "model.layers.0.mlp.down_proj.weight"]
    assert down["partial_group"] == 128 % 48


def test_existing_output_needs_overwrite(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert run("quantize", tiny_models["llama"], "--out", out)[0] == 0
    code, _, err = run("quantize", tiny_models["llama"], "--out", out)
    assert_one_line_error(code, err, "already exists", "--overwrite")
    code, _, err = run("quantize", tiny_models["llama"], "--out", out, "--overwrite", "--bits", "4")
    assert code == 0, err
    assert json.loads((out / "quantkit_report.json").read_text())["recipe"]["default"]["bits"] == 4


def test_already_quantized_input(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert run("quantize", tiny_models["llama"], "--out", out)[0] == 0
    code, _, err = run("quantize", out, "--out", tmp_path / "o2")
    assert_one_line_error(code, err, "already quantized")


def test_offline_hub_id_fails_clearly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    code, _, err = run("inspect", "nobody-here/no-such-model")
    assert_one_line_error(code, err, "nobody-here/no-such-model", "local")


@pytest.mark.parametrize(("text", "size"), [("2GB", 2 * 10**9), ("500MB", 5 * 10**8), ("1GiB", 2**30), ("123", 123)])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size
