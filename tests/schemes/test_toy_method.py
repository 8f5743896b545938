"""Methods are plugins: a toy method registered here, without editing any quantkit module, is planned, written,
reported and read back end to end by ``quantkit quantize --method`` and by recipes (docs/architecture.md)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from quantkit.cli import app
from quantkit.errors import QuantkitError
from quantkit.model.checkpoint import DEMO_MODEL_DIR, Checkpoint
from quantkit.schemes import SCHEMES, CastTensor, Scheme, SchemeConfig, make_config


@dataclass(frozen=True)
class PowerOfTwoConfig(SchemeConfig):
    """Every weight rounded to a signed power of two, stored as float16 (no settings)."""

    def describe(self) -> str:
        return "pow2 (signed powers of two, fp16)"

    def check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if len(shape) != 2:
            raise QuantkitError(f"{name}: pow2 rounds 2-D weights, got shape {list(shape)}")

    def bits_per_weight(self, shape: tuple[int, ...], scale_bits: int) -> float:
        return 16.0


def power_of_two(weight: torch.Tensor) -> torch.Tensor:
    """``sign(w) * 2^round(log2 |w|)`` in float16; zeros stay zero."""
    w = weight.to(torch.float32)
    rounded = torch.sign(w) * torch.exp2(torch.round(torch.log2(w.abs())))
    return torch.where(w == 0, torch.zeros_like(w), rounded).to(torch.float16)


class PowerOfTwoScheme(Scheme[PowerOfTwoConfig]):
    config_type = PowerOfTwoConfig

    def quantize(self, weight: torch.Tensor, config: PowerOfTwoConfig,
                 importance: torch.Tensor | None = None) -> CastTensor:
        return CastTensor(power_of_two(weight), config)


@pytest.fixture
def toy_method(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``pow2`` registered for one test (other tests list the registry)."""
    monkeypatch.setitem(SCHEMES._items, "pow2", PowerOfTwoScheme())
    yield "pow2"


def quantize(tmp_path: Path, *args: str) -> Path:
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["quantize", str(DEMO_MODEL_DIR), *args, "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    return out


def test_a_registered_method_is_written_end_to_end(toy_method: str, tmp_path: Path) -> None:
    out = quantize(tmp_path, "--method", toy_method)
    source = Checkpoint.open(DEMO_MODEL_DIR)
    written = {}
    for shard in out.glob("*.safetensors"):
        written.update(load_file(shard))
    report = json.loads((out / "quantkit_report.json").read_text())
    rounded = [t["name"] for t in report["tensors"] if t["scheme"].startswith("pow2")]
    assert rounded and report["recipe"]["default"] == {"method": "pow2"}
    for name in rounded:
        assert torch.equal(written[name], power_of_two(source.get(name))), name
    for record in report["tensors"]:  # routers, norms, embeddings stay as they were
        if record["name"] not in rounded:
            assert torch.equal(written[record["name"]], source.get(record["name"])), record["name"]


def test_a_registered_method_takes_recipe_rules(toy_method: str, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("version: 1\ndefault: {method: absmax, bits: 8}\n"
                      "rules: [{match: 'role:routed_expert', method: pow2}]\n")
    out = quantize(tmp_path, "--recipe", str(recipe))
    schemes = {t["role"]: t["scheme"] for t in json.loads((out / "quantkit_report.json").read_text())["tensors"]
               if t["role"] in ("routed_expert", "attention")}
    assert schemes == {"routed_expert": "pow2 (signed powers of two, fp16)",
                       "attention": "absmax int8 per-channel, restricted"}


def test_settings_of_other_methods_are_refused_by_name(toy_method: str) -> None:
    with pytest.raises(QuantkitError, match=r"^bits does not apply to method pow2$"):
        make_config(toy_method, bits=4)
    assert make_config("absmax", bits=4, group_size=32).with_updates(method=toy_method) == PowerOfTwoConfig("pow2")
