"""GPTQ output formats: act-order ``g_idx`` in compressed-tensors, and GPTQ v1 (AutoGPTQ layout).

Independent references: a literal port of AutoGPTQ's numpy ``QuantLinear.pack`` loop and of its
torch dequantization (``qlinear_cuda_old``, with vLLM's ``g_idx`` gather) for GPTQ v1;
compressed-tensors' own ``PackedQuantizationCompressor`` for ``weight_g_idx``.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from quantkit.errors import QuantkitError
from quantkit.formats import compressed_tensors, gptq_v1
from quantkit.formats.load import dequantized_state, load_quantized
from quantkit.formats.packing import unpack_int32
from quantkit.model.archs import get_arch
from quantkit.model.checkpoint import Checkpoint
from quantkit.schemes import SCHEMES, IntConfig, IntQuantized, make_config
from tests.conftest import build_model, save_model

BITS = [2, 3, 4, 8]


def act_order_g_idx(in_features: int, group_size: int, seed: int) -> torch.Tensor:
    """GPTQ act-order's group map: the i-th column processed (perm[i]) joins group i // g."""
    perm = torch.randperm(in_features, generator=torch.Generator().manual_seed(seed))
    g_idx = torch.empty(in_features, dtype=torch.int32)
    g_idx[perm] = torch.arange(in_features, dtype=torch.int32) // group_size
    return g_idx


def random_quantized(
    bits: int,
    shape: tuple[int, int],
    group_size: int | None,
    *,
    symmetric: bool,
    act_order: bool = False,
    seed: int = 0,
    scale_dtype: torch.dtype = torch.float16,
    lowest_zero: bool = False,
) -> IntQuantized:
    """Random codes, scales and zero points as a GPTQ scheme makes them (``group_size`` None: per channel)."""
    g = torch.Generator().manual_seed(seed)
    out_features, in_features = shape
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    n_groups = in_features // group_size if group_size else 1
    codes = torch.randint(qmin, qmax + 1, shape, generator=g, dtype=torch.int8)
    scale = (torch.rand(out_features, n_groups, generator=g) * 0.02 + 1e-3).to(scale_dtype)
    zero = None if symmetric else torch.randint(
        qmin if lowest_zero else qmin + 1, qmax + 1, (out_features, n_groups), generator=g, dtype=torch.int8
    )
    config = make_config("gptq", bits=bits, granularity="group" if group_size else "channel",
                          group_size=group_size, symmetric=symmetric, act_order=act_order)
    g_idx = act_order_g_idx(in_features, group_size, seed) if act_order and group_size else None
    return IntQuantized(codes, scale, zero, config, g_idx)


def parts(tensors: dict[str, torch.Tensor], module: str) -> dict[str, torch.Tensor]:
    return {name.removeprefix(module + "."): t for name, t in tensors.items()}


# --- GPTQ v1 packing -------------------------------------------------------------------------

# (out, in) with in * b and out * b whole int32 words; several have in (or out) not a multiple of 32
SHAPES = {2: [(16, 48), (32, 64), (48, 16)], 3: [(32, 32), (64, 96)], 4: [(8, 40), (24, 72), (32, 128)],
          8: [(4, 36), (12, 20), (32, 64)]}


@pytest.mark.parametrize(("bits", "shape"), [(b, s) for b in BITS for s in SHAPES[b]])
@pytest.mark.parametrize("symmetric", [True, False])
def test_v1_round_trip_is_exact(bits: int, shape: tuple[int, int], symmetric: bool) -> None:
    out_features, in_features = shape
    group_size = 4 if in_features % 4 == 0 and in_features > 16 else None
    quantized = random_quantized(bits, shape, group_size, symmetric=symmetric, seed=bits)
    tensors = parts(gptq_v1.encode("m", quantized), "m")
    n_groups = in_features // group_size if group_size else 1
    assert tensors["qweight"].shape == (in_features * bits // 32, out_features)
    assert tensors["qzeros"].shape == (n_groups, out_features * bits // 32)
    assert tensors["scales"].shape == (n_groups, out_features) and tensors["scales"].dtype == torch.float16
    assert torch.equal(tensors["g_idx"], torch.arange(in_features, dtype=torch.int32) // (group_size or in_features))
    assert all(t.dtype == torch.int32 for k, t in tensors.items() if k != "scales")
    unsigned = unpack_int32(tensors["qweight"], bits, (in_features, out_features), dim=0).T
    assert torch.equal(unsigned, quantized.codes)
    assert torch.equal(gptq_v1.decode(tensors, bits), quantized.dequantize())


@pytest.mark.parametrize(("bits", "shape"), [(3, (32, 40)), (4, (32, 36)), (4, (20, 64)), (2, (16, 40)), (5, (32, 32))])
def test_v1_rejects_partial_words(bits: int, shape: tuple[int, int]) -> None:
    quantized = random_quantized(bits, shape, None, symmetric=True)
    with pytest.raises(QuantkitError, match="GPTQ v1"):
        gptq_v1.encode("m", quantized)


def test_v1_rejects_the_zero_point_it_cannot_store() -> None:
    quantized = random_quantized(4, (32, 64), 16, symmetric=False, lowest_zero=True)
    assert bool((quantized.zero_point == -8).any())  # type: ignore[union-attr]
    with pytest.raises(QuantkitError, match="unsigned 0"):
        gptq_v1.encode("m", quantized)


def autogptq_pack(intweight: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ ``qlinear_cuda_old.QuantLinear.pack``: the qweight loop, verbatim (rows = input dim)."""
    i = 0
    row = 0
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    while row < qweight.shape[0]:
        if bits in [2, 4, 8]:
            for j in range(i, i + (32 // bits)):
                qweight[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        elif bits == 3:
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << 30
            row += 1
            qweight[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << 31
            row += 1
            qweight[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return qweight.astype(np.int32)


def autogptq_pack_zeros(zeros: np.ndarray, bits: int) -> np.ndarray:
    """The qzeros loop of the same ``pack``, verbatim (``zeros`` already ``zeros - 1``, as uint32)."""
    qzeros = np.zeros((zeros.shape[0], zeros.shape[1] // 32 * bits), dtype=np.uint32)
    i = 0
    col = 0
    while col < qzeros.shape[1]:
        if bits in [2, 4, 8]:
            for j in range(i, i + (32 // bits)):
                qzeros[:, col] |= zeros[:, j] << (bits * (j - i))
            i += 32 // bits
            col += 1
        elif bits == 3:
            for j in range(i, i + 10):
                qzeros[:, col] |= zeros[:, j] << (3 * (j - i))
            i += 10
            qzeros[:, col] |= zeros[:, i] << 30
            col += 1
            qzeros[:, col] |= (zeros[:, i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qzeros[:, col] |= zeros[:, j] << (3 * (j - i) + 1)
            i += 10
            qzeros[:, col] |= zeros[:, i] << 31
            col += 1
            qzeros[:, col] |= (zeros[:, i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qzeros[:, col] |= zeros[:, j] << (3 * (j - i) + 2)
            i += 10
            col += 1
    return qzeros.astype(np.int32)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_v1_bytes_equal_autogptq_pack(bits: int, symmetric: bool) -> None:
    quantized = random_quantized(bits, (64, 96), 32, symmetric=symmetric, seed=10 + bits)
    tensors = parts(gptq_v1.encode("m", quantized), "m")
    half = 2 ** (bits - 1)
    intweight = (quantized.codes.to(torch.int64) + half).T.numpy().astype(np.uint32)  # [in, out], unsigned
    zero_point = torch.zeros(64, 3) if quantized.zero_point is None else quantized.zero_point
    zero = zero_point.T.numpy().astype(np.int64)
    zero_u = zero + half
    assert np.array_equal(tensors["qweight"].numpy(), autogptq_pack(intweight, bits))
    assert np.array_equal(tensors["qzeros"].numpy(), autogptq_pack_zeros((zero_u - 1).astype(np.uint32), bits))


def autogptq_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                        bits: int) -> torch.Tensor:
    """AutoGPTQ's torch dequantization (``qlinear_cuda_old.forward``) with vLLM's ``g_idx`` gather; ``[out, in]``."""
    if bits in [2, 4, 8]:
        wf = torch.tensor(list(range(0, 32, bits)), dtype=torch.int32).unsqueeze(0)
        zeros = torch.bitwise_right_shift(torch.unsqueeze(qzeros, 2).expand(-1, -1, 32 // bits),
                                          wf.unsqueeze(0)).to(torch.int16 if bits == 8 else torch.int8)
        zeros = torch.bitwise_and(zeros, (2 ** bits) - 1)
        zeros = zeros + 1
        zeros = zeros.reshape(scales.shape)
        weight = torch.bitwise_right_shift(torch.unsqueeze(qweight, 1).expand(-1, 32 // bits, -1),
                                           wf.unsqueeze(-1)).to(torch.int16 if bits == 8 else torch.int8)
        weight = torch.bitwise_and(weight, (2 ** bits) - 1)
    else:
        wf = torch.tensor([[0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 0],
                           [0, 1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31],
                           [0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 0]], dtype=torch.int32).reshape(1, 3, 12)
        zeros = qzeros.reshape(qzeros.shape[0], qzeros.shape[1] // 3, 3, 1).expand(-1, -1, -1, 12)
        zeros = zeros >> wf.unsqueeze(0)
        zeros[:, :, 0, 10] = (zeros[:, :, 0, 10] & 0x3) | ((zeros[:, :, 1, 0] << 2) & 0x4)
        zeros[:, :, 1, 11] = (zeros[:, :, 1, 11] & 0x1) | ((zeros[:, :, 2, 0] << 1) & 0x6)
        zeros = zeros & 0x7
        zeros = torch.cat([zeros[:, :, 0, :11], zeros[:, :, 1, 1:12], zeros[:, :, 2, 1:11]], dim=2)
        zeros = zeros + 1
        zeros = zeros.reshape(scales.shape)
        weight = qweight.reshape(qweight.shape[0] // 3, 3, 1, qweight.shape[1]).expand(-1, -1, 12, -1)
        weight = (weight >> wf.unsqueeze(-1)) & 0x7
        weight[:, 0, 10] = (weight[:, 0, 10] & 0x3) | ((weight[:, 1, 0] << 2) & 0x4)
        weight[:, 1, 11] = (weight[:, 1, 11] & 0x1) | ((weight[:, 2, 0] << 1) & 0x6)
        weight = weight & 0x7
        weight = torch.cat([weight[:, 0, :11], weight[:, 1, 1:12], weight[:, 2, 1:11]], dim=1)
    weight = weight.reshape(weight.shape[0] * weight.shape[1], weight.shape[2])
    return (scales[g_idx.long()] * (weight - zeros[g_idx.long()])).T


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_v1_decode_equals_autogptq_dequantization(bits: int, symmetric: bool, act_order: bool) -> None:
    quantized = random_quantized(bits, (64, 128), 32, symmetric=symmetric, act_order=act_order, seed=bits)
    tensors = parts(gptq_v1.encode("m", quantized), "m")
    reference = autogptq_dequantize(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], bits)
    assert reference.dtype == torch.float16
    assert torch.equal(gptq_v1.decode(tensors, bits), reference)
    assert torch.equal(reference, quantized.dequantize())


@pytest.mark.parametrize("method", ["absmax", "absmax-full", "zeropoint"])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_v1_decode_equals_scheme_dequantization(method: str, granularity: str) -> None:
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(1)).to(torch.float16) * 0.05
    name, _, rng = method.partition("-")
    grid_range = {"range": "full" if rng else "restricted"} if name == "absmax" else {}
    config = make_config(name, bits=4, granularity=granularity, group_size=32 if granularity == "group" else None,
                         **grid_range)
    quantized = SCHEMES.get(name).quantize(weight, config)
    assert isinstance(quantized, IntQuantized)
    tensors = parts(gptq_v1.encode("m", quantized), "m")
    assert torch.equal(gptq_v1.decode(tensors, 4), quantized.dequantize())


def test_v1_stores_fp16_scales() -> None:
    quantized = random_quantized(4, (32, 64), 32, symmetric=False, scale_dtype=torch.bfloat16)
    decoded = gptq_v1.decode(parts(gptq_v1.encode("m", quantized), "m"), 4)
    rounded = IntQuantized(quantized.codes, quantized.scale.to(torch.float16), quantized.zero_point, quantized.config)
    assert decoded.dtype == torch.float16
    assert torch.equal(decoded, rounded.dequantize())


def test_v2_zero_points_have_no_offset() -> None:
    quantized = random_quantized(4, (32, 64), 16, symmetric=False)
    assert quantized.zero_point is not None
    zero = quantized.zero_point.clamp(max=6)  # z + 1 stays a 4-bit value
    quantized.zero_point = zero
    tensors = parts(gptq_v1.encode("m", quantized), "m")
    stored_u = unpack_int32(tensors["qzeros"], 4, (4, 32)).to(torch.int16) + 8
    assert torch.equal(stored_u, (zero.to(torch.int16) + 8).T - 1)  # v1: z_u - 1
    shifted = IntQuantized(quantized.codes, quantized.scale, zero + 1, quantized.config)
    v2 = dict(tensors, qzeros=gptq_v1.encode("m", shifted)["m.qzeros"])  # v2: z_u itself
    assert torch.equal(gptq_v1.decode(v2, 4, "gptq_v2"), quantized.dequantize())


# --- compressed-tensors with act-order g_idx ---------------------------------------------------

def compressed_tensors_reference(tensors: dict[str, torch.Tensor], weights: dict[str, object]) -> torch.Tensor:
    """compressed-tensors' own decompression of one module.

    compressed-tensors <= 0.18 applies ``weight_g_idx`` itself (``actorder: "group"``). 0.19
    removed that option, so with a newer version the test runs 0.18's algorithm on its own code:
    sort the columns by g_idx (its ``_process_group``: ``perm = argsort(g_idx)``), decompress the
    sorted bytes with contiguous groups, and undo the sort.
    """
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    try:
        scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights))
        native = "weight_g_idx" in PackedQuantizationCompressor.compression_param_names(scheme)
    except ValueError:  # actorder="group" rejected (compressed-tensors >= 0.19)
        native = False
    if native:
        return PackedQuantizationCompressor.decompress(dict(tensors), scheme)["weight"]
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        **{k: v for k, v in weights.items() if k != "actorder"}))
    bits = int(weights["num_bits"])  # type: ignore[call-overload]
    shape = tuple(int(x) for x in tensors["weight_shape"])
    perm = torch.argsort(tensors["weight_g_idx"])
    codes = unpack_from_int32(tensors["weight_packed"], bits, torch.Size(shape))[:, perm]
    sorted_parts = {k: v for k, v in tensors.items() if k != "weight_g_idx"}
    sorted_parts["weight_packed"] = pack_to_int32(codes, bits)
    return PackedQuantizationCompressor.decompress(sorted_parts, scheme)["weight"][:, torch.argsort(perm)]


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_compressed_tensors_g_idx_matches_its_decompressor(bits: int, symmetric: bool) -> None:
    pytest.importorskip("compressed_tensors")
    quantized = random_quantized(bits, (48, 128), 32, symmetric=symmetric, act_order=True, seed=bits)
    quantized.zero_point = None if symmetric else torch.randint(  # compressed-tensors takes every zero point
        -(2 ** (bits - 1)), 2 ** (bits - 1), (48, 4), generator=torch.Generator().manual_seed(3), dtype=torch.int8)
    weights = compressed_tensors.weight_args(quantized.config)
    assert weights["actorder"] == "group" and weights["symmetric"] == symmetric
    tensors = parts(compressed_tensors.encode("m", quantized), "m")
    assert tensors["weight_g_idx"].dtype == torch.int32
    assert quantized.g_idx is not None and torch.equal(tensors["weight_g_idx"], quantized.g_idx)
    ours = compressed_tensors.decode(tensors, weights)
    assert torch.equal(ours, quantized.dequantize())
    assert not torch.equal(ours, IntQuantized(quantized.codes, quantized.scale, quantized.zero_point,
                                              quantized.config).dequantize())  # g_idx matters
    assert torch.equal(compressed_tensors_reference(tensors, weights), ours)


def test_compressed_tensors_writes_g_idx_only_for_group_act_order() -> None:
    plain = random_quantized(4, (32, 64), 16, symmetric=True)
    assert "m.weight_g_idx" not in compressed_tensors.encode("m", plain)
    assert "actorder" not in compressed_tensors.weight_args(plain.config)
    static = plain.config.with_updates(act_order=True, static_groups=True)
    trivial = IntQuantized(plain.codes, plain.scale, None, static, torch.arange(64, dtype=torch.int32) // 16)
    assert "m.weight_g_idx" not in compressed_tensors.encode("m", trivial)
    assert compressed_tensors.weight_args(static)["actorder"] == "weight"
    scattered = random_quantized(4, (32, 64), 16, symmetric=True, act_order=True)
    assert scattered.g_idx is not None
    grid_only = IntQuantized(plain.codes, plain.scale, None, plain.config, scattered.g_idx)  # a solver's own config
    assert torch.equal(compressed_tensors.encode("m", grid_only)["m.weight_g_idx"], scattered.g_idx)
    uneven = torch.zeros(64, dtype=torch.int32)
    with pytest.raises(ValueError, match="exactly 16 columns"):
        compressed_tensors.encode("m", IntQuantized(plain.codes, plain.scale, None, scattered.config, uneven))


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_both_formats_decode_identically(bits: int, symmetric: bool, act_order: bool) -> None:
    quantized = random_quantized(bits, (64, 128), 32, symmetric=symmetric, act_order=act_order, seed=bits + 1)
    ct = compressed_tensors.decode(parts(compressed_tensors.encode("m", quantized), "m"),
                                   compressed_tensors.weight_args(quantized.config))
    v1 = gptq_v1.decode(parts(gptq_v1.encode("m", quantized), "m"), bits)
    assert torch.equal(ct, v1)
    assert torch.equal(v1, quantized.dequantize())


# --- GPTQ quantization_config and the loader ---------------------------------------------------

def test_quantization_config_base_dynamic_and_float_modules() -> None:
    g128 = make_config("gptq", bits=4, granularity="group", group_size=128, act_order=True, damp=0.02)
    eight = make_config("absmax", bits=8, granularity="channel")
    assignments = {f"model.layers.{i}.mlp.experts.{e}.{p}": g128 for i in range(2) for e in range(4)
                   for p in ("gate_proj", "up_proj", "down_proj")}
    assignments |= {f"model.layers.{i}.self_attn.{p}": eight for i in range(2) for p in ("q_proj", "o_proj")}
    floats = ["lm_head", "model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    config = gptq_v1.quantization_config(assignments, floats)
    assert {k: config[k] for k in ("quant_method", "checkpoint_format", "bits", "group_size", "desc_act", "sym",
                                   "static_groups", "damp_percent", "lm_head", "pack_dtype")} == {
        "quant_method": "gptq", "checkpoint_format": "gptq", "bits": 4, "group_size": 128, "desc_act": True,
        "sym": False, "static_groups": False, "damp_percent": 0.02, "lm_head": False, "pack_dtype": "int32"}
    assert config["dynamic"] == {
        "-:^lm_head$": {},
        r"-:^model\.layers\.\d+\.mlp\.gate$": {},
        r"+:^model\.layers\.\d+\.self_attn\.o_proj$": {"bits": 8, "group_size": -1, "sym": True, "desc_act": False},
        r"+:^model\.layers\.\d+\.self_attn\.q_proj$": {"bits": 8, "group_size": -1, "sym": True, "desc_act": False},
    }
    assert config["meta"]["quantizer"][0].startswith("quantkit:")
    assert gptq_v1.module_args(config, "model.layers.1.self_attn.q_proj") == {
        "bits": 8, "group_size": -1, "sym": True, "desc_act": False}
    assert gptq_v1.module_args(config, "model.layers.1.mlp.experts.3.down_proj") == {
        "bits": 4, "group_size": 128, "sym": False, "desc_act": True}
    assert gptq_v1.module_args(config, "model.layers.1.mlp.gate") is None
    assert gptq_v1.quantize_config_json(config) == config
    json.dumps(config)
    transformers = pytest.importorskip("transformers")
    parsed = transformers.GPTQConfig.from_dict(config)  # transformers' own validation of the keys
    assert (parsed.bits, parsed.group_size, parsed.desc_act, parsed.sym, parsed.format) == (4, 128, True, False, "gptq")


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], config: dict[str, object]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("where", ["config.json", "quantize_config.json"])
def test_loader_reads_gptq_checkpoints(where: str, tmp_path: Path) -> None:
    four = random_quantized(4, (64, 128), 32, symmetric=False, act_order=True)
    three = random_quantized(3, (32, 64), None, symmetric=True, seed=5)
    tensors = gptq_v1.encode("model.a", four) | gptq_v1.encode("model.b", three)
    tensors["model.c.weight"] = torch.ones(4, 4)
    tensors["model.a.bias"] = torch.zeros(64, dtype=torch.float16)
    quant_config = gptq_v1.quantization_config({"model.a": four.config, "model.b": three.config}, ["model.c"])
    config: dict[str, object] = {"model_type": "llama"}
    if where == "config.json":
        config["quantization_config"] = quant_config
    path = write_checkpoint(tmp_path / "ckpt", tensors, config)
    if where == "quantize_config.json":
        legacy = {k: v for k, v in quant_config.items() if k not in ("quant_method", "checkpoint_format")}
        (path / gptq_v1.QUANTIZE_CONFIG_FILE).write_text(json.dumps(legacy))  # AutoGPTQ-era file
    state = dequantized_state(Checkpoint.open(path))
    assert set(state) == {"model.a.weight", "model.a.bias", "model.b.weight", "model.c.weight"}
    assert torch.equal(state["model.a.weight"], four.dequantize())
    assert torch.equal(state["model.b.weight"], three.dequantize())
    assert torch.equal(state["model.c.weight"], torch.ones(4, 4))


def test_load_quantized_reads_a_gptq_moe_model(tmp_path: Path) -> None:
    """A qwen2_moe model written as GPTQ v1 (routers in float) loads with exactly the dequantized weights."""
    source = save_model(build_model("qwen2_moe").to(torch.float16), tmp_path / "source")
    checkpoint = Checkpoint.open(source)
    arch = get_arch("qwen2_moe")
    config_g = make_config("zeropoint", bits=4, granularity="group", group_size=32)
    config_c = make_config("absmax", bits=8, granularity="channel")
    tensors: dict[str, torch.Tensor] = {}
    assignments: dict[str, IntConfig] = {}
    floats: list[str] = []
    expected: dict[str, torch.Tensor] = {}
    for name in checkpoint.tensors:
        weight = checkpoint.get(name)
        module = name.removesuffix(".weight")
        role = arch.role(name).value
        if name.endswith(".weight") and role in ("attention", "shared_expert", "routed_expert"):
            scheme = config_c if "self_attn" in name else config_g
            quantized = SCHEMES.get(scheme.method).quantize(weight, scheme)
            assert isinstance(quantized, IntQuantized)
            tensors |= gptq_v1.encode(module, quantized)
            assignments[module] = scheme
            expected[name] = quantized.dequantize()
        else:
            tensors[name] = weight
            if name.endswith(".weight") and weight.ndim == 2 and "embed" not in name and "norm" not in name:
                floats.append(module)
            expected[name] = weight
    assert any(m.endswith("mlp.gate") for m in floats)
    config = dict(checkpoint.config, quantization_config=gptq_v1.quantization_config(assignments, floats))
    out = write_checkpoint(tmp_path / "gptq", tensors, config)
    state = dequantized_state(Checkpoint.open(out))
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    with contextlib.redirect_stderr(io.StringIO()):
        model = load_quantized(out, dtype=torch.float32)
    memory = arch.to_memory_state({k: v.to(torch.float32) for k, v in expected.items()})
    params = dict(model.state_dict())
    assert all(torch.equal(params[k], v) for k, v in memory.items())
