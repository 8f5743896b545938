"""Architectures are data: a family quantkit does not ship (PhiMoE) registered here as one ``ArchSpec``, without
editing any quantkit module, is inspected, quantized with RTN and with GPTQ through its experts, and read back
(docs/architecture.md)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from quantkit.cli import app
from quantkit.formats.load import dequantized_state
from quantkit.model.archs import ARCHS, ArchSpec, ExpertLayout
from quantkit.model.checkpoint import Checkpoint
from tests.conftest import COMMON, copy_tokenizer, save_model

PHIMOE = ArchSpec(  # the spec a contributor adds as quantkit/model/archs/phimoe.py
    model_type="phimoe",
    description="PhiMoE: Mixtral-style sparse MoE with LayerNorm biases",
    experts=ExpertLayout(disk_block="block_sparse_moe", gate="w1", up="w3", down="w2", memory_block="mlp"),
    router_patterns=(r"\.block_sparse_moe\.gate\.weight$", r"\.mlp\.router\.weight$"),
    num_experts_keys=("num_local_experts",),
    extra_config_keys=("intermediate_size",),
    disk_renames=((".block_sparse_moe.gate.", ".mlp.router."),),  # transformers 5's in-memory name
)
EXPERTS = 4


@pytest.fixture
def phimoe(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_lm: Path) -> Iterator[Path]:
    """A tiny random PhiMoE checkpoint, with its spec registered for one test."""
    import transformers

    monkeypatch.setitem(ARCHS._items, PHIMOE.model_type, PHIMOE)
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model("phimoe", **{**COMMON, "num_local_experts": EXPERTS,
                                                            "num_experts_per_tok": 2})
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    yield copy_tokenizer(tiny_lm, save_model(model, tmp_path / "phimoe"))


def run(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.stderr
    return result.stdout


def test_inspect_finds_the_routed_experts(phimoe: Path) -> None:
    info = json.loads(run("inspect", str(phimoe), "--json"))
    assert info["architecture"]["model_type"] == "phimoe"
    assert info["experts"] == {"expected_per_layer": EXPERTS, "layers_with_experts": COMMON["num_hidden_layers"],
                               "complete": True}
    assert info["params"]["routed_expert"] == COMMON["num_hidden_layers"] * EXPERTS * 3 * 64 * 128


@pytest.mark.parametrize("method", [("--method", "absmax", "--bits", "8"),
                                    ("--method", "gptq", "--bits", "4", "--num-samples", "4", "--seq-len", "32")])
def test_quantized_experts_read_back_within_the_grid_error(phimoe: Path, tmp_path: Path,
                                                           method: tuple[str, ...]) -> None:
    out = tmp_path / "out"
    run("quantize", str(phimoe), *method, "--out", str(out))
    report = json.loads((out / "quantkit_report.json").read_text())
    experts = [t for t in report["tensors"] if t["role"] == "routed_expert"]
    assert len(experts) == COMMON["num_hidden_layers"] * EXPERTS * 3
    assert {t["role"] for t in report["tensors"] if t["name"].endswith("block_sparse_moe.gate.weight")} == {"router"}
    source, state = Checkpoint.open(phimoe), dequantized_state(Checkpoint.open(out))
    bound = 0.01 if "absmax" in method else 0.2  # int8 per channel; int4 per channel after GPTQ
    for record in experts:
        weight = source.get(record["name"])
        error = torch.linalg.vector_norm(state[record["name"]].float() - weight) / torch.linalg.vector_norm(weight)
        assert float(error) < bound, record["name"]
