"""Pass merging: which sites share a Hessian pass, and that sharing changes no bit of GPTQ's output."""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from quantkit.gptq.sequential import LayerResult, gptq_layers
from quantkit.gptq.stages import InputDigests, dependencies, stages_of
from quantkit.model.checkpoint import Checkpoint
from quantkit.pipeline import LayerPipeline
from quantkit.plan import make_plan
from quantkit.recipe import get_preset
from tests.conftest import ARCH_CONFIGS, COMMON, build_model, save_model

GPTQ4 = {"method": "gptq", "bits": 4, "group_size": 16}
ATTENTION = [["self_attn.q_proj"], ["self_attn.o_proj"]]
DENSE_MLP = [["mlp.gate_proj"], ["mlp.down_proj"]]
MLA = [["self_attn.q_proj"], ["self_attn.kv_b_proj"], ["self_attn.o_proj"]]
MLA_Q_LORA = [["self_attn.q_a_proj"], ["self_attn.q_b_proj", "self_attn.kv_b_proj"], ["self_attn.o_proj"]]
ROUTED = [["mlp.experts.gate_up_proj"], ["mlp.experts.down_proj"]]
ROUTED_AND_SHARED = [["mlp.experts.gate_up_proj", "mlp.shared_experts.gate_proj"],
                     ["mlp.experts.down_proj", "mlp.shared_experts.down_proj"]]
# per layer: the stages, as names relative to the layer (execution order inside a stage)
EXPECTED: dict[str, list[list[list[str]]]] = {
    "llama": [ATTENTION + DENSE_MLP] * 2,
    "mixtral": [ATTENTION + ROUTED] * 2,
    "qwen2_moe": [[*ATTENTION, ["mlp.shared_expert.gate_proj", "mlp.experts.gate_up_proj"],
                   ["mlp.shared_expert.down_proj", "mlp.experts.down_proj"]]] * 2,
    "deepseek_v2": [MLA + DENSE_MLP, MLA + ROUTED_AND_SHARED],
    "deepseek_v3": [MLA + DENSE_MLP, MLA + ROUTED_AND_SHARED],
    "deepseek_v3_q_lora": [MLA_Q_LORA + DENSE_MLP, MLA_Q_LORA + ROUTED_AND_SHARED],
}


def tiny_checkpoint(name: str, root: Path) -> Path:
    """A tiny model of ``name``: an architecture of conftest, or DeepSeek-V3 with a q LoRA (``q_a``/``q_b``)."""
    if name != "deepseek_v3_q_lora":
        return save_model(build_model(name), root / name)
    import transformers

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model("deepseek_v3", **{**COMMON, **ARCH_CONFIGS["deepseek_v3"],
                                                                 "q_lora_rank": 16})
    with contextlib.redirect_stderr(io.StringIO()):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:
                param.normal_(0, 0.05)
    return save_model(model.eval(), root / name)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stages")
    return {name: tiny_checkpoint(name, root) for name in EXPECTED}


def run_gptq(path: Path, **options: Any) -> tuple[list[LayerResult], torch.Tensor]:
    """GPTQ on every linear of the model at ``path``: the layers' results and the final hidden states."""
    checkpoint = Checkpoint.open(path)
    plan = make_plan(checkpoint, get_preset("int8").with_default(**GPTQ4))
    schemes = {t.name: t.scheme for t in plan.tensors if t.scheme is not None}
    only = options.pop("only", None)
    if only is not None:
        schemes = {name: scheme for name, scheme in schemes.items() if re.search(only, name)}
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    pipeline = LayerPipeline(checkpoint)
    states = pipeline.capture(ids, batch_size=2)
    layers = list(gptq_layers(pipeline, states, schemes, **options))
    return layers, torch.cat(states.hidden)


def outputs(layers: list[LayerResult]) -> dict[str, tuple[Any, ...]]:
    """Every GPTQ weight's stored tensors and record, by name."""
    return {w.name: (w.quantized.codes, w.quantized.scale, w.quantized.zero_point, w.quantized.g_idx,
                     w.loss, w.damp, w.retries, w.tokens, w.fallback) for layer in layers for w in layer.weights}


def assert_identical(a: dict[str, tuple[Any, ...]], b: dict[str, tuple[Any, ...]]) -> None:
    assert list(a) == list(b)  # same weights, same order
    for name in a:
        for x, y in zip(a[name], b[name], strict=True):
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, name


@pytest.fixture(scope="module")
def runs(checkpoints: dict[str, Path]) -> Callable[..., tuple[list[LayerResult], torch.Tensor]]:
    """``run_gptq`` on a checkpoint by name, each distinct run done once for the module."""
    done: dict[tuple[Any, ...], tuple[list[LayerResult], torch.Tensor]] = {}

    def run(name: str, **options: Any) -> tuple[list[LayerResult], torch.Tensor]:
        key = (name, *sorted(options.items()))
        if key not in done:
            done[key] = run_gptq(checkpoints[name], **options)
        return done[key]

    return run


@pytest.mark.parametrize("name", list(EXPECTED))
def test_stages_of_each_architecture(runs: Callable[..., Any], name: str) -> None:
    layers, _ = runs(name)
    relative = [[[site.removeprefix(f"model.layers.{layer.index}.") for site in stage] for stage in layer.stages]
                for layer in layers]
    assert relative == EXPECTED[name]
    assert [layer.passes for layer in layers] == [len(stages) + 1 for stages in EXPECTED[name]]


@pytest.mark.parametrize(("name", "extra"), [
    *((name, {}) for name in EXPECTED),
    ("qwen2_moe", {"max_memory": 1, "all_experts": True}),  # one pass per expert chunk, as before
    *(pytest.param(name, {"max_memory": 1, "all_experts": True}, marks=pytest.mark.slow)
      for name in ("mixtral", "deepseek_v3_q_lora")),
])
def test_merged_passes_equal_one_pass_per_site(runs: Callable[..., Any], name: str, extra: dict[str, Any]) -> None:
    """Bit for bit: every code, scale, zero point and record, and the hidden states after the last layer."""
    merged, merged_hidden = runs(name, **extra)
    per_site, per_site_hidden = runs(name, merge_passes=False, **extra)
    assert_identical(outputs(merged), outputs(per_site))
    assert torch.equal(merged_hidden, per_site_hidden)
    assert all(len(stage) == 1 for layer in per_site for stage in layer.stages)
    saved = sum(a.passes for a in per_site) - sum(b.passes for b in merged)
    assert saved == sum(len(stage) - 1 for layer in EXPECTED[name] for stage in layer)


@pytest.mark.parametrize(("name", "site"), [
    ("llama", r"mlp\.down_proj"), ("qwen2_moe", r"mlp\.experts\.\d+\.down_proj"),
    ("deepseek_v3_q_lora", r"self_attn\.kv_b_proj"),
])
def test_without_true_sequential_every_hessian_comes_from_the_float_layer(runs: Callable[..., Any], name: str,
                                                                            site: str) -> None:
    """One pass per layer; a late site's result in layer 0 is the one it gets when nothing before it is quantized."""
    layers, _ = runs(name, true_sequential=False)
    assert [layer.passes for layer in layers] == [2, 2]
    assert [len(layer.stages) for layer in layers] == [1, 1]
    alone, _ = runs(name, only=rf"layers\.0\.{site}\.")
    expected = outputs(alone)
    assert expected
    got = {k: v for k, v in outputs(layers).items() if k in expected}
    assert_identical(got, expected)
    sequential = outputs(runs(name)[0])
    assert any(not torch.equal(sequential[k][0], got[k][0]) for k in expected)


def test_without_true_sequential_chunks_see_the_float_layer(runs: Callable[..., Any]) -> None:
    """With --max-memory each further chunk has a pass of its own, still over the float weights."""
    whole, _ = runs("qwen2_moe", true_sequential=False, all_experts=True)
    chunked, _ = runs("qwen2_moe", true_sequential=False, all_experts=True, max_memory=1)
    assert_identical(outputs(whole), outputs(chunked))
    assert [layer.passes for layer in chunked] == [2 + 3 + 3, 2 + 3 + 3]  # 4 experts: 3 more chunks per site


def test_a_dependence_through_routing_alone_is_found() -> None:
    """Site b gets rows of x chosen by a's weights (its values never depend on them); c reads x; d reads b's output."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=generator)
    weights = {site: [torch.randn(8, 8, generator=generator)] for site in "abcd"}

    def run() -> InputDigests:
        digests = InputDigests()
        digests("a", 1, 0, x)
        chosen = x[(x @ weights["a"][0].T).argmax(-1) < 4]  # a router: which rows, not their values
        digests("b", 4, 0, chosen)
        digests("c", 1, 0, x)
        digests("d", 1, 0, chosen @ weights["b"][0].T)
        return digests

    before = {site: [w.clone() for w in ws] for site, ws in weights.items()}
    depends = dependencies(weights, run)
    assert depends == {"a": set(), "b": {"a"}, "c": set(), "d": {"a", "b"}}
    assert all(torch.equal(w, v) for site in weights for w, v in zip(weights[site], before[site], strict=True))
    assert stages_of(list(weights), depends) == [["a", "c"], ["b"], ["d"]]


def test_no_true_sequential_from_the_cli(tiny_lm: Path, test_text: Path, tmp_path: Path) -> None:
    """The option reaches the report and GPTQ v1's quantization_config; the default keeps both as they were."""
    from typer.testing import CliRunner

    from quantkit.cli import app

    runs = {"on": [], "off": ["--no-true-sequential"]}
    for label, extra in runs.items():
        args = ["quantize", str(tiny_lm), "--method", "gptq", "--bits", "4", "--group-size", "16", "--format",
                "gptq-v1", "--dataset", str(test_text), "--num-samples", "4", "--seq-len", "32", "--out",
                str(tmp_path / label), *extra]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
    for label, expected in (("on", True), ("off", False)):
        report = json.loads((tmp_path / label / "quantkit_report.json").read_text())
        assert report["gptq"].get("true_sequential", True) is expected
        config = json.loads((tmp_path / label / "config.json").read_text())["quantization_config"]
        assert config["true_sequential"] is expected
    assert "true_sequential" not in json.loads((tmp_path / "on" / "quantkit_report.json").read_text())["gptq"]
