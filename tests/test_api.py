"""End to end through the API: every expert quantized, output decodes exactly, atomic and deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from quantkit.api import QuantizeOptions, quantize
from quantkit.formats import sharded
from quantkit.formats.load import dequantized_state, load_quantized
from quantkit.model.archs import get_arch
from quantkit.model.checkpoint import Checkpoint
from quantkit.recipe import get_preset
from quantkit.schemes import SCHEMES, IntQuantized
from tests.conftest import ARCH_CONFIGS, MOE_ARCHS

INT4_G16 = get_preset("int4-g128").with_default(group_size=16)


def output_keys(out: Path) -> set[str]:
    keys: set[str] = set()
    for file in out.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            keys |= set(f.keys())
    return keys


@pytest.mark.parametrize("arch", list(ARCH_CONFIGS))
def test_every_linear_of_every_expert_is_quantized(arch: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    source = Checkpoint.open(tiny_models[arch])
    spec = get_arch(arch)
    report = quantize(source.path, INT4_G16, tmp_path / "out", options=QuantizeOptions(show_progress=False))
    keys = output_keys(tmp_path / "out")
    quantized = [t for t in report.tensors if t.bits == 4]
    for name in source.tensors:
        role = spec.role(name)
        module = name.removesuffix(".weight")
        if role.value in ("attention", "dense_mlp", "shared_expert", "routed_expert") and name.endswith(".weight"):
            assert f"{module}.weight_packed" in keys, f"{name} not quantized"
            assert name not in keys
        else:
            assert name in keys, f"{name} not copied"
    if arch in MOE_ARCHS:
        config = source.config
        n_experts = spec.num_experts(config)
        expert_records = [t for t in quantized if t.role == "routed_expert"]
        assert len(expert_records) == 3 * n_experts * len(spec.moe_layers(config))
    assert (tmp_path / "out" / "quantkit_report.json").is_file()


@pytest.mark.parametrize("method", ["absmax", "zeropoint"])
def test_loader_returns_exactly_the_scheme_dequantization(
    method: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    source = Checkpoint.open(tiny_models["deepseek_v3"])
    recipe = INT4_G16.with_default(method=method, bits=3)
    quantize(source.path, recipe, tmp_path / "out", options=QuantizeOptions(show_progress=False))
    state = dequantized_state(Checkpoint.open(tmp_path / "out"))
    spec = get_arch("deepseek_v3")
    for name in source.tensors:
        scheme = recipe.scheme_for(name, spec.role(name))
        if scheme is None:
            assert torch.equal(state[name], source.get(name))
            continue
        expected = SCHEMES.get(scheme.method).quantize(source.get(name), scheme)
        assert isinstance(expected, IntQuantized)
        assert torch.equal(state[name], expected.dequantize()), name


@pytest.mark.parametrize("method", ["absmax", "zeropoint"])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_compressed_tensors_decodes_our_bytes_identically(
    method: str, granularity: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """compressed-tensors' own decompressor is the independent reference for the layout."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    recipe = INT4_G16.with_default(method=method, bits=3, granularity=granularity,
                                   group_size=16 if granularity == "group" else None)
    out = tmp_path / "out"
    quantize(tiny_models["qwen2_moe"], recipe, out, options=QuantizeOptions(show_progress=False))
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**group["weights"]))
    ours = dequantized_state(Checkpoint.open(out))
    checkpoint = Checkpoint.open(out)
    modules = [n.removesuffix(".weight_packed") for n in checkpoint.tensors if n.endswith(".weight_packed")]
    assert modules
    for module in modules:
        parts = {n[len(module) + 1:]: checkpoint.get(n) for n in checkpoint.tensors if n.startswith(module + ".")}
        reference = PackedQuantizationCompressor.decompress(parts, scheme)["weight"]
        assert torch.equal(reference, ours[f"{module}.weight"]), module


def test_fused_experts_on_disk_are_split_per_expert(fused_on_disk: Path, tmp_path: Path) -> None:
    report = quantize(fused_on_disk, INT4_G16, tmp_path / "out", options=QuantizeOptions(show_progress=False))
    keys = output_keys(tmp_path / "out")
    assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in keys)
    for layer in range(2):
        for expert in range(4):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight_packed" in keys
    assert sum(t.role == "routed_expert" for t in report.tensors) == 2 * 4 * 3
    # reloading reproduces the original model up to quantization error
    original = load_quantized(fused_on_disk, dtype=torch.float32)
    reloaded = load_quantized(tmp_path / "out", dtype=torch.float32)
    ids = torch.arange(16).reshape(1, 16)
    with torch.no_grad():
        a, b = original(ids).logits, reloaded(ids).logits
    relative = float((a - b).norm() / a.norm())
    assert 0 < relative < 0.25, relative


def test_sharded_output_has_an_index_and_loads(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    quantize(tiny_models["mixtral"], INT4_G16, out,
             options=QuantizeOptions(max_shard_bytes=20_000, show_progress=False))
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert set(index["weight_map"]) == output_keys(out)
    single = tmp_path / "single"
    quantize(tiny_models["mixtral"], INT4_G16, single, options=QuantizeOptions(show_progress=False))
    a, b = dequantized_state(Checkpoint.open(out)), dequantized_state(Checkpoint.open(single))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_inputs_give_byte_identical_weights(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    for name in ("a", "b"):
        quantize(tiny_models["olmoe"], INT4_G16, tmp_path / name, options=QuantizeOptions(show_progress=False))
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert (tmp_path / "a" / "config.json").read_text() == (tmp_path / "b" / "config.json").read_text()


def test_interrupted_run_leaves_nothing_that_looks_complete(
    tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    original_add = sharded.ShardedWriter.add

    def interrupt_midway(self: sharded.ShardedWriter, name: str, tensor: torch.Tensor) -> None:
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        original_add(self, name, tensor)

    monkeypatch.setattr(sharded.ShardedWriter, "add", interrupt_midway)
    with pytest.raises(KeyboardInterrupt):
        quantize(tiny_models["qwen3_moe"], INT4_G16, tmp_path / "out", options=QuantizeOptions(show_progress=False))
    assert list(tmp_path.iterdir()) == []


def test_report_records_every_tensor(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    recipe = INT4_G16.with_rule(["role:shared_expert"], bits=8)
    quantize(tiny_models["deepseek_v3"], recipe, out,
             options=QuantizeOptions(command=["quantkit", "quantize"], seed=7, show_progress=False))
    report = json.loads((out / "quantkit_report.json").read_text())
    assert report["seed"] == 7 and report["command"] == ["quantkit", "quantize"]
    assert {"quantkit", "torch", "transformers"} <= set(report["versions"])
    by_name = {t["name"]: t for t in report["tensors"]}
    assert len(by_name) == len(Checkpoint.open(tiny_models["deepseek_v3"]).tensors)
    shared = by_name["model.layers.1.mlp.shared_experts.up_proj.weight"]
    routed = by_name["model.layers.1.mlp.experts.0.up_proj.weight"]
    assert (shared["bits"], routed["bits"]) == (8, 4)
    assert shared["rel_error"] < routed["rel_error"] < 0.2
    assert routed["bits_per_weight"] == pytest.approx(4 + (32 + 4) / 16)
    totals = report["totals"]
    assert totals["bytes_after"] < totals["bytes_before"] and totals["wall_time_s"] > 0
    assert totals["bytes_before"] == sum(t["bytes_before"] for t in report["tensors"])


def test_tensors_unknown_to_the_config_are_kept_as_they_are(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """E.g. DeepSeek-V3's multi-token-prediction layer: no transformers class loads it, so leave it alone."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "m"
    shutil.copytree(tiny_models["deepseek_v3"], model)
    weights = load_file(str(model / "model.safetensors"))
    extra = "model.layers.2.mlp.experts.0.up_proj.weight"  # a layer beyond num_hidden_layers
    weights[extra] = torch.randn(32, 64)
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    report = quantize(model, INT4_G16, tmp_path / "out", options=QuantizeOptions(show_progress=False))
    assert torch.equal(load_file(str(tmp_path / "out" / "model.safetensors"))[extra], weights[extra])
    assert any(extra in note for note in report.notes)


def test_natural_order_of_tensor_names() -> None:
    from quantkit.plan import natural_key

    names = ["model.layers.10.a", "model.layers.extra.b", "model.layers.9.a", "model.layers.9"]
    assert sorted(names, key=natural_key) == [
        "model.layers.9", "model.layers.9.a", "model.layers.10.a", "model.layers.extra.b"
    ]
