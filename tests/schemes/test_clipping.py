"""Weight clipping (``--weight-clip``): mse is GPTQ's shrink-grid search, percentile is NumPy's, minmax is unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from quantkit.cli import app
from quantkit.errors import QuantkitError
from quantkit.recipe import recipe_from_dict
from quantkit.schemes import IntQuantized
from quantkit.schemes.clipping import MSE_NORM
from tests.schemes.test_gptq_solver import RefQuantizer, ref_quantize
from tests.schemes.test_schemes import quantize

KINDS = ["gaussian", "laplace", "outliers"]


# --- GPTQ's Quantizer (the literal port of IST-DASLab/gptq's quant.py in test_gptq_solver.py), for a 2-D weight
# with perchannel=True, weight=True: every row is one channel.


def gptq_find_params(
    x: torch.Tensor, bits: int, sym: bool, mse: bool = True, norm: float = 2.4, grid: int = 100, maxshrink: float = 0.8
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` per row, as ``Quantizer.configure(bits, perchannel=True, sym, mse)`` then ``find_params``."""
    quantizer = RefQuantizer()
    quantizer.configure(bits, perchannel=True, sym=sym, mse=mse, norm=norm, grid=grid, maxshrink=maxshrink)
    quantizer.find_params(x, weight=True)
    return quantizer.scale.reshape(-1), quantizer.zero.reshape(-1)


# --- helpers


def weights(kind: str, shape: tuple[int, int] = (64, 512), seed: int = 0) -> torch.Tensor:
    """Gaussian, Laplace (heavy tails) or Gaussian with 0.5% of entries blown up 25x (outliers)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "laplace":
        uniform = torch.rand(shape, generator=gen) * (1 - 2e-7) + 1e-7
        return torch.distributions.Laplace(0.0, 0.02).icdf(uniform)
    w = torch.randn(shape, generator=gen) * 0.02
    if kind == "outliers":
        w.view(-1)[torch.randint(0, w.numel(), (w.numel() // 200,), generator=gen)] *= 25
    return w


def as_rows(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Each group as one row: GPTQ's per-channel quantizer then sees exactly our groups."""
    return weight.reshape(-1, group_size or weight.shape[1])


def group_errors(weight: torch.Tensor, q: IntQuantized, group_size: int | None) -> torch.Tensor:
    """``sum |Q - W|^2.4`` per group, on the dequantization the checkpoint will hold."""
    diff = as_rows(q.dequantize().float(), group_size) - as_rows(weight.float(), group_size)
    return diff.abs().pow(MSE_NORM).sum(dim=1)


# --- (1) zeropoint + mse is GPTQ's asymmetric search


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 32, 128])
def test_zeropoint_mse_is_gptq_asymmetric(kind: str, bits: int, group_size: int | None) -> None:
    """Exactly equal, scale for scale and code for code.

    GPTQ's codes are unsigned ``[0, 2^b-1]``; ours are the same codes shifted by qmin = -2^(b-1),
    zero point included, so ``code - zero`` is identical. Scale and error go through the same
    float32 operations in the same order; qmin is even, so round-half-even commutes with the
    shift. Our zero ``round(qmin - low/scale)`` is GPTQ's ``qmin + round(-xmin/scale)`` as long as
    the float32 sum ``qmin - low/scale`` is exact, which Sterbenz's lemma guarantees when
    ``-low/scale >= 2^(b-2)`` (groups not mostly positive); the seeds here include such groups anyway.
    """
    w = weights(kind)
    q = quantize(w, method="zeropoint", bits=bits, group_size=group_size, clip="mse")
    rows = as_rows(w, group_size)
    scale, zero = gptq_find_params(rows.clone(), bits, sym=False)
    qmin = -(2 ** (bits - 1))
    assert q.zero_point is not None
    assert torch.equal(q.scale.reshape(-1), scale)
    assert torch.equal(q.zero_point.reshape(-1).float(), zero + qmin)
    gptq_codes = torch.clamp(torch.round(rows / scale[:, None]) + zero[:, None], 0, 2**bits - 1)
    assert torch.equal(as_rows(q.codes, group_size).float(), gptq_codes + qmin)
    assert torch.equal(as_rows(q.dequantize(), group_size), ref_quantize(rows, scale[:, None], zero[:, None],
                                                                            torch.tensor(2**bits - 1)))


# --- (2) absmax + mse: the full range is GPTQ's symmetric grid; the restricted one has no GPTQ twin


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 32, 128])
def test_absmax_full_mse_is_gptq_symmetric(kind: str, bits: int, group_size: int | None) -> None:
    """GPTQ sym: scale = 2·amax/(2^b-1), unsigned codes with zero 2^(b-1), i.e. signed codes
    ``[-2^(b-1), 2^(b-1)-1]`` at scale amax/(2^(b-1)-0.5): our ``full`` range exactly (the same real
    number 2a/15 = a/7.5, correctly rounded once either way). GPTQ keeps xmin = 0 for a group with no
    negative value, which breaks the symmetry; no group here is like that."""
    w = weights(kind)
    rows = as_rows(w, group_size)
    assert bool((rows.amin(dim=1) < 0).all())
    q = quantize(w, method="absmax", bits=bits, group_size=group_size, range="full", clip="mse")
    scale, zero = gptq_find_params(rows.clone(), bits, sym=True)
    assert torch.equal(zero, torch.full_like(zero, 2 ** (bits - 1)))
    assert torch.equal(q.scale.reshape(-1), scale)
    gptq_codes = torch.clamp(torch.round(rows / scale[:, None]) + zero[:, None], 0, 2**bits - 1)
    assert torch.equal(as_rows(q.codes, group_size).float(), gptq_codes - zero[:, None])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_absmax_restricted_mse_is_the_first_best_shrink(kind: str, bits: int) -> None:
    """The restricted grid (2^b - 1 codes, scale = amax/qmax) has no GPTQ counterpart, so GPTQ's loop is
    run by brute force on it: every shrink p = 1 - i/100, i < 80, scored by sum |Q - W|^2.4; ours is
    the first minimum. (Its error against GPTQ sym's is no invariant: the extra code of the full grid
    helps Gaussian groups, while the exact ±amax of the restricted one wins with outliers or at 8 bits.)"""
    w = weights(kind)
    rows = as_rows(w, 32)
    qmax = 2 ** (bits - 1) - 1
    amax = rows.abs().amax(dim=1)
    shrinks = [1 - i / 100 for i in range(80)]
    errors = []
    for p in shrinks:
        scale = (p * amax / qmax)[:, None]
        errors.append((torch.clamp(torch.round(rows / scale), -qmax, qmax) * scale - rows).abs().pow(2.4).sum(dim=1))
    first_best = torch.stack(errors).argmin(dim=0)  # argmin returns the first of equal minima
    expected = torch.stack([p * amax for p in shrinks]).gather(0, first_best[None])[0] / qmax
    q = quantize(w, method="absmax", bits=bits, group_size=32, clip="mse")
    assert torch.equal(q.scale.reshape(-1), expected)


# --- (3) mse never loses to minmax in its own norm


@pytest.mark.parametrize("method,mode", [("zeropoint", None), ("absmax", "restricted"), ("absmax", "full")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 32])
def test_mse_is_never_worse_than_minmax_per_group(
    method: str, mode: str | None, dtype: torch.dtype, bits: int, group_size: int | None
) -> None:
    """Shrink p = 1 is minmax and only a strictly smaller error replaces it; the search scores the
    dequantization in the storage dtype, so this holds on what the checkpoint holds."""
    w = weights("outliers", seed=1).to(dtype)
    base = quantize(w, method=method, bits=bits, group_size=group_size, range=mode)  # range: absmax only
    best = quantize(w, method=method, bits=bits, group_size=group_size, range=mode, clip="mse")
    base_err, best_err = group_errors(w, base, group_size), group_errors(w, best, group_size)
    assert bool((best_err <= base_err).all())
    if bits <= 4:  # at 8 bits minmax is usually already the best shrink
        assert float(best_err.sum()) < float(base_err.sum())


# --- (4) percentile


@pytest.mark.parametrize("method,mode", [("zeropoint", None), ("absmax", "restricted"), ("absmax", "full")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("granularity,group_size", [("tensor", None), ("channel", None), ("group", 32)])
def test_percentile_100_is_minmax(method: str, mode: str | None, dtype: torch.dtype, granularity: str,
                                  group_size: int | None) -> None:
    w = weights("laplace").to(dtype)
    w[1, :64] = 0  # an all-zero group
    kwargs = dict(method=method, bits=4, granularity=granularity, group_size=group_size, range=mode)
    base = quantize(w, **kwargs)
    clipped = quantize(w, **kwargs, clip="percentile", percentile=100)
    assert torch.equal(clipped.codes, base.codes)
    assert torch.equal(clipped.scale, base.scale)
    assert (clipped.zero_point is None and base.zero_point is None) or torch.equal(clipped.zero_point, base.zero_point)


@pytest.mark.parametrize("pct", [99.99, 99, 90])
def test_percentile_is_numpys_linear_percentile(pct: float) -> None:
    """absmax: the p-th percentile of |w| per group; zeropoint: the (100-p)-th and p-th of w, widened to 0."""
    w = weights("outliers")
    groups = as_rows(w, 32).double().numpy()
    q = quantize(w, method="absmax", bits=4, group_size=32, clip="percentile", percentile=pct)
    expected = np.percentile(np.abs(groups), pct, axis=1) / 7  # restricted 4-bit: scale = amax / 7
    np.testing.assert_allclose(q.scale.reshape(-1).double().numpy(), expected, rtol=1e-6)

    q = quantize(w, method="zeropoint", bits=4, group_size=32, clip="percentile", percentile=pct)
    low = np.minimum(np.percentile(groups, 100 - pct, axis=1), 0)
    high = np.maximum(np.percentile(groups, pct, axis=1), 0)
    np.testing.assert_allclose(q.scale.reshape(-1).double().numpy(), (high - low) / 15, rtol=1e-6)


@pytest.mark.parametrize("method", ["absmax", "zeropoint"])
def test_percentile_below_100_clips_outliers(method: str) -> None:
    w = weights("gaussian", shape=(8, 256))
    w[0, 5] = 1.0  # 50 sigma
    base = quantize(w, method=method, bits=4, granularity="channel")
    clipped = quantize(w, method=method, bits=4, granularity="channel", clip="percentile", percentile=99)
    assert float(clipped.dequantize()[0, 5]) < 0.5  # the outlier saturates at the top code...
    assert int(clipped.codes[0, 5]) == 7
    assert float(clipped.scale[0, 0]) < float(base.scale[0, 0]) / 5  # ...so the rest of the row gets a fine grid
    rest = torch.ones_like(w, dtype=torch.bool)
    rest[0, 5] = False
    row_err = ((clipped.dequantize() - w)[0][rest[0]].norm(), (base.dequantize() - w)[0][rest[0]].norm())
    assert float(row_err[0]) < float(row_err[1]) / 5


@pytest.mark.parametrize("method", ["absmax", "zeropoint"])
def test_percentile_of_a_mostly_zero_group_keeps_its_range(method: str) -> None:
    """The 90th percentile of 29 zeros and 3 non-zeros is 0 (rank 27.9 falls between two zeros); the
    group keeps its minmax range instead of the scale-1 fallback meant for all-zero groups."""
    w = torch.zeros(2, 32)
    w[0, :3] = torch.tensor([0.7, -0.2, 0.1])
    w[1] = weights("gaussian", shape=(1, 32))
    q = quantize(w, method=method, bits=4, granularity="channel", clip="percentile", percentile=90)
    assert torch.equal(q.scale[0], quantize(w, method=method, bits=4, granularity="channel").scale[0])
    assert float(q.dequantize()[0, 0]) == pytest.approx(0.7, abs=0.03)


# --- (5) recipes and the CLI


@pytest.mark.parametrize("clip", ["minmax", "percentile", "mse"])
def test_clip_round_trips_through_a_recipe(clip: str) -> None:
    default = {"method": "zeropoint", "bits": 4, "group_size": 32, "clip": clip, "percentile": 99.9}
    recipe = recipe_from_dict({"version": 1, "default": default})
    assert (recipe.default.clip, recipe.default.percentile, recipe.default.group_size) == (clip, 99.9, 32)
    assert recipe_from_dict(recipe.to_dict()).default == recipe.default


def test_unknown_clip_in_a_recipe_is_a_one_line_error() -> None:
    with pytest.raises(QuantkitError, match="weight clip must be one of minmax, percentile, mse, got 'kl'"):
        recipe_from_dict({"version": 1, "default": {"method": "absmax", "clip": "kl"}})


def quantize_cli(model: Path, out: Path, *options: str) -> dict[str, object]:
    result = CliRunner().invoke(app, ["quantize", str(model), "--method", "zeropoint", *options, "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "quantkit_report.json").read_text())
    assert isinstance(report, dict)
    return report


def mean_rel_error(report: dict[str, object]) -> float:
    tensors = report["tensors"]
    assert isinstance(tensors, list)
    errors = [t["rel_error"] for t in tensors if t["bits"] is not None]
    assert errors
    return sum(errors) / len(errors)


@pytest.mark.parametrize("bits", [3, 4])
def test_cli_weight_clip_mse_lowers_the_reported_error(bits: int, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model = tiny_models["qwen3_moe"]
    minmax = quantize_cli(model, tmp_path / "minmax", "--bits", str(bits))
    mse = quantize_cli(model, tmp_path / "mse", "--bits", str(bits), "--weight-clip", "mse")
    recipe = mse["recipe"]
    assert isinstance(recipe, dict) and recipe["default"]["clip"] == "mse"
    assert mean_rel_error(mse) < mean_rel_error(minmax)
