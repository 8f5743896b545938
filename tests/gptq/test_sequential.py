"""GPTQ over a whole model: sequential propagation, per-expert Hessians, starved experts, output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from quantkit.api import CalibrationSettings, QuantizeOptions, quantize
from quantkit.formats.load import load_quantized
from quantkit.gptq.sequential import gptq_layers
from quantkit.model.checkpoint import Checkpoint
from quantkit.model.experts import install_eager_experts, is_fused_experts
from quantkit.pipeline import LayerPipeline
from quantkit.plan import make_plan
from quantkit.recipe import get_preset
from quantkit.schemes import SCHEMES, make_config
from tests.conftest import build_model, copy_tokenizer, save_model, starved_deepseek

GPTQ4 = {"method": "gptq", "bits": 4, "group_size": 16}


def test_gptq_without_a_hessian_is_round_to_nearest() -> None:
    weight = torch.randn(24, 64, generator=torch.Generator().manual_seed(0))
    gptq = SCHEMES.get("gptq").quantize(weight, make_config("gptq", bits=4).with_updates(group_size=16))
    rtn = SCHEMES.get("zeropoint").quantize(weight, make_config("zeropoint", bits=4).with_updates(group_size=16))
    assert torch.equal(gptq.codes, rtn.codes) and torch.equal(gptq.scale, rtn.scale)


@pytest.mark.parametrize("arch", ["llama", "deepseek_v3", "qwen2_moe"])
def test_each_layer_sees_the_quantized_outputs_of_the_previous_one(tiny_models: dict[str, Path], arch: str) -> None:
    """The pipeline's final hidden states equal a forward pass of the model with all of GPTQ's weights."""
    checkpoint = Checkpoint.open(tiny_models[arch])
    plan = make_plan(checkpoint, get_preset("int8").with_default(**GPTQ4))
    schemes = {t.name: t.scheme for t in plan.tensors if t.scheme is not None}
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    pipeline = LayerPipeline(checkpoint)
    states = pipeline.capture(ids, batch_size=2)
    quantized = {w.name: w.quantized.dequantize().float() for layer in gptq_layers(pipeline, states, schemes)
                 for w in layer.weights}
    assert set(quantized) == set(schemes)
    final = torch.cat(pipeline.final_norm(states))

    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).eval()
    state = {k: v for k, v in model.state_dict().items()}
    disk = {name: checkpoint.get(name) for name in checkpoint.tensors}
    disk.update(quantized)
    state.update(plan.arch.to_memory_state(disk))
    model.load_state_dict(state)
    for module in model.modules():
        if is_fused_experts(module):
            install_eager_experts(module, None)
    with torch.no_grad():
        expected = torch.cat([model.model(batch).last_hidden_state for batch in ids.split(2)])
    torch.testing.assert_close(final, expected, rtol=0, atol=1e-5)


def test_starved_experts_fall_back_and_are_reported(tiny_lm: Path, test_text: Path, tmp_path: Path) -> None:
    path, starved = starved_deepseek(tiny_lm, tmp_path)
    data = CalibrationSettings(dataset=str(test_text), num_samples=8, seq_len=32, min_expert_tokens=16)
    report = quantize(path, get_preset("int8").with_default(**GPTQ4), tmp_path / "q",
                      options=QuantizeOptions(data=data, show_progress=False))
    records = {t.name: t for t in report.tensors}
    for proj in ("gate_proj", "up_proj", "down_proj"):
        info = records[f"model.layers.1.mlp.experts.{starved}.{proj}.weight"].gptq
        assert info is not None and info["tokens"] == 0 and "blended" in info["fallback"]
    fed = records["model.layers.1.mlp.experts.0.gate_proj.weight"].gptq
    assert fed is not None and fed["tokens"] > 0 and fed["fallback"] is None
    assert [layer["layer"] for layer in report.gptq_layers] == [0, 1]
    saved = json.loads((tmp_path / "q" / "quantkit_report.json").read_text())
    assert saved["gptq"]["samples"] == 8 and saved["gptq"]["seq_len"] == 32
    model = load_quantized(tmp_path / "q")
    with torch.no_grad():
        logits = model(torch.randint(0, 120, (1, 8))).logits
    assert torch.isfinite(logits).all()


def test_all_experts_gives_every_expert_every_token(tiny_lm: Path, test_text: Path, tmp_path: Path) -> None:
    path, starved = starved_deepseek(tiny_lm, tmp_path)
    data = CalibrationSettings(dataset=str(test_text), num_samples=8, seq_len=32, all_experts=True)
    report = quantize(path, get_preset("int8").with_default(**GPTQ4), tmp_path / "q",
                      options=QuantizeOptions(data=data, show_progress=False))
    info = {t.name: t.gptq for t in report.tensors if t.gptq is not None}
    assert info[f"model.layers.1.mlp.experts.{starved}.gate_proj.weight"]["tokens"] == 8 * 32
    assert all(v["fallback"] is None for v in info.values())


@pytest.mark.parametrize("act_order", [False, True])
def test_both_formats_reload_to_the_same_weights(tiny_lm: Path, test_text: Path, tmp_path: Path,
                                                 act_order: bool) -> None:
    """compressed-tensors and GPTQ v1 outputs of one fp16 model dequantize identically in quantkit's loader."""
    model = build_model("qwen2_moe", seed=4).half()
    path = copy_tokenizer(tiny_lm, save_model(model, tmp_path / "fp16"))
    data = CalibrationSettings(dataset=str(test_text), num_samples=4, seq_len=32)
    recipe = get_preset("int8").with_default(**GPTQ4, act_order=act_order)
    for fmt in ("compressed-tensors", "gptq-v1"):
        quantize(path, recipe, tmp_path / fmt,
                 options=QuantizeOptions(data=data, output_format=fmt, show_progress=False))
    assert (tmp_path / "gptq-v1" / "quantize_config.json").is_file()
    config = json.loads((tmp_path / "gptq-v1" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "gptq" and config["desc_act"] == act_order and config["bits"] == 4
    a = load_quantized(tmp_path / "compressed-tensors").state_dict()
    b = load_quantized(tmp_path / "gptq-v1").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(a[q_proj], model.state_dict()[q_proj])


def test_gptq_v1_refuses_other_methods(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from quantkit.errors import QuantkitError

    with pytest.raises(QuantkitError, match="GPTQ weights only"):
        quantize(tiny_models["llama"], get_preset("int4-g128").with_default(group_size=16), tmp_path / "q",
                 options=QuantizeOptions(output_format="gptq-v1", show_progress=False))
    assert not (tmp_path / "q").exists()


def test_memory_budget_solves_experts_in_chunks_with_identical_results(tiny_lm: Path, test_text: Path,
                                                                       tmp_path: Path) -> None:
    from quantkit.gptq.budget import experts_per_chunk

    assert experts_per_chunk(64, 32, None) > 64 and experts_per_chunk(64, 32, 1) == 1
    assert experts_per_chunk(64, 32, 3 * (16 * 32 * 32 + 16 * 64 * 32)) == 3
    path = copy_tokenizer(tiny_lm, save_model(build_model("qwen2_moe", seed=5), tmp_path / "m"))
    data = CalibrationSettings(dataset=str(test_text), num_samples=4, seq_len=32, all_experts=True)
    recipe = get_preset("int8").with_default(**GPTQ4)
    whole = quantize(path, recipe, tmp_path / "whole", options=QuantizeOptions(data=data, show_progress=False))
    chunked = quantize(path, recipe, tmp_path / "chunked",
                       options=QuantizeOptions(data=data, max_memory=1, show_progress=False))
    assert [t.gptq for t in whole.tensors] == [t.gptq for t in chunked.tensors]
    a, b = load_quantized(tmp_path / "whole").state_dict(), load_quantized(tmp_path / "chunked").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    experts = build_model("qwen2_moe", seed=5).config.num_experts
    for layer in chunked.gptq_layers:  # the report says how the experts were split
        assert layer["experts_per_chunk"] and set(layer["experts_per_chunk"].values()) == {1}
    for layer in whole.gptq_layers:
        assert set(layer["experts_per_chunk"].values()) == {experts}


def test_starved_experts_do_not_depend_on_the_chunking(tiny_lm: Path, test_text: Path, tmp_path: Path) -> None:
    """A starved expert leans on the mean Hessian of *all* the layer's experts, however ``max_memory`` splits
    them, so a budget chosen from the machine's memory cannot change the output."""
    path, starved = starved_deepseek(tiny_lm, tmp_path)
    data = CalibrationSettings(dataset=str(test_text), num_samples=4, seq_len=32, min_expert_tokens=40)
    recipe = get_preset("int8").with_default(**GPTQ4)
    whole = quantize(path, recipe, tmp_path / "whole", options=QuantizeOptions(data=data, show_progress=False))
    chunked = quantize(path, recipe, tmp_path / "chunked",
                       options=QuantizeOptions(data=data, max_memory=1, show_progress=False))
    fallbacks = [t.name for t in whole.tensors if t.gptq and t.gptq["fallback"]]
    assert f"model.layers.1.mlp.experts.{starved}.down_proj.weight" in fallbacks and len(fallbacks) > 3
    assert [t.gptq for t in whole.tensors] == [t.gptq for t in chunked.tensors]
    a, b = load_quantized(tmp_path / "whole").state_dict(), load_quantized(tmp_path / "chunked").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("extra", "message"), [
    (["--format", "gguf9"], "--format must be auto or one of compressed-tensors, ggml, gguf, gptq-v1"),
    (["--max-memory", "lots"], "invalid size"),
    (["--damp", "2"], "damp must be in (0, 1)"),
    (["--block-size", "0"], "block size must be positive"),
])
def test_gptq_cli_errors(tiny_lm: Path, test_text: Path, tmp_path: Path, extra: list[str], message: str) -> None:
    from typer.testing import CliRunner

    from quantkit.cli import app

    result = CliRunner().invoke(app, ["quantize", str(tiny_lm), "--method", "gptq", "--bits", "4", "--dataset",
                                      str(test_text), "--seq-len", "32", "--num-samples", "2", *extra,
                                      "--out", str(tmp_path / "q")])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "q").exists()


def test_gptq_cli_end_to_end(tiny_lm: Path, test_text: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from quantkit.cli import app

    result = CliRunner().invoke(app, ["quantize", str(tiny_lm), "--method", "gptq", "--bits", "4", "--group-size",
                                      "16", "--act-order", "--dataset", str(test_text), "--seq-len", "32",
                                      "--num-samples", "4", "--all-experts", "--format", "gptq-v1", "--json",
                                      "--out", str(tmp_path / "q")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "q" / "quantkit_report.json").read_text())
    assert report["gptq"]["all_experts"] and len(report["gptq_layers"]) == 2
    assert all(t["gptq"]["tokens"] == 4 * 32 for t in report["tensors"] if t["gptq"] and ".experts." in t["name"])
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["desc_act"]


@pytest.mark.parametrize("data", [[], ["--num-samples", "4", "--seq-len", "32"]])
def test_seed_draws_the_gptq_windows_and_is_recorded(tiny_lm: Path, test_text: Path, tmp_path: Path,
                                                     data: list[str]) -> None:
    """--seed reaches the windows GPTQ samples (the bundled text, or --dataset's); the same seed, the same bytes."""
    from typer.testing import CliRunner

    from quantkit.cli import app

    def run(seed: int, out: str) -> tuple[bytes, dict]:
        dataset = ["--dataset", str(test_text)] if data else []
        result = CliRunner().invoke(app, ["quantize", str(tiny_lm), "--method", "gptq", "--bits", "4", *dataset,
                                          *data, "--seed", str(seed), "--out", str(tmp_path / out)])
        assert result.exit_code == 0, result.output
        report = json.loads((tmp_path / out / "quantkit_report.json").read_text())
        return (tmp_path / out / "model.safetensors").read_bytes(), report

    first, report = run(1, "a")
    again, _ = run(1, "b")
    other, _ = run(2, "c")
    assert report["seed"] == report["gptq"]["seed"] == 1
    assert first == again and first != other


def test_gptq_reads_experts_stored_fused_exactly_as_per_expert(fused_on_disk: Path, tiny_lm: Path, test_text: Path,
                                                                tmp_path: Path) -> None:
    """The same qwen3_moe weights saved per expert and fused (transformers' in-memory layout) give the same bytes."""
    per_expert = copy_tokenizer(tiny_lm, save_model(build_model("qwen3_moe", seed=1), tmp_path / "per_expert"))
    fused = copy_tokenizer(tiny_lm, Path(shutil.copytree(fused_on_disk, tmp_path / "fused")))
    data = CalibrationSettings(dataset=str(test_text), num_samples=4, seq_len=16)
    recipe = get_preset("int8").with_default(method="gptq", bits=4, group_size=16)
    for source in (per_expert, fused):
        quantize(source, recipe, tmp_path / f"q-{source.name}", options=QuantizeOptions(data=data, show_progress=False))
    written = [(tmp_path / f"q-{name}" / "model.safetensors").read_bytes() for name in ("per_expert", "fused")]
    assert written[0] == written[1]
