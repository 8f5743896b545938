"""GPTQ as pure functions: against a literal port of the reference, fidelity bars, edge cases, batched == looped."""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from typing import Any

import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.gptq import HessianAccumulator
from quantkit.schemes import SCHEMES, IntQuantized, make_config
from quantkit.schemes.gptq_solver import GptqResult, gptq_quantize

# --- A literal port of IST-DASLab/gptq for one nn.Linear weight [out, in], float32 on CPU: quant.py's
# quantize / Quantizer (perchannel, weight=True; the ternary branch left out) and gptq.py's
# GPTQ.add_batch / fasterquant (timing, prints and DEBUG left out). The one addition, marked "port:",
# records the integer codes so they can be compared with ours.


def ref_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: torch.Tensor) -> torch.Tensor:
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


class RefQuantizer:
    def __init__(self) -> None:
        self.maxq = torch.tensor(0)
        self.scale = torch.zeros(1)
        self.zero = torch.zeros(1)

    def configure(
        self, bits: int, perchannel: bool = False, sym: bool = True, mse: bool = False,
        norm: float = 2.4, grid: int = 100, maxshrink: float = 0.8,
    ) -> None:
        self.maxq = torch.tensor(2**bits - 1)
        self.perchannel = perchannel
        self.sym = sym
        self.mse = mse
        self.norm = norm
        self.grid = grid
        self.maxshrink = maxshrink

    def find_params(self, x: torch.Tensor, weight: bool = False) -> None:
        assert self.perchannel and weight  # the only use GPTQ makes of it
        shape = x.shape
        x = x.flatten(1)
        tmp = torch.zeros(x.shape[0])
        xmin = torch.minimum(x.min(1)[0], tmp)
        xmax = torch.maximum(x.max(1)[0], tmp)
        if self.sym:
            xmax = torch.maximum(torch.abs(xmin), xmax)
            tmp = xmin < 0
            if torch.any(tmp):
                xmin[tmp] = -xmax[tmp]
        tmp = (xmin == 0) & (xmax == 0)
        xmin[tmp] = -1
        xmax[tmp] = +1
        self.scale = (xmax - xmin) / self.maxq
        if self.sym:
            self.zero = torch.full_like(self.scale, (self.maxq + 1) / 2)
        else:
            self.zero = torch.round(-xmin / self.scale)
        if self.mse:
            best = torch.full([x.shape[0]], float("inf"))
            for i in range(int(self.maxshrink * self.grid)):
                p = 1 - i / self.grid
                xmin1 = p * xmin
                xmax1 = p * xmax
                scale1 = (xmax1 - xmin1) / self.maxq
                zero1 = torch.round(-xmin1 / scale1) if not self.sym else self.zero
                q = ref_quantize(x, scale1.unsqueeze(1), zero1.unsqueeze(1), self.maxq)
                q -= x
                q.abs_()
                q.pow_(self.norm)
                err = torch.sum(q, 1)
                tmp = err < best
                if torch.any(tmp):
                    best[tmp] = err[tmp]
                    self.scale[tmp] = scale1[tmp]
                    self.zero[tmp] = zero1[tmp]
        shape = [-1] + [1] * (len(shape) - 1)
        self.scale = self.scale.reshape(shape)
        self.zero = self.zero.reshape(shape)

    def ready(self) -> bool:
        return bool(torch.all(self.scale != 0))


class RefGPTQ:
    """``GPTQ`` on a weight instead of a layer; ``fasterquant`` returns ``(Q, codes, total loss)``."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight.clone()
        self.rows, self.columns = weight.shape
        self.H = torch.zeros((self.columns, self.columns))
        self.nsamples = 0
        self.quantizer = RefQuantizer()

    def add_batch(self, inp: torch.Tensor) -> None:
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        if len(inp.shape) == 3:
            inp = inp.reshape((-1, inp.shape[-1]))
        inp = inp.t()
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = math.sqrt(2 / self.nsamples) * inp.float()
        self.H += inp.matmul(inp.t())

    def fasterquant(
        self, blocksize: int = 128, percdamp: float = 0.01, groupsize: int = -1, actorder: bool = False,
        static_groups: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        W = self.weight.clone().float()
        if not self.quantizer.ready():
            self.quantizer.find_params(W, weight=True)

        H = self.H
        del self.H
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0

        if static_groups:
            groups = []
            for i in range(0, self.columns, groupsize):
                quantizer = copy.deepcopy(self.quantizer)
                quantizer.find_params(W[:, i : (i + groupsize)], weight=True)
                groups.append(quantizer)

        if actorder:
            perm = torch.argsort(torch.diag(H), descending=True)
            W = W[:, perm]
            H = H[perm][:, perm]
            invperm = torch.argsort(perm)

        Losses = torch.zeros_like(W)
        Q = torch.zeros_like(W)
        codes = torch.zeros_like(W)  # port: the integer codes q

        damp = percdamp * torch.mean(torch.diag(H))
        diag = torch.arange(self.columns)
        H[diag, diag] += damp
        H = torch.linalg.cholesky(H)
        H = torch.cholesky_inverse(H)
        H = torch.linalg.cholesky(H, upper=True)
        Hinv = H

        for i1 in range(0, self.columns, blocksize):
            i2 = min(i1 + blocksize, self.columns)
            count = i2 - i1

            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Losses1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]

            for i in range(count):
                w = W1[:, i]
                d = Hinv1[i, i]

                if groupsize != -1:
                    if not static_groups:
                        if (i1 + i) % groupsize == 0:
                            self.quantizer.find_params(W[:, (i1 + i) : (i1 + i + groupsize)], weight=True)
                    else:
                        idx = i1 + i
                        if actorder:
                            idx = perm[idx]
                        self.quantizer = groups[idx // groupsize]

                q = ref_quantize(
                    w.unsqueeze(1), self.quantizer.scale, self.quantizer.zero, self.quantizer.maxq
                ).flatten()
                codes[:, i1 + i] = torch.clamp(  # port
                    torch.round(w.unsqueeze(1) / self.quantizer.scale) + self.quantizer.zero, 0, self.quantizer.maxq
                ).flatten()
                Q1[:, i] = q
                Losses1[:, i] = (w - q) ** 2 / d**2

                err1 = (w - q) / d
                W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err1

            Q[:, i1:i2] = Q1
            Losses[:, i1:i2] = Losses1 / 2

            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

        if actorder:
            Q = Q[:, invperm]
            codes = codes[:, invperm]  # port
        return Q, codes, torch.sum(Losses).item()


def ref_gptq(
    weight: torch.Tensor, hessian: torch.Tensor, bits: int, groupsize: int = -1, sym: bool = False,
    mse: bool = False, **options: Any,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The reference as opt.py drives it: ``Quantizer.configure(bits, perchannel=True, sym, mse)``, then fasterquant."""
    gptq = RefGPTQ(weight)
    gptq.H = hessian.clone()
    gptq.quantizer.configure(bits, perchannel=True, sym=sym, mse=mse)
    return gptq.fasterquant(groupsize=groupsize, **options)


# --- helpers

def correlated_inputs(tokens: int, columns: int, seed: int, mixing: float = 4.0, spread: float = 0.5) -> torch.Tensor:
    """Synthetic layer inputs ``X = Z (I + mixing * G / sqrt(in)) diag(s)`` ``[tokens, in]``.

    ``Z`` and ``G`` are standard normal; ``G`` mixes the channels (correlation, a spread of eigenvalues), and
    log-normal channel scales ``s = exp(spread * N(0, 1))`` make some input channels matter more than others
    (what act-order exploits).
    """
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, columns, generator=gen)
    mix = torch.eye(columns) + mixing * torch.randn(columns, columns, generator=gen) / math.sqrt(columns)
    return (z @ mix) * torch.exp(spread * torch.randn(columns, generator=gen))


def hessian_of(x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[1])
    for chunk in x.split(batch):
        acc.add(chunk)
    return acc.hessian


def gaussian_weight(rows: int, columns: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, columns, generator=gen) / math.sqrt(columns)).to(dtype)


def rtn(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool, clip: str = "minmax") -> IntQuantized:
    """quantkit's round-to-nearest on the grid GPTQ uses."""
    grid = {"method": "absmax", "range": "full"} if symmetric else {"method": "zeropoint"}
    config = make_config(**grid, bits=bits, clip=clip)
    config = config.with_updates(group_size=group_size)
    result = SCHEMES.get(config.method).quantize(weight, config)
    assert isinstance(result, IntQuantized)
    return result


def output_error(weight: torch.Tensor, quantized: torch.Tensor, x: torch.Tensor) -> float:
    """``||W X - Q X||^2`` for inputs ``x`` ``[tokens, in]``."""
    return float(((weight.float() - quantized.float()) @ x.t()).pow(2).sum())


def assert_same(ours: GptqResult, other: GptqResult) -> None:
    for field in ("codes", "scale", "zero_point", "g_idx", "dequantized", "row_loss", "damp", "retries"):
        a, b = getattr(ours, field), getattr(other, field)
        assert (a is None) == (b is None), field
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a, b), field
    assert ours.config == other.config


# --- Hessian


def test_hessian_matches_reference_add_batch() -> None:
    x = correlated_inputs(1000, 64, seed=1)
    ref = RefGPTQ(torch.zeros(8, 64))
    ours = HessianAccumulator(64)
    for chunk in x.split([100, 1, 0, 499, 400]):
        ref.add_batch(chunk.unsqueeze(1))  # [tokens, 1, in]: the reference counts inp.shape[0], here tokens
        ours.add(chunk)
    assert torch.equal(ours.hessian, ref.H)
    assert ours.tokens == [1000]
    assert torch.allclose(ours.hessian, 2 * x.t() @ x / 1000, rtol=1e-4, atol=1e-4)


def test_hessian_per_expert() -> None:
    x = correlated_inputs(300, 32, seed=2)
    batched = HessianAccumulator(32, num_experts=3)
    alone = [HessianAccumulator(32) for _ in range(3)]
    for expert, chunk in [(0, x[:100]), (2, x[100:150]), (0, x[150:160]), (2, x[160:160])]:
        batched.add(chunk, expert=expert)
        alone[expert].add(chunk)
    assert batched.hessian.shape == (3, 32, 32) and batched.tokens == [110, 0, 50]
    for expert in range(3):
        assert torch.equal(batched.hessian[expert], alone[expert].hessian)
    assert not batched.hessian[1].any()  # no token: all zeros (the solver treats it as the identity)
    with pytest.raises(QuantkitError):
        batched.add(x[:4])
    with pytest.raises(QuantkitError):
        alone[0].add(x[:4, :16])


# --- Against the reference port, and the fidelity bar of FORMATS.md §2 (issue item 2)
#
# A 512x512 layer, W ~ N(0, 1/512), on 4096 tokens of correlated_inputs(mixing=4, spread=0.5), seed 0: on
# these the reference port itself gives (1 thread) 0.4801 / 0.2552 / 0.4937 / 0.2635 / 0.2643 / 0.4939 of
# round-to-nearest's output error for the six FORMATS_RATIOS settings, within 1.1% of the published behaviour.
# (Other seeds of the same construction land within about 6%.)

CASES: dict[str, dict[str, Any]] = {
    "no groups": dict(),
    "act-order": dict(act_order=True),
    "g128": dict(group_size=128),
    "g128 act-order": dict(group_size=128, act_order=True),
    "g128 act-order static": dict(group_size=128, act_order=True, static_groups=True),
    "g128 symmetric": dict(group_size=128, symmetric=True),
    "g128 act-order mse": dict(group_size=128, act_order=True, mse_clip=True),
}
FORMATS_RATIOS = {  # FORMATS.md §2: ||WX - QX||^2 as a fraction of round-to-nearest's
    "no groups": 0.485, "act-order": 0.258, "g128": 0.496, "g128 act-order": 0.263,
    "g128 act-order static": 0.266, "g128 symmetric": 0.496,
}


@functools.cache
def fidelity_layer() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = correlated_inputs(4096, 512, seed=0)
    return x, gaussian_weight(512, 512, seed=0), hessian_of(x)


@functools.cache
def solved(case: str) -> tuple[tuple[torch.Tensor, torch.Tensor, float], GptqResult]:
    """The reference port's ``(Q, codes, loss)`` and our result for ``CASES[case]`` on the fidelity layer."""
    _, weight, hessian = fidelity_layer()
    options = CASES[case]
    ref = ref_gptq(
        weight, hessian, 4, groupsize=int(options.get("group_size", -1)), sym=bool(options.get("symmetric")),
        mse=bool(options.get("mse_clip")), actorder=bool(options.get("act_order")),
        static_groups=bool(options.get("static_groups")),
    )
    return ref, gptq_quantize(weight, hessian, bits=4, scale_dtype=torch.float32, **options)


@pytest.mark.parametrize("case", CASES)
def test_matches_reference_port(case: str) -> None:
    (ref_q, ref_codes, ref_loss), ours = solved(case)
    mismatched = float(((ref_codes - 8).to(torch.int8) != ours.codes).float().mean())
    assert mismatched < 1e-3  # FORMATS.md: about 1 in 10,000 codes differ between 1 and 2 threads
    assert float(ours.loss) == pytest.approx(ref_loss, rel=1e-4)
    if mismatched == 0:
        assert torch.equal(ours.dequantized, ref_q)


@pytest.mark.parametrize("case", FORMATS_RATIOS)
def test_fidelity_bar(case: str) -> None:
    x, weight, _ = fidelity_layer()
    (ref_q, _, _), ours = solved(case)
    options = CASES[case]
    nearest = rtn(weight, 4, options.get("group_size"), options.get("symmetric", False))
    baseline = output_error(weight, nearest.dequantize(), x)
    assert output_error(weight, ref_q, x) / baseline == pytest.approx(FORMATS_RATIOS[case], rel=0.05)
    assert output_error(weight, ours.dequantized, x) / baseline == pytest.approx(FORMATS_RATIOS[case], rel=0.05)


def test_current_group_fit_uses_the_in_block_updates() -> None:
    """g32 in blocks of 128: ``group_fit="current"`` includes the in-block updates, which the reference misses.

    With blocks of 32 the reference sees the current weights too; the block size is only floating-point rounding.
    """
    _, weight, hessian = fidelity_layer()
    ours = gptq_quantize(weight, hessian, bits=4, group_size=32, act_order=True, scale_dtype=torch.float32,
                         group_fit="current")
    _, stale_codes, stale_loss = ref_gptq(weight, hessian, 4, groupsize=32, actorder=True)
    _, current_codes, current_loss = ref_gptq(weight, hessian, 4, groupsize=32, actorder=True, blocksize=32)
    assert float(((stale_codes - 8).to(torch.int8) != ours.codes).float().mean()) > 0.1
    assert float(((current_codes - 8).to(torch.int8) != ours.codes).float().mean()) < 1e-3
    assert float(ours.loss) == pytest.approx(current_loss, rel=1e-4)
    assert float(ours.loss) < stale_loss


@pytest.mark.parametrize("group_size", [32, 48])
@pytest.mark.parametrize("act_order", [False, True])
def test_block_start_group_fit_is_the_reference_rule(group_size: int, act_order: bool) -> None:
    """The default, ``group_fit="block-start"``, fits a group starting inside a block to the block's start weights."""
    _, weight, hessian = fidelity_layer()
    ours = gptq_quantize(weight, hessian, bits=4, group_size=group_size, act_order=act_order,
                         scale_dtype=torch.float32)
    _, ref_codes, ref_loss = ref_gptq(weight, hessian, 4, groupsize=group_size, actorder=act_order)
    assert float(((ref_codes - 8).to(torch.int8) != ours.codes).float().mean()) < 1e-3
    assert float(ours.loss) == pytest.approx(ref_loss, rel=1e-4)


# --- Edge cases and options (a smaller layer: 64 x 256)


def small_layer(seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = correlated_inputs(1024, 256, seed=seed)
    return x, gaussian_weight(64, 256, seed=seed, dtype=dtype), hessian_of(x)


@pytest.mark.parametrize("act_order", [False, True])
def test_dead_columns_become_zero(act_order: bool) -> None:
    x, weight, _ = small_layer()
    x[:, [3, 100]] = 0  # input channels that are always 0
    result = gptq_quantize(weight, hessian_of(x), bits=4, group_size=64, act_order=act_order)
    assert torch.isfinite(result.dequantized).all() and torch.isfinite(result.row_loss).all()
    assert not result.dequantized[:, [3, 100]].any()
    assert torch.equal(result.dequantize().float(), result.dequantized)
    assert (result.dequantized[:, :3] != 0).any()


def shifted_hessian(eigen_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and a Hessian whose smallest eigenvalue is ``-eigen_fraction * mean(diag)`` (not PSD)."""
    _, weight, hessian = small_layer()
    lowest = torch.linalg.eigvalsh(hessian.double())[0]
    mean_diag = hessian.diagonal().double().mean()
    # H - s I has smallest eigenvalue lowest - s and mean diagonal mean_diag - s
    shift = (lowest + eigen_fraction * mean_diag) / (1 + eigen_fraction)
    return weight, (hessian.double() - shift * torch.eye(256, dtype=torch.float64)).float()


def test_not_positive_definite_retries_with_more_damping() -> None:
    weight, hessian = shifted_hessian(0.05)  # 0.01 of the mean diagonal is not enough, 0.1 is
    result = gptq_quantize(weight, hessian, bits=4, group_size=64)
    assert int(result.retries) == 1 and float(result.damp) == pytest.approx(0.1)
    damped = gptq_quantize(weight, hessian, bits=4, group_size=64, damp=0.1)
    assert_same(dataclasses.replace(result, retries=torch.tensor(0)), damped)
    with pytest.raises(QuantkitError, match="not positive definite"):
        gptq_quantize(weight, torch.full_like(hessian, math.nan), bits=4, name="mlp.experts.0.up_proj")


def test_act_order_groups_g_idx() -> None:
    _, weight, hessian = small_layer()
    result = gptq_quantize(weight, hessian, bits=4, group_size=64, act_order=True)
    assert result.g_idx is not None and result.g_idx.dtype == torch.int32 and result.g_idx.shape == (256,)
    assert torch.bincount(result.g_idx.long()).tolist() == [64] * 4  # a valid group map
    # groups follow act-order: group k holds the columns ranked 64k to 64k+63 by decreasing diag(H)
    order = torch.argsort(hessian.diagonal(), descending=True, stable=True)
    assert torch.equal(result.g_idx[order].long(), torch.arange(256) // 64)
    assert result.scale.dtype == torch.bfloat16 and result.scale.shape == (64, 4)
    # dequantizing the codes with scales and zero points picked through g_idx reproduces the solver's Q exactly
    zero_point = result.zero_point
    assert zero_point is not None
    g = result.g_idx.long()
    manual = (result.codes.to(torch.bfloat16) - zero_point[:, g].to(torch.bfloat16)) * result.scale[:, g]
    assert torch.equal(manual.float(), result.dequantized)
    assert torch.equal(result.dequantize(), manual)


def test_static_groups_are_round_to_nearest_groups() -> None:
    _, weight, hessian = small_layer()
    result = gptq_quantize(weight, hessian, bits=4, group_size=64, act_order=True, static_groups=True)
    reference = rtn(weight, 4, 64, symmetric=False)
    assert result.g_idx is None  # groups stay contiguous in natural order
    assert torch.equal(result.scale, reference.scale) and result.zero_point is not None
    assert reference.zero_point is not None and torch.equal(result.zero_point, reference.zero_point)
    assert torch.equal(result.quantized.dequantize().float(), result.dequantized)


def test_symmetric_is_absmax_full_range() -> None:
    _, weight, hessian = small_layer()
    result = gptq_quantize(weight, hessian, bits=4, group_size=64, symmetric=True)
    assert result.zero_point is None and result.g_idx is None
    assert (result.config.method, result.config.range, result.config.group_size) == ("absmax", "full", 64)
    assert int(result.codes.min()) >= -8 and int(result.codes.max()) <= 7 and int(result.codes.min()) == -8
    assert torch.equal(result.quantized.dequantize().float(), result.dequantized)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bits(bits: int) -> None:
    x, weight, hessian = small_layer()
    result = gptq_quantize(weight, hessian, bits=bits, group_size=64, act_order=True)
    assert int(result.codes.min()) >= -(2 ** (bits - 1)) and int(result.codes.max()) <= 2 ** (bits - 1) - 1
    assert result.zero_point is not None and result.quantized.bits_per_weight > bits
    baseline = output_error(weight, rtn(weight, bits, 64, symmetric=False).dequantize(), x)
    assert output_error(weight, result.dequantized, x) / baseline < 0.8


@pytest.mark.parametrize(
    "options",
    [dict(group_size=64), dict(group_size=64, symmetric=True), dict(mse_clip=True),
     dict(group_size=32, mse_clip=True, symmetric=True)],
)
def test_identity_hessian_is_round_to_nearest(options: dict[str, Any]) -> None:
    """With H = I no error is fed back: GPTQ's grid search is exactly quantkit's RTN (bf16 scales)."""
    _, weight, _ = small_layer()
    result = gptq_quantize(weight, torch.eye(256), bits=4, act_order=True, **options)
    reference = rtn(weight, 4, options.get("group_size"), options.get("symmetric", False),
                    clip="mse" if options.get("mse_clip") else "minmax")
    assert torch.equal(result.codes, reference.codes) and torch.equal(result.scale, reference.scale)
    if reference.zero_point is None:
        assert result.zero_point is None
    else:
        assert result.zero_point is not None and torch.equal(result.zero_point, reference.zero_point)


def test_rejects_bad_inputs() -> None:
    _, weight, hessian = small_layer()
    with pytest.raises(QuantkitError, match="group size must be positive"):
        gptq_quantize(weight, hessian, bits=4, group_size=0)
    with pytest.raises(QuantkitError, match="Hessian"):
        gptq_quantize(weight, hessian[:128, :128], bits=4)
    with pytest.raises(QuantkitError, match="bits"):
        gptq_quantize(weight, hessian, bits=1)
    with pytest.raises(QuantkitError, match="group fit must be one of block-start, current"):
        gptq_quantize(weight, hessian, bits=4, group_fit="stale")


# --- Batched over experts


EXPERT_OPTIONS = [
    dict(group_size=64, act_order=True),
    dict(group_size=64, act_order=True, static_groups=True),
    dict(symmetric=True, act_order=True),
    dict(group_size=32, mse_clip=True),
]


@functools.cache
def experts_layer() -> tuple[torch.Tensor, torch.Tensor]:
    """8 experts ``[8, 64, 256]`` (bf16), each with its own Hessian; expert 5 got no token, expert 2 a dead channel."""
    weight = torch.stack([gaussian_weight(64, 256, seed=10 + e, dtype=torch.bfloat16) for e in range(8)])
    acc = HessianAccumulator(256, num_experts=8)
    for expert in range(8):
        if expert == 5:
            continue
        x = correlated_inputs(64 * (expert + 1), 256, seed=20 + expert, spread=0.25 * expert)
        if expert == 2:
            x[:, 7] = 0
        acc.add(x, expert=expert)
    return weight, acc.hessian


@pytest.mark.parametrize("options", EXPERT_OPTIONS)
def test_batched_equals_looped(options: dict[str, Any]) -> None:
    weight, hessian = experts_layer()
    batched = gptq_quantize(weight, hessian, bits=4, **options)
    assert batched.num_experts == 8 and batched.codes.shape == (8, 64, 256)
    for expert, result in enumerate(batched.experts()):
        assert_same(result, gptq_quantize(weight[expert], hessian[expert], bits=4, **options))
    assert torch.equal(batched.dequantize().float(), batched.dequantized)
    # expert 5 (no token) is round-to-nearest, not zeroed; expert 2's dead channel is zeroed
    nearest = rtn(weight[5], 4, options.get("group_size"), options.get("symmetric", False),
                  clip="mse" if options.get("mse_clip") else "minmax")
    assert torch.equal(batched.codes[5], nearest.codes) and torch.equal(batched.scale[5], nearest.scale)
    assert not batched.dequantized[2, :, 7].any()


def test_batched_retries_only_the_failing_expert() -> None:
    weight, hessian = shifted_hessian(0.05)
    _, good_weight, good_hessian = small_layer(seed=1)
    batched = gptq_quantize(torch.stack([good_weight, weight]), torch.stack([good_hessian, hessian]), bits=4)
    assert batched.retries.tolist() == [0, 1] and batched.damp.tolist() == pytest.approx([0.01, 0.1])
    assert_same(batched.experts()[1], gptq_quantize(weight, hessian, bits=4))
