"""Schemes: code ranges, exactness where promised, error bounds per bit width, bits per weight."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.schemes import SCHEMES, CastTensor, IntQuantized, make_config
from quantkit.schemes.grid import absmax_range


def gaussian(shape: tuple[int, int] = (64, 256), seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def quantize(weight: torch.Tensor, **kwargs: object) -> IntQuantized:
    config = make_config(str(kwargs.pop("method"))).with_updates(**kwargs)
    config.validate()
    result = SCHEMES.get(config.method).quantize(weight, config)
    assert isinstance(result, IntQuantized)
    return result


def rel_error(weight: torch.Tensor, q: IntQuantized) -> float:
    return float((weight - q.dequantize().float()).norm() / weight.norm())


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("mode", ["restricted", "full"])
def test_absmax_codes_stay_in_range(bits: int, mode: str) -> None:
    q = quantize(gaussian(), method="absmax", bits=bits, range=mode)
    qmin, qmax = absmax_range(bits, mode)
    assert (qmin, qmax) == ((-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if mode == "restricted"
                            else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1))
    assert int(q.codes.min()) >= qmin and int(q.codes.max()) <= qmax
    assert q.zero_point is None


def test_absmax_restricted_reproduces_row_extremes_exactly() -> None:
    w = gaussian()
    q = quantize(w, method="absmax", bits=4)
    row_max = w.abs().argmax(dim=1)
    rows = torch.arange(w.shape[0])
    assert torch.allclose(q.dequantize()[rows, row_max], w[rows, row_max], rtol=1e-6)
    assert set(q.codes.abs().amax(dim=1).tolist()) == {7}


def test_absmax_full_range_uses_the_extra_negative_code() -> None:
    # full 4-bit: scale = absmax / 7.5 (PyTorch's and compressed-tensors' convention), so
    # -absmax lands on -7.5 steps and rounds half-to-even to the extra code -8; +absmax clips to 7
    w = torch.tensor([[-7.5, 7.5, 0.5, -3.0]])
    q = quantize(w, method="absmax", bits=4, range="full", granularity="tensor")
    assert float(q.scale) == 1.0
    assert q.codes.tolist() == [[-8, 7, 0, -3]]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_zeropoint_keeps_zero_exact_and_codes_in_range(bits: int, granularity: str) -> None:
    w = gaussian() + 0.5  # offset so the grid is truly asymmetric
    w[0, :7] = 0.0
    q = quantize(w, method="zeropoint", bits=bits, granularity=granularity,
                 group_size=32 if granularity == "group" else None)
    assert q.zero_point is not None
    assert int(q.codes.min()) >= -(2 ** (bits - 1)) and int(q.codes.max()) <= 2 ** (bits - 1) - 1
    assert torch.equal(q.dequantize()[0, :7], torch.zeros(7))


@pytest.mark.parametrize("method", ["absmax", "zeropoint"])
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("group_size", [None, 32])
def test_error_within_uniform_quantization_bound(method: str, bits: int, group_size: int | None) -> None:
    """||W-Q||² is at most the uniform-noise estimate Σ step²/12 (plus 10%) — rounding error only."""
    w = gaussian()
    q = quantize(w, method=method, bits=bits, group_size=group_size)
    per_weight_step = q.scale.float().repeat_interleave(w.shape[1] // q.scale.shape[1], dim=1)
    bound = math.sqrt(float((per_weight_step**2 / 12).sum()) * 1.10)
    assert float((w - q.dequantize()).norm()) <= bound


@pytest.mark.parametrize("method", ["absmax", "zeropoint"])
def test_error_shrinks_with_bits_and_finer_groups(method: str) -> None:
    w = gaussian()
    by_bits = [rel_error(w, quantize(w, method=method, bits=b)) for b in range(2, 9)]
    assert all(a > b for a, b in itertools.pairwise(by_bits))
    tensor = rel_error(w, quantize(w, method=method, bits=4, granularity="tensor"))
    channel = rel_error(w, quantize(w, method=method, bits=4))
    group = rel_error(w, quantize(w, method=method, bits=4, group_size=16))
    assert tensor > channel > group


def test_dequantize_matches_the_textbook_formula() -> None:
    w = gaussian(dtype=torch.bfloat16)
    q = quantize(w, method="zeropoint", bits=3, group_size=64)
    assert q.scale.dtype == torch.bfloat16  # scales stored in the weight's dtype
    codes = q.codes.reshape(64, 4, 64).to(torch.bfloat16)
    assert q.zero_point is not None
    expected = ((codes - q.zero_point.to(torch.bfloat16)[..., None]) * q.scale[..., None]).reshape(64, 256)
    assert torch.equal(q.dequantize(), expected)


@pytest.mark.parametrize(
    ("method", "bits", "group_size", "dtype", "expected"),
    [
        ("absmax", 4, 128, torch.float16, 4 + 16 / 128),
        ("zeropoint", 4, 128, torch.bfloat16, 4 + (16 + 4) / 128),
        ("absmax", 8, None, torch.float32, 8 + 32 / 256),
        ("zeropoint", 2, 32, torch.float16, 2 + (16 + 2) / 32),
    ],
)
def test_bits_per_weight_counts_scales_and_zero_points(
    method: str, bits: int, group_size: int | None, dtype: torch.dtype, expected: float
) -> None:
    w = gaussian(dtype=dtype)
    q = quantize(w, method=method, bits=bits, group_size=group_size)
    assert q.bits_per_weight == pytest.approx(expected)
    assert q.config.bits_per_weight((64, 256), dtype.itemsize * 8) == pytest.approx(expected)


@pytest.mark.parametrize(("method", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_cast_schemes(method: str, dtype: torch.dtype) -> None:
    w = gaussian()
    result = SCHEMES.get(method).quantize(w, make_config(method))
    assert isinstance(result, CastTensor)
    assert result.tensor.dtype == dtype and result.bits_per_weight == 16
    assert torch.equal(result.dequantize(), w.to(dtype))


def test_all_zero_weight_quantizes_to_zero() -> None:
    w = torch.zeros(4, 64)
    for method in ("absmax", "zeropoint"):
        assert torch.equal(quantize(w, method=method, bits=4).dequantize(), w)


@pytest.mark.parametrize("bits", [1, 9, 16])
def test_bits_out_of_range_rejected(bits: int) -> None:
    with pytest.raises(QuantkitError, match="bits must be between 2 and 8"):
        make_config("absmax", bits=bits).validate()


def test_group_size_need_not_divide_the_row() -> None:
    config = make_config("zeropoint").with_updates(group_size=48)
    config.check_shape("layer.weight", (8, 64))  # the last group of each row has 16 columns
    assert config.partial_group(64) == 16 and config.partial_group(96) is None
    assert config.partial_group(40) == 40  # a row shorter than the group is one group


def test_unknown_method_lists_the_known_ones() -> None:
    known = "absmax, bf16, fp16, gptq, kquant, ternary, zeropoint"
    with pytest.raises(QuantkitError, match=f"unknown method 'gptq9'; supported: {known}"):
        SCHEMES.get("gptq9")
