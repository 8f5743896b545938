"""Cheaper passes over a decoder layer: stop once a stage's sites have their inputs, replay what is final.

A GPTQ pass over a layer (:mod:`quantkit.gptq.sequential`) only needs the inputs of its stage's sites,
and everything before them may already be fixed. Two savings, both exact:

- **Stop early.** Once every site of the stage has received its input in a batch (a linear: its
  forward pre-hook, after the taps; routed experts: their module's return), the rest of the layer's
  forward is skipped by a private exception (the reference's ``Catcher`` trick, inside the layer).
  The output pass never stops.
- **Replay final submodules.** A submodule of the layer is *final* once every GPTQ site reached before
  it returns (on the first batch: :class:`Spans`) is solved: its inputs and weights no longer change,
  so neither do its outputs. The first pass that runs a final submodule whole records its output per
  batch (a copy); later passes return the copy instead of running it. Same ops on the same inputs give
  the same bits, so the output does not depend on it. Only the outermost final submodules holding a
  GPTQ site are recorded, at most :data:`CACHE_FRACTION` of the available memory (unbounded where that
  is unknown); a submodule called more than once per batch, one that changes its inputs in place, or
  one whose output is not tensors is always run.

Assumes, as the stages do, that every batch reaches the sites in the first batch's order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from quantkit import heap
from quantkit.pipeline import LayerStates

CACHE_FRACTION = 0.25  # of the memory available when a submodule's outputs start being recorded


class _Stop(Exception):  # control flow only: never escapes Replay.run
    pass


class Spans:
    """For each submodule of a layer called once in the first batch: how many sites the order held when it
    returned. Attach while the first batch runs with ``order`` (the sites, in first-seen order) filling."""

    def __init__(self, order: list[str]) -> None:
        self.order = order
        self.reach: dict[str, int] = {}
        self._calls: dict[str, int] = {}

    @contextlib.contextmanager
    def attach(self, layer: nn.Module) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for name, module in layer.named_modules():
                if name and not isinstance(module, nn.Linear):
                    stack.callback(module.register_forward_hook(self._hook(name)).remove)
            yield
        self.reach = {name: reach for name, reach in self.reach.items() if self._calls[name] == 1}

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            self._calls[name] = self._calls.get(name, 0) + 1
            self.reach[name] = len(self.order)
        return hook


class Replay:
    """Early stops and replayed submodules for the passes over one loaded layer (``prefix`` its name).

    ``sites`` maps each GPTQ site to the module names it quantizes (full names); :meth:`finalize` marks
    sites solved with their quantized weights written into the layer. Not ``enabled``: every pass runs the
    whole layer (the same results, slower).
    """

    def __init__(self, layer: nn.Module, prefix: str, spans: Spans | None, sites: dict[str, list[str]],
                 enabled: bool = True) -> None:
        self.layer, self.prefix, self.enabled = layer, prefix, enabled
        self.solved: set[str] = set()
        self._cache: dict[str, list[Any]] = {}
        self._unusable: set[str] = set()
        self._needs: dict[str, set[str]] = {}  # candidate submodule -> sites that must be solved first
        if enabled and spans is not None:
            for name, reach in spans.reach.items():
                inside = f"{prefix}.{name}."
                if any(m.startswith(inside) for members in sites.values() for m in members):
                    self._needs[name] = {s for s in spans.order[:reach] if s in sites}

    def finalize(self, stage: list[str]) -> None:
        self.solved.update(stage)

    def run(self, states: LayerStates, on_batch: Callable[[], None], stage: list[str] | None = None) -> LayerStates:
        """The layer over every batch of ``states`` (``on_batch()`` before each); with a ``stage``, each batch
        stops once the stage's sites have their inputs (when enabled) and no output is kept."""
        replayed, recorded, allowance = self._plan(last=stage is None)
        batch = [-1]
        reached: set[str] = set()
        out: list[torch.Tensor] = []
        records = {name: _Recording() for name in recorded}
        with contextlib.ExitStack() as stack, torch.no_grad():
            for name in replayed:
                stack.enter_context(_replaying(self.layer.get_submodule(name), self._cache[name], batch))
            for name, recording in records.items():
                stack.enter_context(recording.attach(self.layer.get_submodule(name)))
            if stage is not None and self.enabled:
                stack.enter_context(self._stop_after(stage, reached))
            for hidden, kwargs in states.batches():
                on_batch()
                batch[0] += 1
                reached.clear()
                try:
                    result = self.layer(hidden, **kwargs)
                    if stage is None:
                        out.append(result[0] if isinstance(result, tuple) else result)
                except _Stop:
                    pass
                if allowance is not None and sum(r.bytes for r in records.values()) * len(states.hidden) \
                        > allowance * (batch[0] + 1):  # the projected copies of every batch: over the allowance
                    for recording in records.values():
                        recording.drop()
        for name, recording in records.items():
            if recording.usable and len(recording.outputs) == len(states.hidden):
                self._cache[name] = recording.outputs
            else:
                self._unusable.add(name)
        return LayerStates(out, states.kwargs)

    def _plan(self, last: bool) -> tuple[list[str], list[str], int | None]:
        """The outermost final submodules: those recorded already (replayed) and the others (recorded, unless
        this is the layer's last pass); and the bytes their recording may take (None: unknown)."""
        final = [name for name, needs in self._needs.items() if needs <= self.solved and name not in self._unusable]
        outermost = [name for name in final if not any(name.startswith(f"{other}.") for other in final)]
        for name in [n for n in self._cache if n not in outermost]:  # inside a newly final one: no longer used
            del self._cache[name]
        replayed = [name for name in outermost if name in self._cache]
        recorded = [] if last else [name for name in outermost if name not in self._cache]
        available = heap.available() if recorded else None
        return replayed, recorded, None if available is None else int(available * CACHE_FRACTION)

    @contextlib.contextmanager
    def _stop_after(self, stage: list[str], reached: set[str]) -> Iterator[None]:
        """Raise :class:`_Stop` once every site of ``stage`` is in ``reached`` (cleared before each batch)."""
        wanted = set(stage)

        def reach(site: str) -> None:
            reached.add(site)
            if reached >= wanted:
                raise _Stop

        with contextlib.ExitStack() as stack:
            for site in stage:
                module = _site_module(self.layer, self.prefix, site)
                if isinstance(module, nn.Linear):  # after the taps' pre-hooks: the input is taken
                    handle = module.register_forward_pre_hook(lambda *_, s=site: reach(s))
                else:  # a parameter of routed experts: its inputs are all taken when the module returns
                    handle = module.register_forward_hook(lambda *_, s=site: reach(s))
                stack.callback(handle.remove)
            yield


def _site_module(layer: nn.Module, prefix: str, site: str) -> nn.Module:
    """The linear of a linear site, or the experts module owning a fused parameter site."""
    relative = site.removeprefix(f"{prefix}.")
    module = layer.get_submodule(relative.rpartition(".")[0]) if "." in relative else layer
    child = getattr(module, relative.rpartition(".")[2])
    return child if isinstance(child, nn.Module) else module


@contextlib.contextmanager
def _replaying(module: nn.Module, outputs: list[Any], batch: list[int]) -> Iterator[None]:
    """``module`` returns a copy of its recorded output of the current batch (``batch[0]``) instead of running."""
    saved = module.__dict__.get("forward")
    module.forward = lambda *_, **__: _copy(outputs[batch[0]])
    try:
        yield
    finally:
        if saved is None:
            del module.forward
        else:
            module.forward = saved


class _Recording:
    """A submodule's output per batch, copied; unusable if it changes its inputs in place (checked on the first
    batch) or returns anything but tensors (or tuples of tensors and None)."""

    def __init__(self) -> None:
        self.outputs: list[Any] = []
        self.bytes = 0
        self.usable = True
        self._inputs: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @contextlib.contextmanager
    def attach(self, module: nn.Module) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            stack.callback(module.register_forward_pre_hook(self._before, with_kwargs=True).remove)
            stack.callback(module.register_forward_hook(self._after, with_kwargs=True).remove)
            yield

    def drop(self) -> None:
        self.usable, self.outputs, self.bytes = False, [], 0

    def _before(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.usable and not self.outputs:
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            self._inputs = [(t, t.clone()) for t in tensors]

    def _after(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if not self.usable:
            return
        if self._inputs is not None:
            changed = any(not torch.equal(t, before) for t, before in self._inputs)
            self._inputs = None
            if changed:
                self.drop()
                return
        try:
            copied = _copy(output)
        except TypeError:
            self.drop()
            return
        self.outputs.append(copied)
        self.bytes += sum(t.numel() * t.element_size() for t in _tensors(copied))


def _copy(output: Any) -> Any:
    """A copy of a tensor, or of a tuple of tensors and None; TypeError for anything else."""
    if isinstance(output, torch.Tensor):
        return output.detach().clone()
    if isinstance(output, tuple) and all(o is None or isinstance(o, torch.Tensor) for o in output):
        return tuple(None if o is None else o.detach().clone() for o in output)
    raise TypeError(f"cannot copy a {type(output).__name__}")


def _tensors(output: Any) -> list[torch.Tensor]:
    return [output] if isinstance(output, torch.Tensor) else [o for o in output if o is not None]
