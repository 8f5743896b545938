"""GPTQ over a model: decoder layers one at a time, true-sequential inside each layer.

For each layer (:class:`~quantkit.pipeline.LayerPipeline`)::

    order = the layer's input sites in execution order      (one batch, taps only)
    for site in order:                                      (q/k/v... -> o_proj -> gate/up -> down)
        H = Hessian of the site's inputs over every batch   (earlier sites already quantized)
        solve GPTQ for every weight fed by the site         (experts: one batched solve)
        write the dequantized Q back into the layer
    inputs of layer i+1 = layer i's outputs with every weight quantized

Routed experts: one Hessian per expert from the tokens routed to it (every token with
``all_experts``); gate and up share it (one solve of the fused ``[E, 2I, H]`` weight, rows are
independent in GPTQ). An expert with fewer than ``min_expert_tokens`` tokens gets the blended
Hessian ``(n H_e + (K - n) H_mean) / K`` (``n`` its tokens, ``K`` the threshold, ``H_mean`` the
token-weighted mean of all the layer's experts, ``2/N sum x x^T`` over every (token, expert) input of
the site, accumulated in the first chunk's pass): the missing tokens are stood in for by the layer's
typical input. With no token at all in any expert, H is the identity: round-to-nearest.
``max_memory`` splits a layer's experts into chunks (:func:`experts_per_chunk`), each with its own
Hessian pass and batched solve; the result does not depend on the chunking.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantkit import heap
from quantkit.calib.observers import LayerTaps
from quantkit.errors import QuantkitError
from quantkit.gptq.hessian import HessianAccumulator
from quantkit.model.experts import is_fused_experts
from quantkit.pipeline import LayerPipeline, LayerStates
from quantkit.schemes.base import IntQuantized, storage_dtype
from quantkit.schemes.gptq import GptqConfig
from quantkit.schemes.gptq_solver import GptqResult, gptq_quantize


@dataclass
class GptqWeight:
    """One quantized on-disk weight and how GPTQ got there."""

    name: str
    original: torch.Tensor  # the float weight before quantization
    quantized: IntQuantized
    loss: float  # the reference's sum of (w - q)^2 / d^2 / 2
    damp: float  # dampening used, as a fraction of mean(diag(H))
    retries: int
    tokens: int  # calibration tokens behind the Hessian
    fallback: str | None  # why the Hessian is not (only) this weight's own


@dataclass
class LayerResult:
    index: int
    weights: list[GptqWeight]
    seconds: float


def gptq_layers(
    pipeline: LayerPipeline,
    states: LayerStates,
    schemes: dict[str, GptqConfig],
    *,
    all_experts: bool = False,
    min_expert_tokens: int = 16,
    scale_dtype: torch.dtype | None = None,
    max_memory: int | None = None,
    on_step: Callable[[str], None] | None = None,
) -> Iterator[LayerResult]:
    """Quantize every weight named (on disk) in ``schemes`` with GPTQ, layer by layer; yields per layer.

    ``max_memory`` (bytes; None: from the available memory) bounds the experts solved at once
    (:func:`experts_per_chunk`); ``on_step``
    hears what is being solved (a site, or a chunk of experts), for progress display.
    """
    solver = _Solver(pipeline, schemes, all_experts, min_expert_tokens, scale_dtype, max_memory, on_step)
    for index in range(pipeline.num_layers):
        started = time.perf_counter()
        layer = pipeline.load_layer(index)
        prefix = pipeline.layer_prefix(index)
        weights: list[GptqWeight] = []
        aliases: dict[str, str] = {}
        for site in _site_order(pipeline, layer, prefix, states, aliases):
            weights += solver.solve_site(layer, prefix, site, aliases, states)
        states.hidden = _quantized_outputs(pipeline, layer, prefix, states).hidden
        pipeline.release(layer)
        yield LayerResult(index, weights, time.perf_counter() - started)
    head = pipeline.output_head_name()
    if head is not None and pipeline.arch.disk_name(f"{head}.weight") in schemes:
        started = time.perf_counter()
        module: Any = pipeline.load(head)
        hessian = HessianAccumulator(int(module.weight.shape[1]))
        for hidden in pipeline.final_norm(states):
            hessian.add(hidden.reshape(-1, hidden.shape[-1]))
        weights = solver.solve_linears([(head, module)], hessian)
        pipeline.release(module)
        yield LayerResult(pipeline.num_layers, weights, time.perf_counter() - started)


BYTES_PER_HESSIAN_ELEMENT = 4 * 4  # float32 H, plus its damped copy, Cholesky factor and inverse
BYTES_PER_WEIGHT_ELEMENT = 4 * 4  # float32 W, its working copy, Q and the error block


AUTO_BUDGET_FRACTION = 0.5  # of the memory available when a site's experts are solved


def experts_per_chunk(rows: int, columns: int, max_memory: int | None) -> int:
    """Experts GPTQ solves at once: ``max_memory // (16 * columns^2 + 16 * rows * columns)`` (at least 1).

    Per expert: float32 Hessian ``[columns, columns]`` with its dampened copy, Cholesky factor and
    inverse (16 bytes per element), and the float32 weight ``[rows, columns]`` with its working copy,
    dequantized result and error block (16 bytes per element). No budget (None): half the memory
    available now (:func:`quantkit.heap.available`), or all experts at once where that is unknown.
    The output does not depend on the chunking.
    """
    if max_memory is None:
        available = heap.available()
        if available is None:
            return 1 << 30
        max_memory = int(available * AUTO_BUDGET_FRACTION)
    per_expert = BYTES_PER_HESSIAN_ELEMENT * columns * columns + BYTES_PER_WEIGHT_ELEMENT * rows * columns
    return max(1, max_memory // per_expert)


def _site_order(pipeline: LayerPipeline, layer: nn.Module, prefix: str, states: LayerStates,
                aliases: dict[str, str]) -> list[str]:
    """The layer's input sites in the order the forward pass reaches them (first batch only)."""
    order: list[str] = []

    def record(site: str, num_experts: int, expert: int, x: torch.Tensor) -> None:
        if site not in order:
            order.append(site)

    taps = LayerTaps(record, pipeline.arch, aliases)
    with taps.attach(prefix, layer):
        pipeline.run_layer(layer, LayerStates(states.hidden[:1], states.kwargs), on_batch=taps.next_batch)
    return order


def _quantized_outputs(pipeline: LayerPipeline, layer: nn.Module, prefix: str, states: LayerStates) -> LayerStates:
    """The layer's outputs with its quantized weights (experts through the same eager loop as the taps)."""
    taps = LayerTaps(lambda *_: None, pipeline.arch, {}, only=set())
    with taps.attach(prefix, layer):
        return pipeline.run_layer(layer, states, on_batch=taps.next_batch)


class _Solver:
    """Hessians and GPTQ solves for the sites of one layer at a time."""

    def __init__(self, pipeline: LayerPipeline, schemes: dict[str, GptqConfig], all_experts: bool,
                 min_expert_tokens: int, scale_dtype: torch.dtype | None, max_memory: int | None,
                 on_step: Callable[[str], None] | None) -> None:
        self.pipeline, self.arch, self.schemes = pipeline, pipeline.arch, schemes
        self.all_experts, self.min_expert_tokens = all_experts, min_expert_tokens
        self.scale_dtype, self.max_memory = scale_dtype, max_memory
        self.on_step = on_step or (lambda _: None)

    def solve_site(self, layer: nn.Module, prefix: str, site: str, aliases: dict[str, str],
                   states: LayerStates) -> list[GptqWeight]:
        relative = site.removeprefix(f"{prefix}.")
        owner = layer.get_submodule(relative.rpartition(".")[0]) if "." in relative else layer
        if is_fused_experts(owner):
            param = relative.rpartition(".")[2]
            experts_prefix = site.rpartition(".")[0]
            names = self._expert_names(experts_prefix, param, owner)
            if not any(n in self.schemes for n in names):
                return []
            return self._solve_experts(layer, prefix, site, owner, param, names, states)
        members = [site, *sorted(m for m, s in aliases.items() if s == site)]
        linears = [(m, layer.get_submodule(m.removeprefix(f"{prefix}."))) for m in members]
        linears = [(m, mod) for m, mod in linears if self.arch.disk_name(f"{m}.weight") in self.schemes]
        if not linears:
            return []
        self.on_step(site)
        return self.solve_linears(linears, self._hessian(layer, prefix, site, states)[0])

    def solve_linears(self, linears: list[tuple[str, Any]], hessian: HessianAccumulator) -> list[GptqWeight]:
        """One GPTQ solve per linear, all with the Hessian of their shared input."""
        out = []
        for name, module in linears:
            disk = self.arch.disk_name(f"{name}.weight")
            scheme = self.schemes[disk]
            original = module.weight.detach().to(self._disk_dtype(disk), copy=True)  # exact: read from it
            result = self._gptq(original.float(), hessian.hessian, scheme, disk)
            module.weight.data.copy_(result.dequantized.to(module.weight.dtype))
            out.append(_record(disk, original, result, scheme, hessian.tokens[0], None))
        return out

    def _expert_names(self, experts_prefix: str, param: str, module: Any) -> list[str]:
        """On-disk per-expert names (expert-major; gate before up) of the fused ``param``."""
        assert self.arch.experts is not None
        fused = getattr(module, param)
        return list(self.arch.experts.fused_shapes(self.arch.disk_name(f"{experts_prefix}.{param}"),
                                                   tuple(fused.shape)))

    def _solve_experts(self, layer: nn.Module, prefix: str, site: str, module: Any, param: str, names: list[str],
                       states: LayerStates) -> list[GptqWeight]:
        """Batched solves of the experts of ``param``, ``max_memory`` permitting all at once (gate and up rows
        together: GPTQ's rows are independent)."""
        configs = {self.schemes.get(n) for n in names}
        if len(configs) != 1 or None in configs:
            raise QuantkitError(f"GPTQ quantizes all experts of {site} with one scheme; the recipe mixes them")
        scheme = self.schemes[names[0]]
        fused = getattr(module, param)
        experts, rows_total, columns = (int(d) for d in fused.shape)
        chunk = experts_per_chunk(rows_total, columns, self.max_memory)
        per_name = len(names) // experts  # 2 (gate, up) or 1 (down)
        rows = rows_total // per_name
        out = []
        pooled: HessianAccumulator | None = None  # every expert's inputs: the mean a starved expert leans on
        for first in range(0, experts, chunk):
            chosen = range(first, min(first + chunk, experts))
            self.on_step(f"{site} experts {first}-{chosen.stop - 1} of {experts}")
            hessian, pooled = self._hessian(layer, prefix, site, states, chosen, pooled)
            H, notes = self._starved_fallback(hessian.hessian, hessian.tokens, pooled)
            # kept for the report's error and the writer, in the checkpoint's dtype (exact: read from it)
            original = fused[first : chosen.stop].detach().to(self._disk_dtype(names[first * per_name]), copy=True)
            result = self._gptq(original.float(), H, scheme, names[first * per_name])
            fused.data[first : chosen.stop] = result.dequantized.to(fused.dtype)
            for i, part in enumerate(result.experts()):
                e = first + i
                for k, name in enumerate(names[e * per_name : (e + 1) * per_name]):
                    start, stop = k * rows, (k + 1) * rows
                    out.append(_record(name, original[i, start:stop], _slice_rows(part, start, stop), scheme,
                                       hessian.tokens[i], notes.get(i)))
        return out

    def _starved_fallback(self, H: torch.Tensor, tokens: list[int],
                          pooled: HessianAccumulator | None) -> tuple[torch.Tensor, dict[int, str]]:
        """Blend the Hessians of experts below ``min_expert_tokens`` with the layer's mean expert Hessian
        (``pooled``: every expert's inputs of the site)."""
        k = self.min_expert_tokens
        starved = [e for e, n in enumerate(tokens) if n < k]
        if not starved:
            return H, {}
        notes: dict[int, str] = {}
        if pooled is None or pooled.tokens[0] == 0:
            eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
            return eye.expand_as(H).clone(), {e: "no calibration token reached any expert: round-to-nearest"
                                              for e in range(len(tokens))}
        mean = pooled.hessian
        H = H.clone()
        for e in starved:
            n = tokens[e]
            H[e] = (n * H[e] + (k - n) * mean) / k
            notes[e] = f"{n} tokens (< {k}): Hessian blended with the layer's mean expert Hessian"
        return H, notes

    def _hessian(self, layer: nn.Module, prefix: str, site: str, states: LayerStates,
                 experts: range | None = None, pooled: HessianAccumulator | None = None,
                 ) -> tuple[HessianAccumulator, HessianAccumulator | None]:
        """The Hessian of ``site``'s inputs over every batch (with the layer's already-quantized weights);
        for an experts site, of the experts in ``experts`` only (indexed from its start), and the pooled
        Hessian of every expert's inputs (accumulated in this pass unless ``pooled`` is given; None when
        no expert can be starved)."""
        accumulators: dict[str, HessianAccumulator] = {}
        can_starve = states.tokens < self.min_expert_tokens if self.all_experts else self.min_expert_tokens > 0
        pool = pooled is None and experts is not None and can_starve

        def add(name: str, num_experts: int, expert: int, x: torch.Tensor) -> None:
            if pool and name == site:
                if "pooled" not in accumulators:
                    accumulators["pooled"] = HessianAccumulator(x.shape[-1], device=x.device)
                accumulators["pooled"].add(x.float())
            if name not in accumulators:  # before the chunk filter: a chunk of starved experts gets zeros
                count = len(experts) if experts is not None else num_experts
                accumulators[name] = HessianAccumulator(x.shape[-1], count if num_experts > 1 else None,
                                                        device=x.device)
            if experts is not None and expert not in experts:
                return
            index = expert - experts.start if experts is not None else expert
            accumulators[name].add(x.float(), index if num_experts > 1 else None)

        taps = LayerTaps(add, self.arch, {}, all_experts=self.all_experts, only={site})
        with taps.attach(prefix, layer):
            self.pipeline.run_layer(layer, states, on_batch=taps.next_batch)
        if site not in accumulators:
            raise QuantkitError(f"{site} received no calibration input")
        return accumulators[site], accumulators.get("pooled", pooled)

    def _gptq(self, weight: torch.Tensor, hessian: torch.Tensor, scheme: GptqConfig, name: str) -> GptqResult:
        """GPTQ with ``scheme``'s options; scales rounded to the on-disk dtype of ``name``."""
        return gptq_quantize(
            weight, hessian, bits=scheme.bits, group_size=scheme.group_size if scheme.granularity == "group" else None,
            symmetric=scheme.symmetric, act_order=scheme.act_order, static_groups=scheme.static_groups,
            block_size=scheme.block_size, damp=scheme.damp, mse_clip=scheme.clip == "mse",
            scale_dtype=self.scale_dtype or self._disk_dtype(name), name=name,
        )

    def _disk_dtype(self, name: str) -> torch.dtype:
        tensors = self.pipeline.checkpoint.tensors
        return storage_dtype(torch.empty(0, dtype=tensors[self.arch.stored_in(name, tensors)].dtype))


def _slice_rows(result: GptqResult, start: int, stop: int) -> GptqResult:
    zero = result.zero_point[start:stop] if result.zero_point is not None else None
    return GptqResult(codes=result.codes[start:stop], scale=result.scale[start:stop], zero_point=zero,
                      g_idx=None if result.g_idx is None else result.g_idx.clone(),
                      dequantized=result.dequantized[start:stop],
                      row_loss=result.row_loss[start:stop], damp=result.damp, retries=result.retries,
                      config=result.config)


def _record(name: str, original: torch.Tensor, result: GptqResult, scheme: GptqConfig, tokens: int,
            fallback: str | None) -> GptqWeight:
    quantized = IntQuantized(codes=result.codes, scale=result.scale, zero_point=result.zero_point, config=scheme,
                             g_idx=result.g_idx)
    return GptqWeight(name, original, quantized, float(result.loss), float(result.damp), int(result.retries),
                      tokens, fallback)
