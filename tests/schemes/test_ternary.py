"""``--method ternary``: BitNet b1.58's absmean codes, the least-squares scale, lossless on ternary weights.

The end-to-end case is a BitNet-shaped tiny Llama whose linear weights are exactly ``{-1, 0, +1} x s``: it
comes back bit for bit from the compressed-tensors checkpoint, with no quality warning; an ordinary model
gets the warning in the report and on the command line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from quantkit.cli import app
from quantkit.errors import QuantkitError
from quantkit.formats.load import dequantized_state
from quantkit.model.checkpoint import Checkpoint
from quantkit.recipe import get_preset
from quantkit.schemes import SCHEMES, TernaryConfig, make_config
from quantkit.schemes.ternary import post_training_warning

runner = CliRunner()


def quantize(weight: torch.Tensor, **settings: object) -> tuple[torch.Tensor, torch.Tensor]:
    config = make_config("ternary", **settings)
    config.validate()
    quantized = SCHEMES.get("ternary").quantize(weight, config)
    return quantized.codes, quantized.dequantize()


def test_codes_are_bitnet_absmean_and_the_scale_is_least_squares() -> None:
    """codes = clamp(round(W / mean|W|), -1, 1) per group; scale = <W, c> / <c, c>, no worse than mean|W|."""
    weight = torch.randn(16, 96, generator=torch.Generator().manual_seed(0)) * 0.02
    for settings, groups in (({}, weight.reshape(1, 1, -1)), ({"granularity": "channel"}, weight.reshape(16, 1, 96)),
                             ({"group_size": 32}, weight.reshape(16, 3, 32))):
        codes, values = quantize(weight, **settings)
        gamma = groups.abs().mean(dim=-1, keepdim=True)
        expected_codes = torch.clamp(torch.round(groups / gamma), -1, 1)
        assert torch.equal(codes.reshape(groups.shape).to(torch.float32), expected_codes), settings
        least_squares = (groups * expected_codes).sum(-1, keepdim=True) / (expected_codes ** 2).sum(-1, keepdim=True)
        torch.testing.assert_close(values.reshape(groups.shape), expected_codes * least_squares, rtol=1e-6, atol=0)
        assert (weight - values).norm() <= (groups - expected_codes * gamma).norm(), settings


@pytest.mark.parametrize("settings", [{}, {"granularity": "channel"}, {"group_size": 64}, {"group_size": 40}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ternary_weights_come_back_exactly(settings: dict[str, object], dtype: torch.dtype) -> None:
    """A weight already {-1, 0, +1} x s (one s per scale's group, any float) is stored exactly, partial groups too."""
    generator = torch.Generator().manual_seed(1)
    trits = torch.randint(-1, 2, (8, 160), generator=generator).to(torch.float32)
    scales = torch.rand(8, 1, generator=generator) * 0.1 + 1e-3  # one per row: per-row and per-group schemes
    weight = (trits * (scales if settings else scales[0, 0])).to(dtype)
    codes, values = quantize(weight, **settings)
    assert torch.equal(codes.to(torch.float32), trits)
    assert torch.equal(values, weight)


def test_all_zero_groups_store_zero_codes_and_scale_one() -> None:
    weight = torch.zeros(4, 64)
    weight[1, 32:] = torch.tensor([0.5, -0.5] * 16)
    quantized = SCHEMES.get("ternary").quantize(weight, make_config("ternary", group_size=32))
    assert quantized.scale[0].tolist() == [1.0, 1.0] and quantized.scale[1].tolist() == [1.0, 0.5]
    assert torch.equal(quantized.dequantize(), weight)


def test_settings() -> None:
    """From another method only activation settings carry over; ternary's grid settings are checked by name."""
    switched = get_preset("int8").default.with_updates(method="ternary", activations="dynamic")
    assert isinstance(switched, TernaryConfig)
    assert (switched.bits, switched.granularity, switched.activations) == (2, "tensor", "dynamic")
    assert switched.describe() == "ternary per-tensor absmean, A8 dynamic"
    assert make_config("ternary", group_size=128, ggml_type="TQ1_0").describe() == "ternary g128 absmean, GGUF TQ1_0"
    for settings, message in (({"bits": 4}, "bits must be 2"), ({"clip": "mse"}, "weight clip mse does not apply"),
                              ({"ggml_type": "Q4_K"}, "TQ1_0 or TQ2_0, not Q4_K")):
        with pytest.raises(QuantkitError, match=message):
            make_config("ternary", **settings).validate()
    with pytest.raises(QuantkitError, match="range does not apply to method ternary"):
        make_config("ternary", range="full")


def test_warning_only_for_weights_that_were_not_ternary() -> None:
    assert post_training_warning([("ternary per-tensor absmean", 0.0), ("absmax int4 per-channel", 0.2)]) is None
    note = post_training_warning([("ternary per-tensor absmean", 0.5), ("ternary g128 absmean", 1e-4)])
    assert note is not None and note.startswith("1 of 2 ternary weight(s) were not ternary before")
    assert "destroys the quality" in note and "perplexity" in note


def run(*args: str | Path) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_bitnet_model_round_trips_exactly(bitnet_model: Path, tmp_path: Path) -> None:
    """--method ternary on a model trained ternary is lossless: every weight reads back bit for bit."""
    code, out, err = run("quantize", bitnet_model, "--method", "ternary", "--out", tmp_path / "q")
    assert code == 0, err
    assert "destroys" not in out
    source, written = Checkpoint.open(bitnet_model), Checkpoint.open(tmp_path / "q")
    state = dequantized_state(written)
    linears = [name for name in source.tensors if name.endswith("proj.weight") or name == "lm_head.weight"]
    assert len(linears) == 2 * 7 + 1
    for name in source.tensors:
        assert torch.equal(state[name], source.get(name)), name
    groups = written.config["quantization_config"]["config_groups"]
    assert [g["weights"]["num_bits"] for g in groups.values()] == [2]
    assert [g["weights"]["strategy"] for g in groups.values()] == ["tensor"]
    report = json.loads((tmp_path / "q" / "quantkit_report.json").read_text())
    assert {t["rel_error"] for t in report["tensors"] if t["scheme"].startswith("ternary")} == {0.0}
    assert not any("ternar" in note for note in report["notes"])


def test_ordinary_model_is_warned(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    code, out, err = run("quantize", tiny_models["llama"], "--method", "ternary", "--out", tmp_path / "q")
    assert code == 0, err
    assert "post-training ternarization destroys the quality" in " ".join(out.split())
    report = json.loads((tmp_path / "q" / "quantkit_report.json").read_text())
    assert any("post-training ternarization destroys the quality" in note for note in report["notes"])
