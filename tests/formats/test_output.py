"""Output formats are plugins: a toy format registered here, without editing any quantkit module, is written
end to end by ``quantkit quantize --format``; the built-in formats refuse what they cannot hold."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from quantkit.cli import app
from quantkit.formats.output import OUTPUT_FORMATS, DirectoryFormat, WrittenWeights, refuse_kquants
from quantkit.plan import QuantPlan
from quantkit.schemes import SCHEMES, IntQuantized, Quantized, make_config


class NpySink:
    """One ``.npy`` file per tensor."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.total_bytes = 0
        self.names: list[str] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        array = tensor.to(torch.float32) if tensor.dtype == torch.bfloat16 else tensor
        np.save(self.directory / f"{name}.npy", array.numpy())
        self.total_bytes += tensor.numel() * tensor.element_size()
        self.names.append(name)

    def finish(self) -> list[str]:
        return [f"{name}.npy" for name in self.names]


class NpyToyFormat(DirectoryFormat):
    """Integer codes and scales as .npy files, listed in config.json."""

    name = "npy-toy"

    def check(self, plan: QuantPlan) -> None:
        refuse_kquants(plan, self.name)

    def encode(self, module: str, quantized: Quantized) -> dict[str, torch.Tensor]:
        assert isinstance(quantized, IntQuantized)
        return {f"{module}.codes": quantized.codes, f"{module}.scale": quantized.scale}

    def finish(self, directory: Path, config: dict[str, Any], written: WrittenWeights) -> None:
        config["quantization_config"] = {"quant_method": self.name, "modules": sorted(written.integer)}

    def open(self, directory: Path, max_shard_bytes: int) -> NpySink:
        return NpySink(directory)


OUTPUT_FORMATS.add(NpyToyFormat.name, NpyToyFormat())


def quantize(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["quantize", *map(str, args)])
    return result.exit_code, result.stderr


def test_a_registered_toy_format_is_written_end_to_end(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "npy"
    code, err = quantize(tiny_models["olmoe"], "--method", "absmax", "--bits", "8", "--format", "npy-toy",
                         "--out", out)
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "npy-toy" and "model.layers.1.mlp.experts.3.down_proj" in config["modules"]
    module = "model.layers.1.mlp.experts.3.down_proj"
    codes = torch.from_numpy(np.load(out / f"{module}.codes.npy"))
    scale = torch.from_numpy(np.load(out / f"{module}.scale.npy"))
    weight = load_file(str(tiny_models["olmoe"] / "model.safetensors"))[f"{module}.weight"]
    expected = SCHEMES.get("absmax").quantize(weight, make_config("absmax", bits=8))
    assert isinstance(expected, IntQuantized)
    assert torch.equal(codes, expected.codes) and torch.equal(scale, expected.scale)
    assert (out / "model.norm.weight.npy").is_file()  # float tensors go through the same sink
    report = json.loads((out / "quantkit_report.json").read_text())
    assert report["totals"]["quantized_tensors"] == len(config["modules"])


@pytest.mark.parametrize(("args", "message"), [
    (("--method", "absmax", "--bits", "4", "--format", "ggml"), "--format ggml holds k-quant weights"),
    (("--method", "kquant", "--type", "Q8_0", "--format", "npy-toy"), "not npy-toy"),
    (("--method", "absmax", "--bits", "4", "--format", "gptq-v1"), "--format gptq-v1 holds GPTQ weights only"),
    (("--method", "absmax", "--bits", "4", "--format", "nope"), "one of compressed-tensors, ggml, gguf, gptq-v1, npy"),
])
def test_formats_refuse_what_they_cannot_hold(tiny_models: dict[str, Path], tmp_path: Path, args: tuple[str, ...],
                                              message: str) -> None:
    code, err = quantize(tiny_models["olmoe"], *args, "--out", tmp_path / "o")
    assert code == 2 and message in err, err
    assert not (tmp_path / "o").exists()


def test_block_formats_refuse_integer_rules_beside_k_quants(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    recipe = tmp_path / "mixed.yaml"
    recipe.write_text('version: 1\ndefault: {method: kquant, ggml_type: Q8_0}\n'
                      'rules: [{match: "role:attention", method: absmax, bits: 8}]\n')
    code, err = quantize(tiny_models["olmoe"], "--recipe", recipe, "--out", tmp_path / "o")
    assert code == 2 and "--format ggml holds k-quant and float weights only" in err, err
