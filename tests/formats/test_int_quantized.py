"""W8A8 (integer weights with INT8 inputs) is written as compressed-tensors' ``int-quantized``.

compressed-tensors' own format inference (``infer_module_format``) is the reference for which format a
scheme gets, its ``IntQuantizationCompressor`` for the bytes (compressing the same float weight with
quantkit's scales must give the same tensors) and for the weights (its decompressor on quantkit's bytes
must give exactly quantkit's dequantized weight). Whole outputs are checked module by module, and
quantkit's loader and plain transformers read them.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from quantkit.api import QuantizeOptions, quantize
from quantkit.errors import QuantkitError
from quantkit.formats import compressed_tensors
from quantkit.formats.load import dequantized_state, load_quantized
from quantkit.formats.output import OUTPUT_FORMATS
from quantkit.model.checkpoint import Checkpoint
from quantkit.plan import make_plan
from quantkit.recipe import get_preset, recipe_from_dict
from quantkit.schemes import SCHEMES, IntQuantized, make_config

pytest.importorskip("compressed_tensors", reason="compressed-tensors is the reference for int-quantized")

SETTINGS = [
    dict(method="absmax", bits=8, activations="dynamic"),
    dict(method="absmax", bits=8, activations="static", granularity="tensor"),
    dict(method="absmax", bits=8, activations="dynamic", group_size=32),
    dict(method="absmax", bits=8, activations="dynamic", range="full"),
    dict(method="zeropoint", bits=8, activations="dynamic"),
    dict(method="zeropoint", bits=8, activations="static", group_size=32),
    dict(method="absmax", bits=4, activations="dynamic"),  # W4A8: compressed-tensors infers int-quantized too
]


def scheme_of(config: Any) -> Any:
    """compressed-tensors' ``QuantizationScheme`` for the config group quantkit writes for ``config``."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    inputs = compressed_tensors.input_activation_args(config)
    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**compressed_tensors.weight_args(config)),
                              input_activations=QuantizationArgs(**inputs) if inputs else None)


def local(tensors: dict[str, torch.Tensor], module: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(f"{module}."): v for k, v in tensors.items()}


def reference_compressor() -> Any:
    from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor

    return IntQuantizationCompressor


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_bytes_equal_compressed_tensors_compressor(settings: dict[str, Any]) -> None:
    from compressed_tensors.compressors.format import infer_module_format

    config = make_config(**settings)
    # float32: quantkit divides by the scale in float32, compressed-tensors in the weight's dtype
    weight = torch.randn(48, 96, generator=torch.Generator().manual_seed(0)) * 0.05
    quantized = SCHEMES.get(config.method).quantize(weight, config)
    assert isinstance(quantized, IntQuantized)
    scheme = scheme_of(config)
    assert infer_module_format(torch.nn.Linear, scheme).value == compressed_tensors.module_format(config)
    ours = local(compressed_tensors.encode("m", quantized), "m")
    state = {"weight": weight, "weight_scale": quantized.scale}
    if quantized.zero_point is not None:
        state["weight_zero_point"] = quantized.zero_point.to(torch.int8)
    theirs = reference_compressor().compress(state, scheme)
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name
    decompressed = reference_compressor().decompress(ours, scheme)["weight"]
    assert decompressed.dtype == quantized.scale.dtype
    assert torch.equal(decompressed, quantized.dequantize())
    args = compressed_tensors.weight_args(config)
    assert torch.equal(compressed_tensors.decode(ours, args), quantized.dequantize())


@pytest.fixture(scope="module")
def w8a8_outputs(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Dense and MoE W8A8 (INT8 per-channel weights, dynamic INT8 inputs)."""
    root = tmp_path_factory.mktemp("w8a8")
    for name in ("llama", "qwen2_moe"):
        quantize(tiny_models[name], get_preset("int8").with_default(activations="dynamic"), root / name,
                 options=QuantizeOptions(show_progress=False))
    return {name: root / name for name in ("llama", "qwen2_moe")}


@pytest.mark.parametrize("name", ["llama", "qwen2_moe"])
def test_whole_output_decompresses_to_quantkit_weights(w8a8_outputs: dict[str, Path], name: str) -> None:
    from compressed_tensors.quantization import QuantizationConfig

    out = w8a8_outputs[name]
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "int-quantized"
    parsed = QuantizationConfig.model_validate(config)  # compressed-tensors accepts the config as written
    checkpoint = Checkpoint.open(out)
    ours = dequantized_state(checkpoint)
    modules = compressed_tensors.quantized_modules(checkpoint.tensors)
    assert modules and all(s == compressed_tensors.INT_SUFFIXES for s in modules.values())
    groups = compressed_tensors.module_args(config)
    for module, suffixes in modules.items():
        tensors = {s: checkpoint.get(f"{module}.{s}") for s in suffixes if f"{module}.{s}" in checkpoint}
        assert tensors["weight"].dtype == torch.int8
        (group,) = [g for g in parsed.config_groups.values()
                    if g.weights.model_dump() == g.weights.model_validate(
                        compressed_tensors.args_for(module, groups)).model_dump()]
        theirs = reference_compressor().decompress(tensors, group)["weight"]
        assert torch.equal(theirs, ours[f"{module}.weight"]), module


def test_mixed_precision_config(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """W8A8 attention with W4A16 experts: one group per format, the config's format mixed-precision;
    transformers loads it (its routed experts are packed), quantkit's loader reads it."""
    from compressed_tensors.compressors.format import infer_module_format

    recipe = recipe_from_dict({
        "version": 1, "default": {"method": "absmax", "bits": 4, "group_size": 16}, "ignore": ["role:lm_head"],
        "rules": [{"match": ["role:attention"], "method": "absmax", "bits": 8, "granularity": "channel",
                   "activations": "dynamic"}]})
    out = tmp_path / "mixed"
    quantize(tiny_models["qwen2_moe"], recipe, out, options=QuantizeOptions(show_progress=False))
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    formats = {g["format"] for g in config["config_groups"].values()}
    assert formats == {"int-quantized", "pack-quantized"} and config["format"] == "mixed-precision"
    for group in config["config_groups"].values():
        from compressed_tensors.quantization import QuantizationScheme

        scheme = QuantizationScheme.model_validate(group)
        assert infer_module_format(torch.nn.Linear, scheme).value == group["format"]
    import transformers

    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        client = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        client.set_experts_implementation("eager")
        client_logits, our_logits = client(ids).logits, load_quantized(out, dtype=torch.float32)(ids).logits
    assert torch.allclose(client_logits, our_logits, rtol=0, atol=1e-5)  # transformers loads mixed-precision


def test_group_act_order_with_activations_is_refused(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    recipe = get_preset("int8").with_default(method="gptq", act_order=True, group_size=16, activations="dynamic")
    plan = make_plan(Checkpoint.open(tiny_models["llama"]), recipe)
    with pytest.raises(QuantkitError, match="int-quantized"):
        OUTPUT_FORMATS.get("compressed-tensors").check(plan)


def test_plain_transformers_loads_dense_int_quantized(w8a8_outputs: dict[str, Path]) -> None:
    """transformers decompresses int-quantized with compressed-tensors: logits equal quantkit's loader exactly."""
    import transformers

    out = w8a8_outputs["llama"]
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        client = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        assert torch.equal(client(ids).logits, load_quantized(out, dtype=torch.float32)(ids).logits)


def test_plain_transformers_cannot_load_int_quantized_experts(w8a8_outputs: dict[str, Path]) -> None:
    """A recorded limit (docs/formats.md): transformers (5.25) fuses routed experts while loading and
    decompresses only packed or FP8 experts, so int8 expert weights fail its conversion."""
    import transformers

    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()), \
            pytest.raises(RuntimeError, match="conversion"):
        transformers.AutoModelForCausalLM.from_pretrained(w8a8_outputs["qwen2_moe"], dtype=torch.float32)
