"""GPTQ (Frantar et al., 2022) as one pure function, batched over the experts of an MoE layer.

A step-by-step port of ``GPTQ.fasterquant`` (IST-DASLab/gptq ``gptq.py``; the ``# ref:`` comments quote
it) where every tensor carries a leading expert dimension ``E``: one Cholesky of ``[E, in, in]``, one
batched lazy update per block, per-expert act-order permutations by ``gather``. A 2-D weight is solved as
``E = 1``, so solving experts one by one gives bit-identical results. Only the per-column loop inside a
block is sequential, as in the reference.

Departures from the reference, all deliberate:

- Per-channel parameters (no groups) are taken after dead columns are zeroed (the reference takes them
  from the original weight, dead columns included).
- The scale is rounded to its storage dtype and ``Q`` dequantized in that dtype before the error feedback
  (:mod:`quantkit.schemes.grid`), so the error GPTQ compensates is the one clients see.
- An all-zero Hessian (an expert that got no calibration token) is replaced by the identity: GPTQ then is
  round-to-nearest. The reference would call every column dead and zero the whole weight.
- A Cholesky failure (H not positive definite) is retried with 10x the dampening, up to
  :data:`MAX_RETRIES` times, per expert.
- Act-order sorts stably, so equal Hessian diagonals keep their column order.

Where a group starts inside a block of columns, the reference fits its parameters to ``W``, which lacks
the updates made earlier in that block (and, for a group reaching past the block, all of the block's
updates). That is the default, ``group_fit="block-start"``. ``group_fit="current"`` fits each group to
its current weights instead, shortening blocks so that no group crosses one (the lazy update is exact
algebra; the block size only changes rounding): a lower layer-wise error, but not a better model on
every setting (docs/benchmarks.md, "which weights a group is fitted to").
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from quantkit.errors import QuantkitError
from quantkit.schemes.base import IntQuantized, group_index, storage_dtype
from quantkit.schemes.config import MAX_BITS, MIN_BITS, IntConfig
from quantkit.schemes.grid import Grid

MAX_RETRIES = 4
RETRY_FACTOR = 10
GROUP_FITS = ("block-start", "current")  # the weights a group's parameters are fitted to


@dataclass(frozen=True)
class GptqResult:
    """GPTQ's output for one weight ``[out, in]``, or for ``E`` experts (every tensor with a leading ``E``).

    Codes, scales and zero points follow :class:`~quantkit.schemes.base.IntQuantized`; columns are in their
    natural order. ``g_idx`` (int32 ``[..., in]``) maps each column to its group when act-order makes groups
    non-contiguous (act-order with groups, not static); otherwise it is None and group ``k`` is columns
    ``k * group_size`` to ``(k + 1) * group_size``, the last group shorter when the size does not divide
    the row.
    """

    codes: torch.Tensor  # int8 [..., out, in]
    scale: torch.Tensor  # [..., out, n_groups], in the scale dtype
    zero_point: torch.Tensor | None  # int8 [..., out, n_groups]; None for the symmetric grid
    g_idx: torch.Tensor | None  # int32 [..., in]
    dequantized: torch.Tensor  # float32 [..., out, in]: Q exactly as the solver's error feedback used it
    row_loss: torch.Tensor  # float32 [..., out]: sum over columns of (w - q)^2 / d^2 / 2 (the reference's Losses)
    damp: torch.Tensor  # float64 [...]: dampening used, as a fraction of mean(diag(H))
    retries: torch.Tensor  # int64 [...]: Cholesky retries with RETRY_FACTOR x the dampening
    config: IntConfig  # the grid: zeropoint, or absmax full range for symmetric

    @property
    def loss(self) -> torch.Tensor:
        """Total loss per expert ``[...]`` (the reference prints ``torch.sum(Losses)``)."""
        return self.row_loss.sum(dim=-1)

    @property
    def num_experts(self) -> int | None:
        return int(self.codes.shape[0]) if self.codes.ndim == 3 else None

    def experts(self) -> list[GptqResult]:
        """One 2-D result per expert of a batched result."""
        if self.num_experts is None:
            raise QuantkitError("GptqResult.experts: this result holds a single 2-D weight")

        def pick(t: torch.Tensor | None, e: int) -> torch.Tensor | None:
            return None if t is None else t[e]

        return [
            GptqResult(
                codes=self.codes[e], scale=self.scale[e], zero_point=pick(self.zero_point, e),
                g_idx=pick(self.g_idx, e), dequantized=self.dequantized[e], row_loss=self.row_loss[e],
                damp=self.damp[e], retries=self.retries[e], config=self.config,
            )
            for e in range(self.num_experts)
        ]

    @property
    def quantized(self) -> IntQuantized:
        """The 2-D result as an :class:`IntQuantized`; with a ``g_idx``, dequantize with :meth:`dequantize`."""
        if self.num_experts is not None:
            raise QuantkitError("GptqResult.quantized: split a batched result with experts() first")
        return IntQuantized(codes=self.codes, scale=self.scale, zero_point=self.zero_point, config=self.config)

    def dequantize(self) -> torch.Tensor:
        """``(codes - zero_point[g]) * scale[g]`` with ``g`` each column's group, in the scale's dtype."""
        columns = self.codes.shape[-1]
        g_idx = self.g_idx
        if g_idx is None:
            g_idx = group_index(columns, self.config.group_size or columns, self.codes.device)
        index = g_idx.to(torch.int64).unsqueeze(-2).expand(self.codes.shape)
        values = self.codes.to(self.scale.dtype)
        if self.zero_point is not None:
            values = values - self.zero_point.gather(-1, index).to(self.scale.dtype)
        return values * self.scale.gather(-1, index)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = False,
    act_order: bool = False,
    static_groups: bool = False,
    block_size: int = 128,
    damp: float = 0.01,
    mse_clip: bool = False,
    scale_dtype: torch.dtype | None = None,
    group_fit: str = "block-start",
    name: str = "weight",
) -> GptqResult:
    """Quantize ``weight`` ``[out, in]`` (or ``[E, out, in]``) by GPTQ with its Hessian ``[in, in]`` (``[E, in, in]``).

    ``scale_dtype`` defaults to the weight's storage dtype; ``group_fit`` is ``"block-start"`` (the
    reference's rule) or ``"current"`` (see the module docstring); ``name`` names the weight in errors.
    """
    _check(weight, hessian, bits, group_size, block_size, name)
    if group_fit not in GROUP_FITS:
        raise QuantkitError(f"{name}: GPTQ group fit must be one of {', '.join(GROUP_FITS)}, got {group_fit!r}")
    batched = weight.ndim == 3
    W = (weight if batched else weight.unsqueeze(0)).to(torch.float32, copy=True)  # (E, rows, columns)
    H = (hessian if batched else hessian.unsqueeze(0)).to(torch.float32, copy=True)  # (E, columns, columns)
    experts, rows, columns = W.shape
    group = group_size or columns
    static = static_groups and group_size is not None
    grid = Grid(bits, symmetric, scale_dtype or storage_dtype(weight), clip="mse" if mse_clip else "minmax")

    # No calibration token: identity instead of H = 0 (all columns dead), i.e. round-to-nearest. (H is positive
    # semi-definite, so a zero diagonal means H = 0.)
    H[(H.diagonal(dim1=-2, dim2=-1) == 0).all(dim=-1)] = torch.eye(columns, device=H.device)

    # ref: dead = torch.diag(H) == 0; H[dead, dead] = 1; W[:, dead] = 0
    dead = H.diagonal(dim1=-2, dim2=-1) == 0
    H.diagonal(dim1=-2, dim2=-1).masked_fill_(dead, 1)
    W.masked_fill_(dead.unsqueeze(1), 0)

    n_groups = -(-columns // group)  # the last group is shorter when group does not divide columns
    scale = torch.empty(experts, rows, n_groups, dtype=grid.dtype, device=W.device)
    zero = None if symmetric else torch.empty(experts, rows, n_groups, device=W.device)
    if static:  # ref: quantizer.find_params(W[:, i:(i + groupsize)], weight=True) for every group, before act-order
        scale, zero = _group_params(grid, W, group)

    # ref: perm = torch.argsort(torch.diag(H), descending=True); W = W[:, perm]; H = H[perm][:, perm]
    if act_order:
        perm = torch.argsort(H.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True, stable=True)  # (E, columns)
        H = H.gather(-2, perm.unsqueeze(-1).expand(-1, -1, columns))
        H = H.gather(-1, perm.unsqueeze(1).expand(-1, columns, -1))
    else:
        perm = torch.arange(columns, device=W.device).expand(experts, columns)
    # From here on the weight is held transposed, Wt (E, columns, rows): the reference's column W[:, j] is the row
    # Wt[:, j], so a column and the columns after it are contiguous (the per-column update is memory-bound).
    Wt = W.transpose(1, 2).gather(1, perm.unsqueeze(-1).expand(-1, -1, rows))
    del W

    Hinv, used_damp, retries = _inverse_cholesky_upper(H, damp, name)
    del H

    codes = torch.empty(Wt.shape, dtype=torch.int8, device=Wt.device)  # (E, columns, rows)
    row_loss = torch.zeros(experts, rows, device=Wt.device)
    block_start = group_fit == "block-start" and group_size is not None and not static
    block = block_size if block_start else _block_columns(block_size, None if static else group_size)
    for i1 in range(0, columns, block):  # ref: for i1 in range(0, self.columns, blocksize)
        i2 = min(i1 + block, columns)
        # the reference's W for a group starting inside the block: the block's columns (and a group reaching past
        # it) as they were at the block's start; at the block's start itself the current weights are those
        inner = block_start and (i1 // group + 1) * group < i2
        started = Wt[:, i1 : i2 + group].clone() if inner else Wt
        offset = i1 if inner else 0
        W1 = Wt[:, i1:i2]  # a view (ref: W[:, i1:i2].clone()), so Wt holds the current weights of the block
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            column = i1 + i
            if static:  # ref: self.quantizer = groups[perm[i1 + i] // groupsize]
                index = (perm[:, column] // group).view(experts, 1, 1).expand(-1, rows, 1)
                col_scale, col_zero = scale.gather(-1, index).squeeze(-1), _gather(zero, index)
            else:
                k = column // group
                if column % group == 0:  # ref: self.quantizer.find_params(W[:, (i1 + i):(i1 + i + groupsize)])
                    fitted = started[:, column - offset : column - offset + group]
                    group_scale, group_zero = _group_params(grid, fitted.transpose(1, 2), group)
                    scale[..., k : k + 1] = group_scale
                    if zero is not None and group_zero is not None:
                        zero[..., k : k + 1] = group_zero
                col_scale, col_zero = scale[..., k], None if zero is None else zero[..., k]

            w = W1[:, i]  # (E, rows)
            d = Hinv1[:, i, i].unsqueeze(-1)  # (E, 1)
            col_codes = grid.codes(w, col_scale, col_zero)  # ref: q = quantize(w.unsqueeze(1), scale, zero, maxq)
            q = grid.dequantize(col_codes, col_scale, col_zero)
            diff = w - q
            row_loss += diff**2 / d**2 / 2  # ref: Losses1[:, i] = (w - q) ** 2 / d ** 2; Losses1 / 2

            err1 = diff / d  # ref: err1 = (w - q) / d
            # ref: W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0)), an outer product
            W1[:, i + 1 :] -= Hinv1[:, i, i + 1 :].unsqueeze(-1) * err1.unsqueeze(-2)
            W1[:, i] = q  # ref: Q1[:, i] = q (Wt becomes Q column by column)
            codes[:, column] = col_codes
            Err1[:, i] = err1

        Wt[:, i2:] -= Hinv[:, i1:i2, i2:].transpose(1, 2) @ Err1  # ref: W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

    # ref: Q = Q[:, invperm], here back to (E, rows, columns) in the same pass
    natural = torch.argsort(perm, dim=-1).unsqueeze(1).expand(-1, rows, -1)
    g_idx = None
    if act_order and group_size is not None and not static:  # column perm[j] is in group j // group
        order = torch.arange(columns, device=Wt.device).expand_as(perm)
        g_idx = torch.empty_like(perm).scatter_(-1, perm, order // group).to(torch.int32)
    config = replace(grid.config, granularity="group" if group_size else "channel", group_size=group_size)

    def unbatch(t: torch.Tensor) -> torch.Tensor:
        return t if batched else t[0]

    return GptqResult(
        codes=unbatch(codes.transpose(1, 2).gather(-1, natural)),
        scale=unbatch(scale),
        zero_point=None if zero is None else unbatch(zero.to(torch.int8)),
        g_idx=None if g_idx is None else unbatch(g_idx),
        dequantized=unbatch(Wt.transpose(1, 2).gather(-1, natural)),
        row_loss=unbatch(row_loss),
        damp=unbatch(used_damp),
        retries=unbatch(retries),
        config=config,
    )


def _check(
    weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None, block_size: int, name: str
) -> None:
    if weight.ndim not in (2, 3) or hessian.shape != (*weight.shape[:-2], weight.shape[-1], weight.shape[-1]):
        raise QuantkitError(
            f"{name}: GPTQ needs a weight [out, in] or [E, out, in] and a Hessian [in, in] or [E, in, in], "
            f"got {list(weight.shape)} and {list(hessian.shape)}"
        )
    if not MIN_BITS <= bits <= MAX_BITS:
        raise QuantkitError(f"{name}: GPTQ bits must be between {MIN_BITS} and {MAX_BITS}, got {bits}")
    if group_size is not None and group_size <= 0:
        raise QuantkitError(f"{name}: GPTQ group size must be positive (None for per channel), got {group_size}")
    if block_size < 1:
        raise QuantkitError(f"{name}: GPTQ block size must be positive, got {block_size}")


def _group_params(grid: Grid, W: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point ``[E, rows, n_groups]`` of the groups of ``group`` consecutive columns of ``W``.

    The last group is shorter when ``group`` does not divide the columns; its range is its own columns only.
    """
    experts, rows, columns = W.shape
    full = columns - columns % group
    pieces = [W[..., :full].reshape(experts * rows, full // group, group)] if full else []
    if full < columns:
        pieces.append(W[..., full:].reshape(experts * rows, 1, columns - full))
    params = [grid.params(piece) for piece in pieces]
    scale = torch.cat([p[0] for p in params], dim=-1)
    zeros = [p[1] for p in params if p[1] is not None]
    zero = torch.cat(zeros, dim=-1) if zeros else None
    return scale.view(experts, rows, -1), None if zero is None else zero.view(experts, rows, -1)


def _gather(t: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    """``t[e, r, index[e, r, 0]]`` as ``[E, rows]``."""
    return None if t is None else t.gather(-1, index).squeeze(-1)


def _block_columns(block_size: int, group_size: int | None) -> int:
    """The block size, shortened if needed so that no group starts inside a block and ends past it."""
    if group_size is None or block_size % group_size == 0 or group_size % block_size == 0:
        return block_size
    return block_size - block_size % group_size if group_size < block_size else group_size


def _inverse_cholesky_upper(
    H: torch.Tensor, damp: float, name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of the dampened ``H^-1`` per expert, with the dampening used and the retries.

    An expert whose dampened ``H`` is not positive definite (or whose factors are not finite) is retried
    with :data:`RETRY_FACTOR` times the dampening, at most :data:`MAX_RETRIES` times. ``H`` is dampened in place.
    """
    experts = H.shape[0]
    undamped_diag = H.diagonal(dim1=-2, dim2=-1).clone()
    Hinv, ok = _dampened_inverse_cholesky_upper(H, damp)
    used = torch.full((experts,), damp, dtype=torch.float64)
    retries = torch.zeros(experts, dtype=torch.int64)
    pending = (~ok).nonzero().flatten()
    for retry in range(1, MAX_RETRIES + 1):
        if len(pending) == 0:
            break
        fraction = damp * RETRY_FACTOR**retry
        Hd = H[pending]
        Hd.diagonal(dim1=-2, dim2=-1).copy_(undamped_diag[pending])
        Hinv[pending], ok = _dampened_inverse_cholesky_upper(Hd, fraction)
        used[pending.cpu()] = fraction
        retries[pending.cpu()] = retry
        pending = pending[~ok]
    if len(pending) == 0:
        return Hinv, used, retries
    experts_text = "" if experts == 1 else f" (experts {pending.tolist()})"
    raise QuantkitError(
        f"{name}: GPTQ Hessian is not positive definite{experts_text} even with dampening "
        f"{damp * RETRY_FACTOR**MAX_RETRIES:g} of its mean diagonal; check the calibration inputs for NaN or inf"
    )


def _dampened_inverse_cholesky_upper(H: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``cholesky(inverse(H + fraction * mean(diag H) * I), upper=True)`` per expert, and which succeeded."""
    diag = H.diagonal(dim1=-2, dim2=-1)
    # ref: damp = percdamp * torch.mean(torch.diag(H)); H[diag, diag] += damp. The mean is taken over a contiguous
    # copy, as torch.diag makes: over the strided view its float32 sum rounds differently.
    diag += fraction * torch.mean(diag.clone(), dim=-1, keepdim=True)
    L, info = torch.linalg.cholesky_ex(H)  # ref: H = torch.linalg.cholesky(H)
    # ref: H = torch.cholesky_inverse(H); H = torch.linalg.cholesky(H, upper=True)
    U, info_inverse = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    # a non-finite entry of U reaches the diagonal of its column, so checking the diagonal suffices
    return U, (info == 0) & (info_inverse == 0) & U.diagonal(dim1=-2, dim2=-1).isfinite().all(dim=-1)
