"""Early stops and replayed submodules: they change no bit of GPTQ's output, and they do happen."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from quantkit.gptq import replay
from quantkit.gptq.replay import Replay, Spans
from quantkit.pipeline import LayerStates
from tests.gptq.test_stages import assert_identical, outputs, run_gptq, tiny_checkpoint

SHARED_EXPERTS = ["qwen2_moe", "deepseek_v3_q_lora"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("replay")
    return {name: tiny_checkpoint(name, root) for name in ["llama", *SHARED_EXPERTS]}


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How many passes replayed a submodule, and how many batches stopped early."""
    counts = {"replayed": 0, "stopped": 0}
    replaying, stop = replay._replaying, replay._Stop.__init__

    def counting(*args: Any) -> Any:
        counts["replayed"] += 1
        return replaying(*args)

    def stopping(self: Any, *args: Any) -> None:
        counts["stopped"] += 1
        stop(self, *args)

    monkeypatch.setattr(replay, "_replaying", counting)
    monkeypatch.setattr(replay._Stop, "__init__", stopping)
    return counts


@pytest.mark.parametrize(("name", "extra"), [
    ("llama", {}),
    *((name, {}) for name in SHARED_EXPERTS),
    ("qwen2_moe", {"max_memory": 1, "all_experts": True}),  # a pass per chunk of experts, starved experts
    ("qwen2_moe", {"merge_passes": False}),
    pytest.param("deepseek_v3_q_lora", {"max_memory": 1, "all_experts": True}, marks=pytest.mark.slow),
])
def test_shortcuts_change_no_bit(checkpoints: dict[str, Path], counted: dict[str, int], name: str,
                                 extra: dict[str, Any]) -> None:
    """Every code, scale, zero point and record, and the hidden states after the last layer, with and without."""
    plain, plain_hidden = run_gptq(checkpoints[name], shortcuts=False, **extra)
    assert counted == {"replayed": 0, "stopped": 0}
    fast, fast_hidden = run_gptq(checkpoints[name], **extra)
    assert counted["replayed"] > 0 and counted["stopped"] > 0
    assert_identical(outputs(fast), outputs(plain))
    assert torch.equal(fast_hidden, plain_hidden)
    assert [layer.passes for layer in fast] == [layer.passes for layer in plain]


class _Block(nn.Module):
    """A submodule holding a site; ``in_place`` adds one to its input, ``as_dict`` returns a dict."""

    def __init__(self, in_place: bool = False, as_dict: bool = False) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4, bias=False)
        self.in_place, self.as_dict, self.calls = in_place, as_dict, 0

    def forward(self, x: torch.Tensor) -> Any:
        self.calls += 1
        if self.in_place:
            x.add_(1)
        y = self.proj(x)
        return {"y": y} if self.as_dict else y


class _Layer(nn.Module):
    def __init__(self, block: _Block) -> None:
        super().__init__()
        self.block, self.out = block, nn.Linear(4, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x.clone())
        return self.out(y["y"] if isinstance(y, dict) else y)


def _shortcuts(block: _Block) -> tuple[_Layer, Replay, Callable[..., LayerStates]]:
    """The toy layer, its :class:`Replay` (``block`` holds the first site, ``out`` is the second) and its run."""
    layer = _Layer(block)
    spans = Spans(["L.block.proj", "L.out"])
    spans.reach = {"block": 1}  # as the first batch would find: one site reached when the block returns
    shortcuts = Replay(layer, "L", spans, {"L.block.proj": ["L.block.proj"], "L.out": ["L.out"]})
    states = LayerStates([torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)],
                         {2: {}})
    return layer, shortcuts, lambda **options: shortcuts.run(states, lambda: None, **options)


@pytest.mark.parametrize(("block", "replayed"), [
    (_Block(), True), (_Block(in_place=True), False), (_Block(as_dict=True), False),
])
def test_a_final_submodule_is_replayed_only_when_that_is_exact(block: _Block, replayed: bool) -> None:
    _, shortcuts, run = _shortcuts(block)
    expected = run().hidden
    shortcuts.finalize(["L.block.proj"])
    run(stage=["L.out"])  # the block is final: recorded here
    calls = block.calls
    again = run().hidden  # the output pass: the block's recorded outputs, or the block run again
    assert block.calls == calls + (0 if replayed else 3)
    assert all(torch.equal(a, b) for a, b in zip(again, expected, strict=True))


def test_a_stage_pass_stops_at_its_last_site() -> None:
    layer, _, run = _shortcuts(_Block())
    ran: list[int] = []
    layer.out.register_forward_hook(lambda *_: ran.append(1))
    assert run(stage=["L.block.proj"]).hidden == [] and not ran
    assert run().hidden and len(ran) == 3
