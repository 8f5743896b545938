"""INT8 input activations (W8A8): fake quantization, config, quantkit's loader, a real client."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from quantkit.api import QuantizeOptions, quantize
from quantkit.calib.run import CalibrationSettings, calibrate
from quantkit.formats import compressed_tensors
from quantkit.formats.load import load_quantized
from quantkit.model.experts import is_fused_experts
from quantkit.recipe import get_preset
from quantkit.schemes.activations import fake_quantize_dynamic, fake_quantize_static, static_input_scale
from tests.conftest import copy_tokenizer

ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors is the reference for W8A8")


def _reference(x: torch.Tensor, scale: torch.Tensor, strategy: str) -> torch.Tensor:
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    args = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy=strategy, dynamic=strategy == "token")
    return fake_quantize(x, scale, torch.zeros_like(scale, dtype=torch.int8), args)


def test_static_fake_quantization_equals_compressed_tensors() -> None:
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(0)) * 3
    scale = static_input_scale(float(x.abs().max()) * 0.7, torch.float32)  # clipping range below the max
    assert torch.equal(fake_quantize_static(x, scale), _reference(x, scale, "tensor"))
    assert torch.equal(static_input_scale(0.0, torch.float32), torch.ones(1))


def test_dynamic_fake_quantization_equals_compressed_tensors() -> None:
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils import calculate_qparams

    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(1))
    x[3] *= 50  # one loud token must not coarsen the others' grid
    args = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    scale, _ = calculate_qparams(x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True), args)
    assert torch.equal(fake_quantize_dynamic(x), _reference(x, scale, "token"))
    per_token_error = (fake_quantize_dynamic(x) - x).abs().amax(dim=1)
    assert per_token_error[0] < per_token_error[3] / 10


@pytest.fixture(scope="module")
def w8a8(tiny_models: dict[str, Path], tiny_lm: Path, test_text: Path,
         tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """(arch, static|dynamic) -> W8A8 output, calibrated on the test text."""
    root = tmp_path_factory.mktemp("w8a8")
    outputs = {}
    for arch in ("llama", "qwen2_moe"):
        model = root / arch
        shutil.copytree(tiny_models[arch], model)
        copy_tokenizer(tiny_lm, model)
        settings = CalibrationSettings(dataset=str(test_text), num_samples=8, seq_len=32)
        calibrate(model, root / f"{arch}-calib", settings, show_progress=False)
        for mode in ("static", "dynamic"):
            recipe = get_preset("int8").with_default(activations=mode, activation_range="kl")
            outputs[(arch, mode)] = root / f"{arch}-{mode}"
            quantize(model, recipe, outputs[(arch, mode)],
                     options=QuantizeOptions(calibration=root / f"{arch}-calib", show_progress=False))
    return outputs


def test_config_declares_input_activations(w8a8: dict[tuple[str, str], Path]) -> None:
    from safetensors import safe_open

    for mode in ("static", "dynamic"):
        out = w8a8[("qwen2_moe", mode)]
        groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
        (inputs,) = {json.dumps(g["input_activations"], sort_keys=True) for g in groups.values()}
        args = json.loads(inputs)
        assert args["num_bits"] == 8 and args["symmetric"] and args["dynamic"] == (mode == "dynamic")
        assert args["strategy"] == ("tensor" if mode == "static" else "token")
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            names = list(f.keys())
        scales = [k for k in names if k.endswith(".input_scale")]
        modules = compressed_tensors.quantized_modules(names)
        assert modules and all(f"{m}.weight" in names for m in modules)  # int-quantized: int8 weights unpacked
        assert len(scales) == (len(modules) if mode == "static" else 0)


def test_loader_simulates_activation_quantization(w8a8: dict[tuple[str, str], Path], tmp_path: Path) -> None:
    """Static and dynamic W8A8 differ from W8A16 (same bytes, activations off) by a small, bounded amount."""
    ids = torch.randint(0, 120, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = {}
    for mode in ("static", "dynamic"):
        model = load_quantized(w8a8[("qwen2_moe", mode)])
        assert any(is_fused_experts(m) and "forward" in m.__dict__ for m in model.modules())
        with torch.no_grad():
            logits[mode] = model(ids).logits
    weight_only = tmp_path / "w8a16"
    config = json.loads((w8a8[("qwen2_moe", "static")] / "config.json").read_text())
    shutil.copytree(w8a8[("qwen2_moe", "static")], weight_only)
    for group in config["quantization_config"]["config_groups"].values():
        group["input_activations"] = None
    (weight_only / "config.json").write_text(json.dumps(config))
    with torch.no_grad():
        w8a16 = load_quantized(weight_only)(ids).logits
    assert not torch.equal(logits["static"], w8a16) and not torch.equal(logits["dynamic"], w8a16)
    assert not torch.equal(logits["static"], logits["dynamic"])
    for mode in ("static", "dynamic"):  # 8-bit inputs: a small, bounded change
        assert float((logits[mode] - w8a16).norm() / w8a16.norm()) < 0.05


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_plain_transformers_runs_dense_w8a8_exactly_like_quantkit(w8a8: dict[tuple[str, str], Path],
                                                                  mode: str) -> None:
    import transformers

    out = w8a8[("llama", mode)]
    ids = torch.randint(0, 120, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        client = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        assert torch.equal(client(ids).logits, load_quantized(out)(ids).logits)
