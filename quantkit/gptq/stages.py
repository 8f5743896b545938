"""Stages: the sites of a decoder layer whose GPTQ Hessians one forward pass can gather together.

True-sequential GPTQ takes each site's Hessian with every earlier site of the layer already
quantized. A site whose input does not depend on some earlier sites' weights need not wait for them:
the sites of one *stage* are mutually independent, so one pass over the calibration batches gives all
their Hessians, bit for bit those of one pass per site (same inputs, same arithmetic).

Dependence is measured, not named. On the first batch each site's weights in turn get a finite random
perturbation (a tenth of their mean magnitude, restored exactly afterwards) and every later site's
inputs are compared with the unperturbed pass: bytes, shapes and, for routed experts, which expert got
which rows (:class:`InputDigests`). Any difference is a dependence, so a perturbation that reaches a
router and changes the routing counts; a NaN is not used because ops such as ``max`` or ``where``
could hide it. ``stage(s) = 1 + max(stage of the sites s depends on)`` (0 for none): for a DeepSeek
layer {q_a/kv_a}, {q_b, kv_b}, {o}, {experts gate_up, shared gate/up}, {experts down, shared down}.
Dependence is a property of the layer's code, so :class:`StageCache` probes each kind of layer (its
class and its quantized sites) once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch

from quantkit.gptq.hessian import HessianAccumulator

PERTURBATION = 0.1  # noise std as a fraction of the weight's mean |w|


class InputDigests:
    """An input sink that keeps each site's first-seen order and (``hashing``) a sha256 of all it received."""

    def __init__(self, hashing: bool = True) -> None:
        self.order: list[str] = []
        self.hashing = hashing
        self._hashes: dict[str, Any] = {}

    def __call__(self, site: str, num_experts: int, expert: int, x: torch.Tensor) -> None:
        if site not in self._hashes:
            self.order.append(site)
            self._hashes[site] = hashlib.sha256()
        if not self.hashing:
            return
        digest = self._hashes[site]
        digest.update(f"{expert}:{tuple(x.shape)}:{x.dtype};".encode())
        flat = x.detach().contiguous().reshape(-1).cpu()
        digest.update(flat.view(torch.uint8).numpy() if flat.numel() else b"")

    def digests(self) -> dict[str, str]:
        return {site: digest.hexdigest() for site, digest in self._hashes.items()}


def dependencies(sites: dict[str, list[torch.Tensor]], run: Callable[[], InputDigests],
                 seed: int = 0) -> dict[str, set[str]]:
    """For each site (in execution order), the earlier sites whose weights change its inputs.

    ``sites`` maps each site to the weights GPTQ replaces for it; ``run()`` runs the first batch with an
    :class:`InputDigests` on every site's inputs and returns it.
    """
    order = list(sites)
    baseline = run().digests()
    depends: dict[str, set[str]] = {site: set() for site in order}
    generator = torch.Generator().manual_seed(seed)
    for i, site in enumerate(order[:-1]):
        saved = [w.detach().clone() for w in sites[site]]
        try:
            for w in sites[site]:
                scale = max(float(w.detach().abs().float().mean()), 1e-6) * PERTURBATION
                noise = torch.randn(w.shape, generator=generator) * scale
                w.data.add_(noise.to(device=w.device, dtype=w.dtype))
            perturbed = run().digests()
        finally:
            for w, original in zip(sites[site], saved, strict=True):
                w.data.copy_(original)
        for later in order[i + 1 :]:
            if perturbed.get(later) != baseline.get(later):
                depends[later].add(site)
    return depends


def stages_of(order: list[str], depends: dict[str, set[str]]) -> list[list[str]]:
    """Sites grouped by ``1 + max(stage of what they depend on)``, each stage in execution order."""
    stage: dict[str, int] = {}
    for site in order:
        stage[site] = 1 + max((stage[d] for d in depends.get(site, ()) if d in stage), default=-1)
    count = 1 + max(stage.values(), default=-1)
    return [[site for site in order if stage[site] == k] for k in range(count)]


class StagePasses:
    """The Hessians of one stage: on first use, the requests of ``first`` (each experts site's first chunk) from one
    pass of ``collect``; any other request (a further chunk) from a pass of its own."""

    def __init__(self, collect: Callable[[dict[str, range | None]], dict[str, HessianAccumulator]],
                 first: dict[str, range | None], experts_per_chunk: Callable[[int, int], int]) -> None:
        self.collect, self.first, self.experts_per_chunk = collect, first, experts_per_chunk
        self._held: dict[str, tuple[range | None, HessianAccumulator]] | None = None

    def get(self, site: str, experts: range | None = None) -> HessianAccumulator:
        """The Hessian of ``site`` (of its experts in ``experts``), from the stage's pass if that holds it."""
        if self._held is None:
            self._held = {name: (self.first[name], hessian) for name, hessian in self.collect(self.first).items()}
        held = self._held.pop(site, None)
        if held is not None and held[0] == experts:
            return held[1]
        return self.collect({site: experts})[site]


class StageCache:
    """Stages per kind of layer, as names relative to the layer: probed on the first layer of each kind."""

    def __init__(self) -> None:
        self._stages: dict[tuple[str, ...], list[list[str]]] = {}
        self.probes = 0  # layers probed (each: one first-batch pass per site)

    def stages(self, kind: str, prefix: str, sites: dict[str, list[torch.Tensor]],
               run: Callable[[], InputDigests]) -> list[list[str]]:
        """The stages of the sites (full names under ``prefix``) of a layer of class ``kind``."""
        if len(sites) < 2:
            return [list(sites)] if sites else []
        relative = [site.removeprefix(f"{prefix}.") for site in sites]
        key = (kind, *relative)
        if key not in self._stages:
            self.probes += 1
            depends = dependencies(sites, run)
            self._stages[key] = [[s.removeprefix(f"{prefix}.") for s in stage]
                                 for stage in stages_of(list(sites), depends)]
        return [[f"{prefix}.{site}" for site in stage] for stage in self._stages[key]]
