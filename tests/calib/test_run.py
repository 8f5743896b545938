"""Layer-by-layer calibration: pipeline fidelity, per-expert observers, all-experts, artifact, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from quantkit.calib.artifact import check_model, load_calibration
from quantkit.calib.observers import LayerTaps, Statistics
from quantkit.calib.run import CalibrationSettings, calibrate
from quantkit.cli import app
from quantkit.errors import QuantkitError
from quantkit.model.checkpoint import Checkpoint
from quantkit.model.experts import eager_experts, is_fused_experts
from quantkit.pipeline import LayerPipeline
from tests.conftest import ARCH_CONFIGS, MOE_ARCHS, build_model, starved_deepseek

runner = CliRunner()


def _run_pipeline(path: Path, ids: torch.Tensor, batch_size: int, observer_stats: Statistics | None = None,
                  all_experts: bool = False) -> torch.Tensor:
    pipeline = LayerPipeline(Checkpoint.open(path))
    states = pipeline.capture(ids, batch_size)
    for index in range(pipeline.num_layers):
        layer = pipeline.load_layer(index)
        stats = observer_stats if observer_stats is not None else Statistics()
        taps = LayerTaps(stats.observe, pipeline.arch, stats.aliases, all_experts=all_experts)
        with taps.attach(pipeline.layer_prefix(index), layer):
            states = pipeline.run_layer(layer, states, on_batch=taps.next_batch)
        pipeline.release(layer)
    head = pipeline.load("lm_head")
    return torch.cat([head(h) for h in pipeline.final_norm(states)])


@pytest.mark.parametrize("arch", list(ARCH_CONFIGS))
@pytest.mark.parametrize("all_experts", [False, True])
def test_layer_by_layer_equals_the_whole_model(tiny_models: dict[str, Path], arch: str, all_experts: bool) -> None:
    """One layer at a time, observers attached (all-experts too), gives the model's own logits bit for bit."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).eval()
    if arch in MOE_ARCHS:
        model.set_experts_implementation("eager")
    ids = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    got = _run_pipeline(tiny_models[arch], ids, batch_size=3, all_experts=all_experts)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_all_experts_sees_every_token_but_outputs_stay_routed(arch: str) -> None:
    model = build_model(arch)
    experts = next(m for m in model.modules() if is_fused_experts(m))
    num_experts = experts.gate_up_proj.shape[0]
    hidden = torch.randn(20, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    second = torch.randint(1, num_experts - 1, (20,), generator=torch.Generator().manual_seed(2))
    top_k = torch.stack([torch.zeros_like(second), second], dim=1)  # the last expert gets no token
    weights = torch.rand(20, 2)
    seen: dict[tuple[str, int], int] = {}

    def tap(param: str, expert: int, x: torch.Tensor) -> None:
        seen[(param, expert)] = seen.get((param, expert), 0) + x.shape[0]

    with torch.no_grad():
        reference = experts.__class__.forward.__wrapped__(experts, hidden, top_k, weights)  # transformers' eager
        routed = eager_experts(experts, hidden, top_k, weights)
        everything = eager_experts(experts, hidden, top_k, weights, tap, all_experts=True)
    assert torch.equal(routed, reference)
    assert torch.equal(everything, reference)
    assert all(seen[("gate_up_proj", e)] == 20 and seen[("down_proj", e)] == 20 for e in range(num_experts))


def test_observers_record_exact_statistics(tiny_models: dict[str, Path]) -> None:
    """sum x^2, tokens and the histogram of q_proj's input equal those of the captured input itself."""
    path = tiny_models["llama"]
    ids = torch.randint(0, 128, (4, 10), generator=torch.Generator().manual_seed(2))
    stats = Statistics()
    _run_pipeline(path, ids, batch_size=2, observer_stats=stats)
    captured: list[torch.Tensor] = []
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    q_proj = model.model.layers[1].self_attn.q_proj
    q_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for batch in ids.split(2):
            model(batch)
    x = torch.cat(captured)
    site = stats.site("model.layers.1.self_attn.q_proj")
    assert stats.aliases["model.layers.1.self_attn.k_proj"] == "model.layers.1.self_attn.q_proj"
    assert stats.aliases["model.layers.1.self_attn.v_proj"] == "model.layers.1.self_attn.q_proj"
    assert "model.layers.1.self_attn.o_proj" in stats.sites and "model.layers.1.mlp.down_proj" in stats.sites
    assert int(site.tokens[0]) == 40
    torch.testing.assert_close(site.sum_sq[0], x.double().square().sum(0), rtol=1e-12, atol=0)
    assert site.histograms[0].absmax == pytest.approx(float(x.abs().max()))
    assert int(site.histograms[0].counts.sum()) == x.numel()


@pytest.fixture(scope="module")
def calib_lm(tiny_lm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("calib") / "calib"


def _settings(text: Path, **changes: Any) -> CalibrationSettings:
    return CalibrationSettings(**{"dataset": str(text), "num_samples": 8, "seq_len": 32, "batch_size": 4,
                                  "min_expert_tokens": 16, **changes})


def test_artifact_round_trip_and_model_check(tiny_lm: Path, tiny_models: dict[str, Path], test_text: Path,
                                             tmp_path: Path) -> None:
    made = calibrate(tiny_lm, tmp_path / "c", _settings(test_text), show_progress=False)
    loaded = load_calibration(tmp_path / "c")
    assert set(loaded.stats.sites) == set(made.stats.sites) and loaded.stats.aliases == made.stats.aliases
    for name, site in made.stats.sites.items():
        other = loaded.stats.sites[name]
        assert torch.equal(other.tokens, site.tokens) and torch.equal(other.routed, site.routed)
        assert torch.equal(other.sum_sq, site.sum_sq.float().double())
        for a, b in zip(site.histograms, other.histograms, strict=True):
            assert torch.equal(a.counts, b.counts) and torch.equal(a.edges, b.edges)
            assert (a.min, a.max, a.count) == (b.min, b.max, b.count)
    assert loaded.metadata["seq_len"] == 32 and loaded.metadata["num_samples"] == 8
    check_model(loaded, Checkpoint.open(tiny_lm))
    with pytest.raises(QuantkitError, match="another model"):
        check_model(loaded, Checkpoint.open(tiny_models["deepseek_v3"]))
    meta = json.loads((tmp_path / "c" / "calibration.json").read_text())
    meta["quantkit_calibration_version"] = 99
    (tmp_path / "c" / "calibration.json").write_text(json.dumps(meta))
    with pytest.raises(QuantkitError, match="version 99"):
        load_calibration(tmp_path / "c")


def test_starved_expert_is_flagged_and_all_experts_covers_it(tiny_lm: Path, test_text: Path, tmp_path: Path) -> None:
    path, starved = starved_deepseek(tiny_lm, tmp_path)
    routed = calibrate(path, tmp_path / "routed", _settings(test_text), show_progress=False)
    site = "model.layers.1.mlp.experts.gate_up_proj"
    flagged = {(f["site"], f["expert"]) for f in routed.metadata["flagged_experts"]}
    assert (site, starved) in flagged
    assert routed.stats.sites[site].routed[starved] == 0 and routed.stats.sites[site].tokens[starved] == 0
    tokens = 8 * 32
    assert int(routed.stats.sites[site].routed.sum()) == tokens * 2  # top-2
    everything = calibrate(path, tmp_path / "all", _settings(test_text, all_experts=True), show_progress=False)
    assert everything.metadata["flagged_experts"] == []
    assert everything.stats.sites[site].tokens.tolist() == [tokens] * 8
    assert torch.equal(everything.stats.sites[site].routed, routed.stats.sites[site].routed)


def test_static_activations_use_the_documented_fallback_for_starved_experts(
    tiny_lm: Path, test_text: Path, tmp_path: Path
) -> None:
    path, starved = starved_deepseek(tiny_lm, tmp_path)
    calibrate(path, tmp_path / "calib", _settings(test_text), show_progress=False)
    result = runner.invoke(app, ["quantize", str(path), "--bits", "8", "--activations", "static", "--range-method",
                                 "percentile", "--calibration", str(tmp_path / "calib"), "--out",
                                 str(tmp_path / "q"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "q" / "quantkit_report.json").read_text())
    records = {t["name"]: t for t in report["tensors"]}
    starved_gate = records[f"model.layers.1.mlp.experts.{starved}.gate_proj.weight"]
    assert starved_gate["input_tokens"] == 0 and "covered experts" in starved_gate["input_fallback"]
    others = [records[f"model.layers.1.mlp.experts.{e}.gate_proj.weight"]["input_amax"] for e in range(starved)]
    assert starved_gate["input_amax"] == pytest.approx(max(others))
    assert any("fallback" in note for note in report["notes"])


def test_static_activations_need_a_calibration_of_the_same_model(
    tiny_lm: Path, tiny_models: dict[str, Path], test_text: Path, tmp_path: Path
) -> None:
    result = runner.invoke(app, ["quantize", str(tiny_lm), "--activations", "static", "--out", str(tmp_path / "q")])
    assert result.exit_code == 2 and "quantkit calibrate" in result.output
    calibrate(tiny_lm, tmp_path / "calib", _settings(test_text), show_progress=False)
    other = tiny_models["deepseek_v3"]
    result = runner.invoke(app, ["quantize", str(other), "--activations", "static", "--calibration",
                                 str(tmp_path / "calib"), "--out", str(tmp_path / "q")])
    assert result.exit_code == 2 and "another model" in result.output
    assert not (tmp_path / "q").exists()


def test_calibrate_cli_writes_artifact_plots_and_imatrix(tiny_lm: Path, test_text: Path, tmp_path: Path) -> None:
    from quantkit.calib.imatrix import read_imatrix_gguf

    out, imatrix = tmp_path / "calib", tmp_path / "model.imatrix.gguf"
    args = ["calibrate", str(tiny_lm), "--dataset", str(test_text), "--num-samples", "4", "--seq-len", "32",
            "--out", str(out), "--imatrix-out", str(imatrix), "--plot", "*layers.0.self_attn.o_proj"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "calibration.json").read_text())
    assert meta["num_samples"] == 4 and meta["seq_len"] == 32 and meta["tokens"] == 128
    assert "model.layers.0.self_attn.o_proj" in meta["plots"] and len(meta["plots"]) >= 2
    for relative in meta["plots"].values():
        assert (out / relative).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    entries, info = read_imatrix_gguf(imatrix)
    assert (info.chunk_count, info.chunk_size) == (4, 32)
    calibration = load_calibration(out)
    sum_sq, counts = entries["blk.1.ffn_gate_exps.weight"]
    site = calibration.stats.sites["model.layers.1.mlp.experts.gate_up_proj"]
    assert torch.equal(sum_sq, site.sum_sq.float()) and counts.flatten().tolist() == site.tokens.tolist()
    down, _ = entries["blk.0.ffn_down.weight"]
    assert torch.equal(down, calibration.stats.site("model.layers.0.mlp.down_proj").sum_sq.float())
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.output


@pytest.mark.parametrize(("extra", "message"), [
    (["--seq-len", "100"], "exceeds the model's context"),
    (["--num-samples", "0"], "--num-samples must be at least 1"),
    (["--plot", "nothing.matches"], "matches no calibration site"),
    (["--min-expert-tokens", "-1"], "must not be negative"),
])
def test_calibrate_cli_errors(tiny_lm: Path, test_text: Path, tmp_path: Path, extra: list[str],
                              message: str) -> None:
    result = runner.invoke(app, ["calibrate", str(tiny_lm), "--dataset", str(test_text), "--seq-len", "32",
                                 "--num-samples", "2", *extra, "--out", str(tmp_path / "c")])
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "c").exists()


def test_a_tensor_of_another_shape_is_one_line_error(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """Loading a layer copies each tensor into its parameter: a shape the config does not imply is refused."""
    path = shutil.copytree(tiny_models["qwen3_moe"], tmp_path / "model")
    config = json.loads((path / "config.json").read_text())
    config["moe_intermediate_size"] *= 2
    (path / "config.json").write_text(json.dumps(config))
    pipeline = LayerPipeline(Checkpoint.open(path))
    with pytest.raises(QuantkitError, match=r"experts\.0\.gate_proj\.weight .* has shape \[32, 64\]; the config "
                                            r"implies \[64, 64\]"):
        pipeline.load_layer(0)
