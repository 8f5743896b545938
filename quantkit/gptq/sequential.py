"""GPTQ over a model: decoder layers one at a time, true-sequential inside each layer.

For each layer (:class:`~quantkit.pipeline.LayerPipeline`)::

    sites  = the layer's input sites in execution order     (one batch, taps only)
    stages = the sites grouped so that no site of a stage depends on another's weights
             (:mod:`quantkit.gptq.stages`: probed on the first batch, once per kind of layer)
    for stage in stages:                                    ({q_a}, {q_b, kv_b}, {o}, {gate/up, shared gate/up}, ...)
        H = Hessians of the stage's inputs over every batch  (one pass; earlier stages already quantized)
        solve GPTQ for every weight fed by each site        (experts: one batched solve)
        write the dequantized Q back into the layer
    inputs of layer i+1 = layer i's outputs with every weight quantized

Each pass stops once its stage's sites have their inputs and replays the outputs of submodules that are
already final (:mod:`quantkit.gptq.replay`). Each site's Hessian is the one a pass per site in
execution order would give, bit for bit. Without
``true_sequential`` all sites form one stage: one pass over the layer's float weights, and the
dequantized weights are written back only when every site of the layer is solved.

Routed experts: one Hessian per expert from the tokens routed to it (every token with
``all_experts``); gate and up share it (one solve of the fused ``[E, 2I, H]`` weight, rows are
independent in GPTQ). An expert with fewer than ``min_expert_tokens`` tokens gets the blended
Hessian ``(n H_e + (K - n) H_mean) / K`` (``n`` its tokens, ``K`` the threshold, ``H_mean`` the
token-weighted mean of all the layer's experts, ``2/N sum x x^T`` over every (token, expert) input of
the site, pooled in the first chunk's pass): the missing tokens are stood in for by the layer's typical
input. With no token at all in any expert, H is the identity: round-to-nearest. ``max_memory`` (by
default half the available memory) splits a layer's experts into chunks (:func:`experts_per_chunk`,
the budget shared by the experts sites of a stage): the first chunk rides in the stage's pass, every
other chunk has a pass of its own. The output does not depend on the chunking.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantkit.calib.observers import LayerTaps
from quantkit.errors import QuantkitError
from quantkit.gptq.budget import auto_budget, experts_per_chunk
from quantkit.gptq.hessian import HessianAccumulator
from quantkit.gptq.replay import Replay, Spans
from quantkit.gptq.stages import InputDigests, StageCache, StagePasses
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
    passes: int = 1  # passes over every calibration batch: Hessians, then the quantized outputs
    stages: list[list[str]] = field(default_factory=list)  # sites whose Hessians shared a pass
    experts_per_chunk: dict[str, int] = field(default_factory=dict)  # per experts site: solved at once


def gptq_layers(
    pipeline: LayerPipeline,
    states: LayerStates,
    schemes: dict[str, GptqConfig],
    *,
    all_experts: bool = False,
    min_expert_tokens: int = 16,
    scale_dtype: torch.dtype | None = None,
    max_memory: int | None = None,
    true_sequential: bool = True,
    merge_passes: bool = True,
    shortcuts: bool = True,
    on_step: Callable[[str], None] | None = None,
) -> Iterator[LayerResult]:
    """Quantize every weight named (on disk) in ``schemes`` with GPTQ, layer by layer; yields per layer.

    ``max_memory`` (bytes; None: half the available memory) bounds the experts solved at once
    (:func:`experts_per_chunk`); ``on_step``
    hears what is being solved (a site, or a chunk of experts), for progress display. Without
    ``true_sequential`` a layer's Hessians all come from one pass over its float weights;
    ``merge_passes=False`` gives each site a pass of its own (the same results, more passes);
    ``shortcuts=False`` runs every pass over the whole layer (:mod:`quantkit.gptq.replay`; the same results).
    """
    solver = _Solver(pipeline, schemes, all_experts, min_expert_tokens, scale_dtype, max_memory, on_step)
    solver.deferred = None if true_sequential else []
    cache = StageCache()
    for index in range(pipeline.num_layers):
        started = time.perf_counter()
        layer = pipeline.load_layer(index)
        prefix = pipeline.layer_prefix(index)
        aliases: dict[str, str] = {}
        spans = Spans([])
        order = _first_batch(pipeline, layer, prefix, states, aliases, hashing=False, spans=spans).order
        sites = {s.name: s for s in (solver.site(layer, prefix, name, aliases) for name in order) if s is not None}
        solver.replay = Replay(layer, prefix, spans, {n: s.members() for n, s in sites.items()}, shortcuts)
        if not true_sequential:
            stages = [list(sites)] if sites else []
        elif not merge_passes:
            stages = [[name] for name in sites]
        else:
            probe = functools.partial(_first_batch, pipeline, layer, prefix, states, {})
            stages = cache.stages(type(layer).__name__, prefix, {n: s.tensors() for n, s in sites.items()},
                                  probe)
        passes = solver.passes
        solved: dict[str, list[GptqWeight]] = {}
        for stage in stages:
            solved.update(solver.solve_stage(layer, prefix, [sites[name] for name in stage], states))
            if solver.deferred is None:  # written into the layer
                solver.replay.finalize(stage)
        solver.write_deferred()
        states.hidden = _quantized_outputs(pipeline, layer, prefix, states, solver.replay).hidden
        pipeline.release(layer)
        weights = [w for name in sites for w in solved.pop(name)]  # the only reference: the writer frees them
        chunks, solver.chunks = solver.chunks, {}
        yield LayerResult(index, weights, time.perf_counter() - started, solver.passes - passes + 1, stages, chunks)
    head = pipeline.output_head_name()
    if head is not None and pipeline.arch.disk_name(f"{head}.weight") in schemes:
        started = time.perf_counter()
        module: Any = pipeline.load(head)
        hessian = HessianAccumulator(int(module.weight.shape[1]))
        for hidden in pipeline.final_norm(states):
            hessian.add(hidden.reshape(-1, hidden.shape[-1]))
        weights = solver.solve_linears([(head, module)], hessian)
        solver.write_deferred()
        pipeline.release(module)
        yield LayerResult(pipeline.num_layers, weights, time.perf_counter() - started)


def _first_batch(pipeline: LayerPipeline, layer: nn.Module, prefix: str, states: LayerStates,
                 aliases: dict[str, str], hashing: bool = True, spans: Spans | None = None) -> InputDigests:
    """The layer's input sites in the order the forward pass reaches them, and what each received (first batch);
    ``spans`` hears where each submodule returns in that order."""
    digests = InputDigests(hashing)
    taps = LayerTaps(digests, pipeline.arch, aliases)
    if spans is not None:
        spans.order = digests.order
    with taps.attach(prefix, layer), spans.attach(layer) if spans is not None else contextlib.nullcontext():
        pipeline.run_layer(layer, LayerStates(states.hidden[:1], states.kwargs), on_batch=taps.next_batch)
    return digests


def _quantized_outputs(pipeline: LayerPipeline, layer: nn.Module, prefix: str, states: LayerStates,
                       replay: Replay) -> LayerStates:
    """The layer's outputs with its quantized weights (experts through the same eager loop as the taps)."""
    taps = LayerTaps(lambda *_: None, pipeline.arch, {}, only=set())
    with taps.attach(prefix, layer):
        return replay.run(states, taps.next_batch)


@dataclass
class _Site:
    """One input site with weights for GPTQ: the linears it feeds, or one fused parameter of routed experts."""

    name: str
    linears: list[tuple[str, Any]] = field(default_factory=list)  # (in-memory name, module), GPTQ's only
    experts: Any = None  # the fused experts module
    param: str = ""  # its gate_up_proj or down_proj
    names: list[str] = field(default_factory=list)  # the experts' on-disk weights, expert-major

    def members(self) -> list[str]:
        """The in-memory names of what it quantizes: its linears, or its experts parameter."""
        return [m for m, _ in self.linears] or [self.name]

    def tensors(self) -> list[torch.Tensor]:
        """The weights GPTQ replaces."""
        return [getattr(self.experts, self.param)] if self.experts is not None else [m.weight for _, m in self.linears]


class _Solver:
    """Hessians and GPTQ solves for the sites of one layer at a time."""

    def __init__(self, pipeline: LayerPipeline, schemes: dict[str, GptqConfig], all_experts: bool,
                 min_expert_tokens: int, scale_dtype: torch.dtype | None, max_memory: int | None,
                 on_step: Callable[[str], None] | None) -> None:
        self.pipeline, self.arch, self.schemes = pipeline, pipeline.arch, schemes
        self.all_experts, self.min_expert_tokens = all_experts, min_expert_tokens
        self.scale_dtype, self.max_memory = scale_dtype, max_memory
        self.on_step = on_step or (lambda _: None)
        self.passes = 0  # Hessian passes over every calibration batch so far
        self.deferred: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # writes held back (not true-sequential)
        self.pooled: dict[str, HessianAccumulator] = {}  # per experts site of the layer: every expert's inputs
        self.chunks: dict[str, int] = {}  # per experts site of the layer: experts solved at once
        self.replay: Replay  # the passes over the current layer

    def site(self, layer: nn.Module, prefix: str, site: str, aliases: dict[str, str]) -> _Site | None:
        """What GPTQ solves at ``site``; None when it feeds no weight GPTQ quantizes."""
        relative = site.removeprefix(f"{prefix}.")
        owner = layer.get_submodule(relative.rpartition(".")[0]) if "." in relative else layer
        if is_fused_experts(owner):
            param = relative.rpartition(".")[2]
            names = self._expert_names(site.rpartition(".")[0], param, owner)
            return _Site(site, experts=owner, param=param, names=names) if any(n in self.schemes for n in names) \
                else None
        members = [site, *sorted(m for m, s in aliases.items() if s == site)]
        linears = [(m, layer.get_submodule(m.removeprefix(f"{prefix}."))) for m in members]
        linears = [(m, mod) for m, mod in linears if self.arch.disk_name(f"{m}.weight") in self.schemes]
        return _Site(site, linears) if linears else None

    def solve_stage(self, layer: nn.Module, prefix: str, stage: list[_Site],
                    states: LayerStates) -> dict[str, list[GptqWeight]]:
        """Solve the sites of one stage, their Hessians from one pass (plus one per further chunk of experts); the
        stage's experts sites share ``max_memory``."""
        experts_sites = sum(site.experts is not None for site in stage)
        budget = self.max_memory if self.max_memory is not None or not experts_sites else auto_budget()
        if budget is not None and experts_sites > 1:
            budget //= experts_sites
        chunk = functools.partial(experts_per_chunk, max_memory=budget)
        first: dict[str, range | None] = {}
        for site in stage:
            experts, rows, columns = getattr(site.experts, site.param).shape if site.experts is not None else (0, 0, 0)
            first[site.name] = range(min(experts, chunk(rows, columns))) if site.experts is not None else None
        hessians = StagePasses(functools.partial(self.hessians, layer, prefix, states=states), first, chunk)
        out: dict[str, list[GptqWeight]] = {}
        for site in stage:
            if site.experts is not None:
                out[site.name] = self._solve_experts(site.name, site.experts, site.param, site.names, hessians)
            else:
                self.on_step(site.name)
                out[site.name] = self.solve_linears(site.linears, hessians.get(site.name))
        return out

    def solve_linears(self, linears: list[tuple[str, Any]], hessian: HessianAccumulator) -> list[GptqWeight]:
        """One GPTQ solve per linear, all with the Hessian of their shared input."""
        out = []
        for name, module in linears:
            disk = self.arch.disk_name(f"{name}.weight")
            scheme = self.schemes[disk]
            original = module.weight.detach().to(self._disk_dtype(disk), copy=True)  # exact: read from it
            result = self._gptq(original.float(), hessian.hessian, scheme, disk)
            self._write(module.weight.data, result.dequantized.to(module.weight.dtype))
            out.append(_record(disk, original, result, scheme, hessian.tokens[0], None))
        return out

    def write_deferred(self) -> None:
        """Write back the dequantized weights held back until the layer's last solve."""
        if self.deferred:
            for target, value in self.deferred:
                target.copy_(value)
            self.deferred.clear()

    def _write(self, target: torch.Tensor, value: torch.Tensor) -> None:
        if self.deferred is None:
            target.copy_(value)
        else:
            self.deferred.append((target, value))

    def _expert_names(self, experts_prefix: str, param: str, module: Any) -> list[str]:
        """On-disk per-expert names (expert-major; gate before up) of the fused ``param``."""
        assert self.arch.experts is not None
        fused = getattr(module, param)
        return list(self.arch.experts.fused_shapes(self.arch.disk_name(f"{experts_prefix}.{param}"),
                                                   tuple(fused.shape)))

    def _solve_experts(self, site: str, module: Any, param: str, names: list[str],
                       hessians: StagePasses) -> list[GptqWeight]:
        """Batched solves of the experts of ``param``, ``max_memory`` permitting all at once (gate and up rows
        together: GPTQ's rows are independent)."""
        configs = {self.schemes.get(n) for n in names}
        if len(configs) != 1 or None in configs:
            raise QuantkitError(f"GPTQ quantizes all experts of {site} with one scheme; the recipe mixes them")
        scheme = self.schemes[names[0]]
        fused = getattr(module, param)
        experts, rows_total, columns = (int(d) for d in fused.shape)
        chunk = hessians.experts_per_chunk(rows_total, columns)
        self.chunks[site] = min(chunk, experts)
        per_name = len(names) // experts  # 2 (gate, up) or 1 (down)
        rows = rows_total // per_name
        out = []
        for first in range(0, experts, chunk):
            chosen = range(first, min(first + chunk, experts))
            self.on_step(f"{site} experts {first}-{chosen.stop - 1} of {experts}")
            hessian = hessians.get(site, chosen)
            H, notes = self._starved_fallback(hessian.hessian, hessian.tokens, self.pooled.get(site))
            # kept for the report's error and the writer, in the checkpoint's dtype (exact: read from it)
            original = fused[first : chosen.stop].detach().to(self._disk_dtype(names[first * per_name]), copy=True)
            result = self._gptq(original.float(), H, scheme, names[first * per_name])
            self._write(fused.data[first : chosen.stop], result.dequantized.to(fused.dtype))
            for i, part in enumerate(result.experts()):
                e = first + i
                for k, name in enumerate(names[e * per_name : (e + 1) * per_name]):
                    start, stop = k * rows, (k + 1) * rows
                    out.append(_record(name, original[i, start:stop], _slice_rows(part, start, stop), scheme,
                                       hessian.tokens[i], notes.get(i)))
        self.pooled.pop(site, None)
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

    def hessians(self, layer: nn.Module, prefix: str, requests: dict[str, range | None], *,
                 states: LayerStates) -> dict[str, HessianAccumulator]:
        """The Hessians of the sites in ``requests`` over every batch, in one pass (with the layer's weights as they
        are now); for an experts site, of the experts in its range only (indexed from its start). An experts site's
        first pass also pools every expert's inputs into ``self.pooled`` (the mean a starved expert leans on),
        unless no expert can be starved."""
        accumulators: dict[str, HessianAccumulator] = {}
        can_starve = states.tokens < self.min_expert_tokens if self.all_experts else self.min_expert_tokens > 0
        pooling = {site for site, experts in requests.items()
                   if experts is not None and can_starve and site not in self.pooled}

        def add(name: str, num_experts: int, expert: int, x: torch.Tensor) -> None:
            if name in pooling:
                if name not in self.pooled:
                    self.pooled[name] = HessianAccumulator(x.shape[-1], device=x.device)
                self.pooled[name].add(x.float())
            experts = requests[name]
            if name not in accumulators:  # before the range filter: a chunk of starved experts gets zeros
                count = len(experts) if experts is not None else num_experts
                accumulators[name] = HessianAccumulator(x.shape[-1], count if num_experts > 1 else None,
                                                        device=x.device)
            if experts is not None and expert not in experts:
                return
            index = expert - experts.start if experts is not None else expert
            accumulators[name].add(x.float(), index if num_experts > 1 else None)

        taps = LayerTaps(add, self.arch, {}, all_experts=self.all_experts, only=set(requests))
        with taps.attach(prefix, layer):
            self.replay.run(states, taps.next_batch, stage=list(requests))
        self.passes += 1
        for site in requests:
            if site not in accumulators:
                raise QuantkitError(f"{site} received no calibration input")
        return accumulators

    def _gptq(self, weight: torch.Tensor, hessian: torch.Tensor, scheme: GptqConfig, name: str) -> GptqResult:
        """GPTQ with ``scheme``'s options; scales rounded to the on-disk dtype of ``name``."""
        return gptq_quantize(
            weight, hessian, bits=scheme.bits, group_size=scheme.group_size if scheme.granularity == "group" else None,
            symmetric=scheme.symmetric, act_order=scheme.act_order, static_groups=scheme.static_groups,
            block_size=scheme.block_size, damp=scheme.damp, mse_clip=scheme.clip == "mse",
            scale_dtype=self.scale_dtype or self._disk_dtype(name), group_fit=scheme.group_fit, name=name,
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
