"""Statistics of what each quantizable linear receives, gathered through hooks one layer at a time.

A *site* is one linear input: a plain linear module (``model.layers.0.self_attn.q_proj``)
or one fused expert parameter (``model.layers.1.mlp.experts.gate_up_proj``, whose experts
``e`` each see their own tokens). Per site and expert we keep:

- an |x| histogram (:class:`~quantkit.ranges.histogram.AbsHistogram`, 2048 bins, extended
  at the same width) with the signed min/max;
- the per-input-channel sum of x^2 and the number of tokens: the importance vector
  llama.cpp's imatrix stores (``in_sum2`` and ``counts``) and the diagonal of GPTQ's Hessian.

Linears fed the very same tensor (q/k/v, gate/up) share one site: the later ones are
recorded as aliases of the first, decided on the first batch and checked on every batch.
:class:`LayerTaps` finds the inputs and hands them to a sink: :meth:`Statistics.observe` for
calibration, Hessian accumulation for GPTQ.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.model.archs.base import QUANTIZABLE_ROLES, ArchSpec
from quantkit.model.experts import ExpertTap, is_fused_experts, tap_experts
from quantkit.ranges.histogram import DEFAULT_BINS, AbsHistogram


@dataclass
class SiteStats:
    """Per-expert statistics of one linear input (``num_experts`` is 1 for a plain linear)."""

    name: str
    in_features: int
    num_experts: int = 1
    num_bins: int = DEFAULT_BINS
    histograms: list[AbsHistogram] = field(default_factory=list)
    sum_sq: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # float64 [E, in]
    tokens: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # int64 [E], tokens observed
    routed: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # int64 [E], tokens the router sent

    def __post_init__(self) -> None:
        if not self.histograms:
            self.histograms = [AbsHistogram(self.num_bins, name=self._label(e)) for e in range(self.num_experts)]
        if self.sum_sq.numel() == 0:
            self.sum_sq = torch.zeros(self.num_experts, self.in_features, dtype=torch.float64)
        if self.tokens.numel() == 0:
            self.tokens = torch.zeros(self.num_experts, dtype=torch.int64)
        if self.routed.numel() == 0:
            self.routed = torch.zeros(self.num_experts, dtype=torch.int64)

    def observe(self, x: torch.Tensor, expert: int = 0) -> None:
        rows = x.detach().reshape(-1, x.shape[-1])
        if rows.shape[0] == 0:
            return
        self.histograms[expert].observe(rows)
        self.sum_sq[expert] += rows.to(torch.float64).square().sum(0).cpu()
        self.tokens[expert] += rows.shape[0]
        if self.num_experts == 1:
            self.routed[expert] += rows.shape[0]

    def _label(self, expert: int) -> str:
        return self.name if self.num_experts == 1 else f"{self.name}[{expert}]"


@dataclass
class Statistics:
    """All sites of a model, plus which linear modules share a site."""

    sites: dict[str, SiteStats] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # module name -> site it shares an input with
    num_bins: int = DEFAULT_BINS

    def site(self, name: str) -> SiteStats:
        return self.sites[self.aliases.get(name, name)]

    def observe(self, name: str, num_experts: int, expert: int, x: torch.Tensor) -> None:
        """A :data:`InputSink`: add ``x`` to the statistics of site ``name``, expert ``expert``."""
        self._site(name, num_experts, x.shape[-1]).observe(x, expert)

    def add_routed(self, name: str, num_experts: int, in_features: int, counts: torch.Tensor) -> None:
        """A :data:`RoutingSink`: tokens the router sent to each expert of site ``name``."""
        self._site(name, num_experts, in_features).routed += counts

    def _site(self, name: str, num_experts: int, in_features: int) -> SiteStats:
        site = self.sites.get(name)
        if site is None:
            site = SiteStats(name, in_features, num_experts, self.num_bins)
            self.sites[name] = site
        return site


InputSink = Callable[[str, int, int, torch.Tensor], None]  # (site, experts, expert, 2-D input)
RoutingSink = Callable[[str, int, int, torch.Tensor], None]  # (site, experts, in_features, tokens per expert)


class LayerTaps:
    """Hooks on one loaded decoder layer that hand every quantizable linear's input to a sink.

    ``aliases`` (module -> site) is filled on the first batch and checked on the others; ``only``
    restricts the taps to some sites (GPTQ's sequential steps). Call :meth:`next_batch` before
    each batch.
    """

    def __init__(self, sink: InputSink, arch: ArchSpec, aliases: dict[str, str], *, all_experts: bool = False,
                 routing: RoutingSink | None = None, only: set[str] | None = None) -> None:
        self.sink, self.arch, self.aliases = sink, arch, aliases
        self.all_experts, self.routing, self.only = all_experts, routing, only
        self._seen: dict[tuple[int, tuple[int, ...], tuple[int, ...]], tuple[torch.Tensor, str]] = {}
        self._first_batch = True

    def next_batch(self) -> None:
        """Call before each batch: inputs seen in the previous batch may now be freed."""
        if self._seen:
            self._first_batch = False
        self._seen.clear()

    @contextlib.contextmanager
    def attach(self, prefix: str, layer: nn.Module) -> Iterator[None]:
        """Tap every quantizable linear and fused experts module of ``layer`` (named under ``prefix``)."""
        with contextlib.ExitStack() as stack:
            for name, module in layer.named_modules():
                full = f"{prefix}.{name}" if name else prefix
                if isinstance(module, nn.Linear) and self._quantizable(f"{full}.weight"):
                    handle = module.register_forward_pre_hook(self._linear_hook(full))
                    stack.callback(handle.remove)
                elif is_fused_experts(module):
                    tap, on_routing = self._expert_taps(full, module)
                    stack.enter_context(tap_experts(module, tap, self.all_experts, on_routing))
            self.next_batch()
            yield
            self.next_batch()

    def _wanted(self, site: str) -> bool:
        return self.only is None or site in self.only

    def _quantizable(self, memory_weight: str) -> bool:
        return self.arch.role(self.arch.disk_name(memory_weight)) in QUANTIZABLE_ROLES

    def _linear_hook(self, name: str):  # -> forward pre-hook
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
            shared = self._seen.get(key)
            if shared is not None and shared[0] is x:
                self._check_alias(name, shared[1])
                return
            self._check_alias(name, name)
            self._seen[key] = (x, name)  # holding x keeps its memory from being reused this batch
            if self._wanted(name):
                self.sink(name, 1, 0, x.detach().reshape(-1, x.shape[-1]))

        return hook

    def _check_alias(self, name: str, site: str) -> None:
        if self._first_batch:
            if site != name:
                self.aliases[name] = site
            return
        if self.aliases.get(name, name) != site:
            raise QuantkitError(f"{name} shared its input with {site} in one batch but not in another")

    def _expert_taps(self, name: str, module: Any) -> tuple[ExpertTap, Callable[[torch.Tensor], None]]:
        num_experts, in_features = module.gate_up_proj.shape[0], module.gate_up_proj.shape[2]
        inter = module.down_proj.shape[2]

        def tap(param: str, expert: int, x: torch.Tensor) -> None:
            site = f"{name}.{param}"
            if self._wanted(site):
                self.sink(site, num_experts, expert, x.detach())

        def on_routing(top_k_index: torch.Tensor) -> None:
            if self.routing is None:
                return
            counts = torch.bincount(top_k_index.flatten().cpu(), minlength=num_experts + 1)[:num_experts]
            for param, width in (("gate_up_proj", in_features), ("down_proj", inter)):
                if self._wanted(f"{name}.{param}"):
                    self.routing(f"{name}.{param}", num_experts, width, counts)

        return tap, on_routing
