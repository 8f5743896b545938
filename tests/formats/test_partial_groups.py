"""Partial last groups in the output formats (issue 15, item 1).

compressed-tensors stores ``weight_scale`` with ``ceil(in/g)`` columns (its own initializer allocates
that many), but its decompressor (``forward_helpers._process_group``, compressed-tensors 0.20) refuses
a group size that does not divide the row. The test below records that refusal and checks that the
stored bytes mean quantkit's weights: padded with zero codes to whole groups (what its block strategy
does for partial blocks), compressed-tensors' own decompressor gives exactly quantkit's weights. GPTQ v1
stores ``g_idx = column // g`` and is checked against AutoGPTQ's dequantization.
"""

from __future__ import annotations

import math

import pytest
import torch

from quantkit.formats import compressed_tensors, gptq_v1
from quantkit.formats.packing import pack_int32, unpack_int32
from quantkit.schemes import SCHEMES, IntQuantized, make_config
from quantkit.schemes.gptq_solver import gptq_quantize
from tests.formats.test_gptq_formats import autogptq_dequantize, parts
from tests.schemes.test_gptq_solver import correlated_inputs, gaussian_weight, hessian_of

SHAPES = [(16, 96, 64), (8, 40, 64), (24, 176, 32)]  # 64 + 32; one group shorter than g; 5 x 32 + 16


def quantized_weight(method: str, shape: tuple[int, int, int], *, act_order: bool = False) -> IntQuantized:
    rows, columns, group = shape
    weight = gaussian_weight(rows, columns, seed=columns, dtype=torch.float16)
    if method == "gptq":
        hessian = hessian_of(correlated_inputs(256, columns, seed=columns))
        result = gptq_quantize(weight, hessian, bits=4, group_size=group, act_order=act_order)
        config = make_config("gptq", bits=4, group_size=group, act_order=act_order)
        return IntQuantized(result.codes, result.scale, result.zero_point, config, result.g_idx)  # type: ignore[arg-type]
    config = make_config(method, bits=4, group_size=group)
    quantized = SCHEMES.get(method).quantize(weight, config)
    assert isinstance(quantized, IntQuantized)
    return quantized


def decompressor(tensors: dict[str, torch.Tensor], weights: dict[str, object]) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights))
    return PackedQuantizationCompressor.decompress(dict(tensors), scheme)["weight"]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", ["absmax", "zeropoint", "gptq"])
def test_compressed_tensors_partial_group(method: str, shape: tuple[int, int, int]) -> None:
    pytest.importorskip("compressed_tensors")
    rows, columns, group = shape
    quantized = quantized_weight(method, shape)
    n_groups = math.ceil(columns / group)
    weights = compressed_tensors.weight_args(quantized.config)
    tensors = parts(compressed_tensors.encode("m", quantized), "m")
    assert tensors["weight_scale"].shape == (rows, n_groups)
    assert "weight_g_idx" not in tensors
    ours = compressed_tensors.decode(tensors, weights)
    assert torch.equal(ours, quantized.dequantize())

    if columns % group:  # compressed-tensors' decompressor refuses the partial group
        with pytest.raises(ValueError, match="must be divisble by the given group_size"):
            decompressor(tensors, weights)
    # padded with zero codes to whole groups, its decompressor gives exactly our weights
    bits = quantized.config.bits
    padded_codes = torch.zeros(rows, n_groups * group, dtype=torch.int8)
    padded_codes[:, :columns] = unpack_int32(tensors["weight_packed"], bits, (rows, columns))
    padded = dict(tensors, weight_packed=pack_int32(padded_codes, bits),
                  weight_shape=torch.tensor([rows, n_groups * group]))
    assert torch.equal(decompressor(padded, weights)[:, :columns], ours)


@pytest.mark.parametrize("shape", SHAPES)
def test_compressed_tensors_act_order_partial_group(shape: tuple[int, int, int]) -> None:
    _, columns, group = shape
    quantized = quantized_weight("gptq", shape, act_order=True)
    tensors = parts(compressed_tensors.encode("m", quantized), "m")
    g_idx = tensors["weight_g_idx"]
    counts = torch.bincount(g_idx.to(torch.long)).tolist()
    assert counts == [group] * (columns // group) + ([columns % group] if columns % group else [])
    assert torch.equal(compressed_tensors.decode(tensors, compressed_tensors.weight_args(quantized.config)),
                       quantized.dequantize())
    uneven = g_idx.clone()
    uneven[0] = (int(uneven[0]) + 1) % math.ceil(columns / group)
    if columns > group:
        with pytest.raises(ValueError, match="exactly"):
            compressed_tensors.encode("m", IntQuantized(quantized.codes, quantized.scale, quantized.zero_point,
                                                        quantized.config, uneven))


@pytest.mark.parametrize("shape", [(16, 96, 64), (32, 160, 48), (8, 32, 64)])
@pytest.mark.parametrize("method", ["absmax", "zeropoint", "gptq", "gptq-act-order"])
def test_gptq_v1_partial_group(method: str, shape: tuple[int, int, int]) -> None:
    rows, columns, group = shape
    act_order = method == "gptq-act-order"
    quantized = quantized_weight(method.removesuffix("-act-order"), shape, act_order=act_order)
    if quantized.zero_point is not None:  # v1 cannot store the lowest zero point (a separate restriction)
        quantized.zero_point = quantized.zero_point.clamp(min=-7)
    tensors = parts(gptq_v1.encode("m", quantized), "m")
    n_groups = math.ceil(columns / group)
    assert tensors["scales"].shape == (n_groups, rows)
    assert tensors["qzeros"].shape == (n_groups, rows * 4 // 32)
    if act_order:
        assert quantized.g_idx is not None and torch.equal(tensors["g_idx"], quantized.g_idx)
    else:
        assert torch.equal(tensors["g_idx"], torch.arange(columns, dtype=torch.int32) // group)
    reference = autogptq_dequantize(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], 4)
    assert torch.equal(gptq_v1.decode(tensors, 4), reference)
    assert torch.equal(reference, quantized.dequantize())
