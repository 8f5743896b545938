"""Calibration ranges: |x| histograms and range selectors against NVIDIA ModelOpt's HistogramCalibrator.

The oracle is ``modelopt.torch.quantization.calib.histogram.HistogramCalibrator`` from
PyPI ``nvidia-modelopt`` (checked with 0.47.0, CPU ``torch_hist=True`` path); its tests
skip when it is not installed. Histograms must match it exactly (edges bit for bit,
counts value for value) and every selector must return *the same float* (so the same
bin: amax is always a float32 bin edge or centre of that histogram).

ModelOpt's mse, as shipped, does not compute what it means to: ``_compute_amax_mse``
calls ``fake_tensor_quant(centers, amax, num_bits, unsigned)`` but the third parameter
of ``FakeTensorQuantFunction.forward`` is ``bias``. So ``bias = 8``, ``num_bits =
False`` (0): max_bound = 2^-1 - 1 = -0.5 < min_bound = 0.5, the clamp returns -0.5
everywhere and the "fake-quantized" centres are the constant ``amax + 8``; the loss is
then smallest at the lowest candidate, so it returns ``centers[start_bin]`` for any
ordinary data (see :func:`test_modelopt_mse_as_shipped_ignores_the_data`). Calling it by
keyword (``num_bits=...``) does not work either: ``autograd.Function.apply`` only binds
defaults for functions with ``setup_context``, and this one has none, so it raises
"missing required argument: 'bias'". The reference therefore swaps in the intended
binding, ``fake_tensor_quant(centers, amax, None, num_bits, unsigned)`` (positional,
``bias=None``), and keeps ModelOpt's own loop, float32 arithmetic and argmin.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.ranges import RANGE_SELECTORS, AbsHistogram
from quantkit.ranges import selectors as ranges_module

Batches = list[torch.Tensor]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(n, generator=g)


def laplace(n: int, g: torch.Generator) -> torch.Tensor:
    u = torch.rand(n, generator=g) - 0.5
    return -torch.sign(u) * torch.log1p(-2 * u.abs())


def gaussian_outliers(n: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, generator=g)
    x[:4] = torch.tensor([24.0, -27.0, 21.0, -25.5])  # ~25 sigma, 0.02% of the values
    return x


def relu_gaussian(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.relu(torch.randn(n, generator=g))  # one-sided, half exact zeros


# name -> (sampler, bins); 2048 is the default, fewer bins keep ModelOpt's O(bins^2) python entropy quick
DISTRIBUTIONS: dict[str, tuple[Callable[[int, torch.Generator], torch.Tensor], int]] = {
    "gaussian": (gaussian, 2048),
    "laplace": (laplace, 1024),
    "gaussian_outliers": (gaussian_outliers, 1024),
    "relu_gaussian": (relu_gaussian, 1024),
}
GROWTH = (1.0, 1.12, 1.0, 1.25)  # batch scales: the max grows twice, so bins are appended twice


def batches(name: str, seed: int = 0, size: int = 15000) -> Batches:
    sampler, _ = DISTRIBUTIONS[name]
    g = _gen(seed)
    return [sampler(size, g) * s for s in GROWTH]


def collect(batches: Batches, num_bins: int) -> AbsHistogram:
    hist = AbsHistogram(num_bins)
    for x in batches:
        hist.observe(x)
    return hist


@pytest.fixture(scope="module")
def modelopt_histogram() -> ModuleType:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # modelopt warns about the (untested by it) transformers version
        return pytest.importorskip("modelopt.torch.quantization.calib.histogram")


@pytest.fixture
def modelopt_mse_as_intended(modelopt_histogram: ModuleType, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """ModelOpt's histogram module with ``fake_tensor_quant`` bound as ``_compute_amax_mse`` means it."""
    from modelopt.torch.quantization.tensor_quant import fake_tensor_quant

    def intended(inputs: torch.Tensor, amax: torch.Tensor, num_bits: int, unsigned: bool) -> torch.Tensor:
        return fake_tensor_quant(inputs, amax, None, num_bits, unsigned)  # bias=None

    monkeypatch.setattr(modelopt_histogram, "fake_tensor_quant", intended)
    return modelopt_histogram


def modelopt_collect(module: ModuleType, batches: Batches, num_bins: int) -> Any:
    calib = module.HistogramCalibrator(num_bins=num_bins)
    for x in batches:
        calib.collect(x)
    return calib


def assert_same_histogram(ours: AbsHistogram, calib: Any) -> None:
    ref_counts, ref_edges = calib._calib_hist, calib._calib_bin_edges
    assert torch.equal(ours.edges, ref_edges)
    assert torch.equal(ref_counts, ref_counts.round()) and float(ref_counts.max()) < 2**24  # float32 counts exact
    assert torch.equal(ours.counts, ref_counts.to(torch.int64))


# ---- ModelOpt oracle -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_histogram_matches_modelopt(modelopt_histogram: ModuleType, dist: str) -> None:
    data, bins = batches(dist), DISTRIBUTIONS[dist][1]
    ours = collect(data, bins)
    assert ours.num_bins > bins  # bins were appended
    assert_same_histogram(ours, modelopt_collect(modelopt_histogram, data, bins))
    every = torch.cat(data)
    assert (ours.min, ours.max, ours.count) == (float(every.min()), float(every.max()), every.numel())
    assert ours.absmax == float(every.abs().max())


def test_histogram_bins_edge_values_like_modelopt(modelopt_histogram: ModuleType) -> None:
    """Values on and one ulp around every bin edge and centre, a bf16 batch, and tiny bin counts."""
    for num_bins in (2048, 100, 7):
        g = _gen(num_bins)
        first = torch.randn(4000, generator=g)
        e = collect([first], num_bins).edges
        below, above = e.nextafter(torch.tensor(0.0)), e.nextafter(torch.tensor(1e9))
        on_edges = torch.cat([e, -e, below, above, (e[1:] + e[:-1]) / 2])
        data = [first, torch.randn(4000, generator=g), on_edges[on_edges.abs() <= e[-1]],
                (torch.randn(4000, generator=g) * 1.7).bfloat16(), torch.randn(4000, generator=g) * 2.3]
        assert_same_histogram(collect(data, num_bins), modelopt_collect(modelopt_histogram, data, num_bins))


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("pct", [99.99, 99.9, 99.0])
def test_percentile_matches_modelopt(modelopt_histogram: ModuleType, dist: str, pct: float) -> None:
    data, bins = batches(dist), DISTRIBUTIONS[dist][1]
    expected = float(modelopt_collect(modelopt_histogram, data, bins).compute_amax("percentile", percentile=pct))
    assert RANGE_SELECTORS.get("percentile")(collect(data, bins), percentile=pct) == expected


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_mse_matches_modelopt(modelopt_mse_as_intended: ModuleType, dist: str) -> None:
    data, bins = batches(dist), DISTRIBUTIONS[dist][1]
    expected = float(modelopt_collect(modelopt_mse_as_intended, data, bins).compute_amax("mse"))
    ours = collect(data, bins)
    assert RANGE_SELECTORS.get("mse")(ours) == expected
    assert expected > float(ours.edges[129])  # the intended mse is not stuck at the first candidate


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_kl_matches_modelopt_entropy(modelopt_histogram: ModuleType, dist: str) -> None:
    data, bins = batches(dist), DISTRIBUTIONS[dist][1]
    expected = float(modelopt_collect(modelopt_histogram, data, bins).compute_amax("entropy"))
    assert RANGE_SELECTORS.get("kl")(collect(data, bins)) == expected


def test_modelopt_mse_as_shipped_ignores_the_data(modelopt_histogram: ModuleType) -> None:
    """Documents why the mse reference rebinds ``fake_tensor_quant`` (see the module docstring)."""
    from modelopt.torch.quantization.tensor_quant import FakeTensorQuantFunction, fake_tensor_quant

    call = "fake_tensor_quant(centers, amax, num_bits, unsigned)"
    params = list(inspect.signature(FakeTensorQuantFunction.forward).parameters)
    if call not in inspect.getsource(modelopt_histogram._compute_amax_mse) or params[3] != "bias":
        pytest.skip("ModelOpt's mse no longer passes num_bits into bias")
    centres, amax = torch.linspace(0.0, 3.0, 7), torch.tensor(1.5)
    assert torch.allclose(fake_tensor_quant(centres, amax, 8, False), amax + 8)  # bias=8, num_bits=False
    with pytest.raises(TypeError, match="bias"):
        fake_tensor_quant(centres, amax, num_bits=8, unsigned=False)  # keywords are not bound either
    data = batches("gaussian")
    calib = modelopt_collect(modelopt_histogram, data, 2048)
    centres = (calib._calib_bin_edges[1:] + calib._calib_bin_edges[:-1]) / 2
    assert float(calib.compute_amax("mse")) == float(centres[128])  # always the first candidate


# ---- selectors without the oracle ------------------------------------------------------------------------------


def test_selectors_registered_by_name() -> None:
    assert list(RANGE_SELECTORS) == ["kl", "minmax", "mse", "percentile"]


def test_unknown_selector_lists_known_ones() -> None:
    known = "kl, minmax, mse, percentile"
    with pytest.raises(QuantkitError, match=f"unknown range selector 'entropyy'; supported: {known}"):
        RANGE_SELECTORS.get("entropyy")


def test_minmax_is_absmax_and_stats_are_tracked() -> None:
    hist = AbsHistogram(64)
    hist.observe(torch.tensor([[0.5, -3.25], [2.0, 0.0]]))
    hist.observe(torch.tensor([1.0, 2.5]))
    assert (hist.min, hist.max, hist.absmax, hist.count) == (-3.25, 2.5, 3.25, 6)
    assert RANGE_SELECTORS.get("minmax")(hist) == 3.25
    assert int(hist.counts.sum()) == 6 and float(hist.edges[-1]) == 3.25


def test_percentile_100_is_the_top_edge() -> None:
    hist = AbsHistogram(2048)
    hist.observe(torch.randn(10000, generator=_gen(3)))
    assert RANGE_SELECTORS.get("percentile")(hist, percentile=100) == float(hist.edges[-1]) == hist.absmax
    hist.observe(torch.randn(10000, generator=_gen(4)) * 1.5)  # extended: top bin holds the new max
    assert RANGE_SELECTORS.get("percentile")(hist, percentile=100) == float(hist.edges[-1]) >= hist.absmax
    assert RANGE_SELECTORS.get("percentile")(hist, percentile=0) == 0.0
    with pytest.raises(QuantkitError, match="percentile must be between 0 and 100"):
        RANGE_SELECTORS.get("percentile")(hist, percentile=100.5)


def test_bins_extend_at_the_same_width() -> None:
    hist = AbsHistogram(100)
    hist.observe(torch.tensor([0.0, 0.25, 1.0]))
    before, width = hist.counts.clone(), hist.width
    hist.observe(torch.tensor([2.5]))
    # width is float32(0.01): ceil(2.5 / width) == 250 but arange(0, 2.5 + width, width) has 252 edges. ModelOpt
    # 0.47 then bins with 250 bins over [0, 2.51] next to 251-bin edges (and its mse raises on the size mismatch);
    # here the bin count always follows the edges.
    assert hist.num_bins == len(hist.edges) - 1 == 251 and hist.width == width
    assert float(hist.edges[-2]) <= 2.5 <= float(hist.edges[-1])
    assert torch.equal(hist.counts[:100], before) and int(hist.counts[-1]) == 1 and int(hist.counts.sum()) == 4


def test_zeros_empty_and_non_finite() -> None:
    hist = AbsHistogram(16)
    for name in RANGE_SELECTORS:
        with pytest.raises(QuantkitError, match="no calibration data"):
            RANGE_SELECTORS.get(name)(hist)
    hist.observe(torch.zeros(5))  # no range yet: every selector gives 0
    assert all(RANGE_SELECTORS.get(name)(hist) == 0.0 for name in RANGE_SELECTORS)
    hist.observe(torch.tensor([0.0, 4.0]))  # the early zeros land in bin 0 once the range is known
    assert hist.counts.tolist() == [6] + [0] * 14 + [1]
    with pytest.raises(QuantkitError, match="NaN or infinite"):
        hist.observe(torch.tensor([1.0, math.nan]))
    skipping = AbsHistogram(16, skip_zeros=True)
    skipping.observe(torch.tensor([0.0, 0.0, 2.0]))
    assert int(skipping.counts.sum()) == 1 and skipping.count == 3


def test_sweep_arguments_are_checked() -> None:
    hist = collect([torch.randn(1000, generator=_gen(5))], 256)
    with pytest.raises(QuantkitError, match="start_bin must be between 0 and 255"):
        RANGE_SELECTORS.get("mse")(hist, start_bin=256)
    with pytest.raises(QuantkitError, match="start_bin must be between 1 and 256"):
        RANGE_SELECTORS.get("kl")(hist, start_bin=300)
    with pytest.raises(QuantkitError, match="stride must be at least 1"):
        RANGE_SELECTORS.get("kl")(hist, stride=0)
    with pytest.raises(QuantkitError, match="num_bits must be between 2 and 16"):
        RANGE_SELECTORS.get("mse")(hist, num_bits=1)
    assert RANGE_SELECTORS.get("kl")(hist, start_bin=256) == float(hist.edges[-1])  # the only candidate


# ---- vectorised sweeps against plain loops ---------------------------------------------------------------------


def naive_mse(hist: AbsHistogram, num_bits: int, start_bin: int, stride: int) -> float:
    centres = (hist.edges[1:] + hist.edges[:-1]) / 2
    counts = hist.counts.double()
    qmax = torch.tensor(2.0 ** (num_bits - 1) - 1)
    best, best_loss = -1, math.inf
    for i in range(start_bin, hist.num_bins, stride):
        scale = qmax / centres[i]
        q = torch.clamp(torch.round(centres * scale), -qmax, qmax) / scale
        loss = math.fsum((counts * (q.double() - centres.double()) ** 2).tolist()) / hist.num_bins
        if loss < best_loss:  # first minimum
            best, best_loss = i, loss
    return float(centres[best])


def naive_kl(hist: AbsHistogram, num_bits: int, start_bin: int, stride: int) -> float:
    h = [float(c) for c in hist.counts]
    h[0] = h[1]
    levels = 1 << (num_bits - 1)
    best, best_score = -1, math.inf
    for i in range(start_bin, len(h) + 1, stride):
        group_sum, group_bins = [0.0] * levels, [0] * levels
        for j in range(i):
            if h[j] > 0:
                group_sum[levels * j // i] += h[j]
                group_bins[levels * j // i] += 1
        q = [group_sum[levels * j // i] / group_bins[levels * j // i] if h[j] > 0 else 0.0 for j in range(i)]
        p = h[:i]
        p[-1] += sum(h[i:])
        sp, sq = math.fsum(p), math.fsum(q)
        terms = [(pj / sp) * math.log((pj / sp) / (qj / sq)) if qj > 0 else math.inf
                 for pj, qj in zip(p, q, strict=True) if pj > 0]
        score = math.fsum(terms) if math.inf not in terms else math.inf
        if score <= best_score:  # last minimum
            best, best_score = i, score
    return float(hist.edges[best])


@pytest.mark.parametrize(("num_bits", "start_bin", "stride"), [(8, 128, 1), (4, 20, 1), (6, 33, 3)])
def test_vectorised_sweeps_match_plain_loops(
    monkeypatch: pytest.MonkeyPatch, num_bits: int, start_bin: int, stride: int
) -> None:
    for dist in ("laplace", "relu_gaussian"):
        hist = collect(batches(dist, seed=7, size=3000), 200)  # ~250 bins after growth
        for chunk in (ranges_module._SWEEP_CHUNK, 2000):  # one chunk, then ~8 candidates per chunk
            monkeypatch.setattr(ranges_module, "_SWEEP_CHUNK", chunk)
            kw = dict(num_bits=num_bits, start_bin=start_bin, stride=stride)
            assert RANGE_SELECTORS.get("mse")(hist, **kw) == naive_mse(hist, num_bits, start_bin, stride)
            assert RANGE_SELECTORS.get("kl")(hist, **kw) == naive_kl(hist, num_bits, start_bin, stride)

