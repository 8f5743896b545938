"""The report's ``clients`` entry: which engines load this output, derived from what was written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from quantkit.api import QuantizeOptions, quantize
from quantkit.formats.clients import (
    COMPRESSED_TENSORS,
    GPTQMODEL,
    LLAMA_CPP,
    QUANTKIT_LOADER,
    TRANSFORMERS,
    VLLM_CPU,
)
from quantkit.formats.output import OUTPUT_FORMATS
from quantkit.model.checkpoint import Checkpoint
from quantkit.plan import make_plan
from quantkit.recipe import Recipe, get_preset
from quantkit.report.report import client_summary
from tests.conftest import COMMON, save_model

INT4_SYM_G32 = get_preset("int4-sym-g128").with_default(group_size=32)
W8A8 = get_preset("int8").with_default(activations="dynamic")


def verdicts(clients: list[dict[str, Any]]) -> dict[str, bool | None]:
    return {c["engine"]: c["loads"] for c in clients}


def why(clients: list[dict[str, Any]], engine: str) -> str:
    return next(c["why"] or "" for c in clients if c["engine"] == engine)


def quantized_report(model: Path, recipe: Recipe, out: Path, output_format: str = "auto") -> dict[str, Any]:
    """The clients entry of a real run, checked to be the one written into the report file."""
    report = quantize(model, recipe, out, options=QuantizeOptions(show_progress=False, output_format=output_format))
    report_file = out.with_name(out.stem + ".quantkit_report.json") if out.suffix == ".gguf" else \
        out / "quantkit_report.json"
    assert json.loads(report_file.read_text())["clients"] == report.clients
    return {"clients": report.clients}


def planned_clients(model: Path, recipe: Recipe, output_format: str) -> list[dict[str, Any]]:
    plan = make_plan(Checkpoint.open(model), recipe)
    return [note.to_dict() for note in OUTPUT_FORMATS.get(output_format).clients(plan)]


def test_dense_absmax_w4a16_loads_everywhere_vllm_in_bf16(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    clients = quantized_report(tiny_models["llama"], INT4_SYM_G32, tmp_path / "out")["clients"]
    assert verdicts(clients) == {QUANTKIT_LOADER: True, COMPRESSED_TENSORS: True, TRANSFORMERS: True, VLLM_CPU: True}
    assert "bfloat16" in why(clients, VLLM_CPU)


def test_zeropoint_fails_in_transformers_and_is_not_run_on_vllm(tiny_models: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    clients = quantized_report(tiny_models["llama"], get_preset("int4-g128").with_default(group_size=32),
                               tmp_path / "out")["clients"]
    assert verdicts(clients) == {QUANTKIT_LOADER: True, COMPRESSED_TENSORS: True, TRANSFORMERS: False,
                                 VLLM_CPU: None}
    assert "zero points" in why(clients, TRANSFORMERS)


def test_dense_w8a8_runs_on_vllm_int8_kernels(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    clients = quantized_report(tiny_models["llama"], W8A8, tmp_path / "out")["clients"]
    assert verdicts(clients) == {QUANTKIT_LOADER: True, COMPRESSED_TENSORS: True, TRANSFORMERS: True, VLLM_CPU: True}
    assert "INT8" in why(clients, VLLM_CPU)


def test_moe_w8a8_routed_experts_fail_in_transformers_and_vllm_cpu(tiny_models: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    clients = quantized_report(tiny_models["qwen2_moe"], W8A8, tmp_path / "out")["clients"]
    assert verdicts(clients)[TRANSFORMERS] is False and "routed experts" in why(clients, TRANSFORMERS)
    assert verdicts(clients)[VLLM_CPU] is False and "Int8 MoE" in why(clients, VLLM_CPU)


def test_moe_weight_only_experts_load_in_transformers_not_on_vllm_cpu(tiny_models: dict[str, Path]) -> None:
    clients = planned_clients(tiny_models["qwen2_moe"], INT4_SYM_G32, "compressed-tensors")
    assert verdicts(clients)[TRANSFORMERS] is True
    assert verdicts(clients)[VLLM_CPU] is False and "WNA16 MoE" in why(clients, VLLM_CPU)


def test_w8a8_group_scales_have_no_vllm_scheme(tiny_models: dict[str, Path]) -> None:
    clients = planned_clients(tiny_models["llama"], W8A8.with_default(group_size=32), "compressed-tensors")
    assert verdicts(clients)[VLLM_CPU] is False and "group scales" in why(clients, VLLM_CPU)


@pytest.mark.parametrize(("group_size", "partial"), [(32, False), (48, True)])
def test_partial_groups_fail_in_transformers(group_size: int, partial: bool, tiny_models: dict[str, Path]) -> None:
    clients = planned_clients(tiny_models["llama"], INT4_SYM_G32.with_default(group_size=group_size),
                              "compressed-tensors")
    assert verdicts(clients)[TRANSFORMERS] is not partial
    assert verdicts(clients)[COMPRESSED_TENSORS] is True


@pytest.fixture(scope="module")
def uneven_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama whose MLP has 176 outputs (not a multiple of 32); attention's are 64 and 32."""
    import transformers

    config = transformers.AutoConfig.for_model("llama", **{**COMMON, "intermediate_size": 176})
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return save_model(model.eval(), tmp_path_factory.mktemp("uneven") / "llama")


def test_wna16_output_sizes_not_divisible_by_32_fail_on_vllm(uneven_llama: Path) -> None:
    clients = planned_clients(uneven_llama, INT4_SYM_G32, "compressed-tensors")
    assert verdicts(clients)[VLLM_CPU] is False
    assert "divisible by 32" in why(clients, VLLM_CPU) and "gate_proj" in why(clients, VLLM_CPU)
    attention_only = INT4_SYM_G32.with_rule(["role:dense_mlp"], method="fp16")
    assert verdicts(planned_clients(uneven_llama, attention_only, "compressed-tensors"))[VLLM_CPU] is True


@pytest.mark.parametrize(("symmetric", "gptqmodel"), [(True, True), (False, False)])
def test_gptq_v1_gptqmodel_takes_symmetric_only(symmetric: bool, gptqmodel: bool,
                                                tiny_models: dict[str, Path]) -> None:
    recipe = get_preset("int8").with_default(method="gptq", bits=4, group_size=32, symmetric=symmetric)
    clients = planned_clients(tiny_models["llama"], recipe, "gptq-v1")
    assert verdicts(clients) == {QUANTKIT_LOADER: True, GPTQMODEL: gptqmodel, TRANSFORMERS: None, VLLM_CPU: None}


def test_gguf_loads_in_llama_cpp(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    clients = quantized_report(tiny_models["llama"], get_preset("Q8_0"), tmp_path / "model.gguf", "gguf")["clients"]
    assert verdicts(clients) == {QUANTKIT_LOADER: True, LLAMA_CPP: True}
    assert verdicts(planned_clients(tiny_models["llama"], get_preset("Q8_0"), "ggml")) == {
        QUANTKIT_LOADER: True, LLAMA_CPP: False}


def test_summary_line_groups_engines_by_verdict() -> None:
    line = client_summary([{"engine": "a", "loads": True, "why": None}, {"engine": "b", "loads": False, "why": "x"},
                           {"engine": "c", "loads": None, "why": "y"}])
    assert line.startswith("loads: a; fails: b; not run: c")


def test_configurations_vllm_was_not_run_on_are_null(tiny_models: dict[str, Path]) -> None:
    w8a16 = planned_clients(tiny_models["llama"], get_preset("int8"), "compressed-tensors")
    assert verdicts(w8a16)[VLLM_CPU] is None and "bits other than 4" in why(w8a16, VLLM_CPU)
    act_order = get_preset("int8").with_default(method="gptq", bits=4, group_size=32, symmetric=True, act_order=True)
    clients = planned_clients(tiny_models["llama"], act_order, "compressed-tensors")
    assert verdicts(clients) == {QUANTKIT_LOADER: True, COMPRESSED_TENSORS: False, TRANSFORMERS: False,
                                 VLLM_CPU: None}
