"""Per-expert views of transformers 5's fused experts, and an eager forward that exposes them.

Transformers 5 holds a layer's routed experts as one module with fused 3-D parameters
``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]`` and, by default, runs them with
``grouped_mm``: no per-expert ``nn.Linear`` exists, so forward hooks cannot see what each
expert receives. :func:`tap_experts` swaps the module's forward for :func:`eager_experts`,
transformers' own eager loop written out, which hands every expert's two inputs to a
callback::

    x_e   = hidden[tokens routed to e]               -> tap("gate_up_proj", e, x_e)
    h_e   = act(x_e @ gate_e.T) * (x_e @ up_e.T)      -> tap("down_proj", e, h_e)
    out  += weight(token, e) * (h_e @ down_e.T)

With ``all_experts`` every expert also runs on the tokens *not* routed to it, for the
callback only: the returned hidden states are exactly the routed ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

# (parameter name, expert index, 2-D input) -> None, or a replacement input (e.g. fake-quantized activations)
ExpertTap = Callable[[str, int, torch.Tensor], "torch.Tensor | None"]


def is_fused_experts(module: nn.Module) -> bool:
    """True for transformers 5's fused experts modules (3-D ``gate_up_proj`` and ``down_proj``)."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (
        isinstance(gate_up, torch.Tensor) and gate_up.ndim == 3 and isinstance(down, torch.Tensor) and down.ndim == 3
        and not getattr(module, "has_bias", False) and getattr(module, "has_gate", True)
        and not getattr(module, "is_transposed", False) and getattr(module, "is_concatenated", True)
    )


def eager_experts(
    module: Any,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    tap: ExpertTap | None = None,
    all_experts: bool = False,
) -> torch.Tensor:
    """Transformers' eager experts forward, with ``tap`` seeing each expert's inputs."""
    num_experts = module.gate_up_proj.shape[0]
    out = torch.zeros_like(hidden)
    with torch.no_grad():  # index E marks slots masked out by expert parallelism, as in transformers
        expert_mask = nn.functional.one_hot(top_k_index, num_classes=num_experts + 1).permute(2, 1, 0)
    for expert in range(num_experts):
        top_k_pos, token_idx = torch.where(expert_mask[expert])
        routed_tap = tap
        if all_experts and tap is not None:
            _expert_mlp(module, expert, hidden, tap)  # statistics only; the output below stays as routed
            routed_tap = None
        if token_idx.numel() == 0:
            continue
        routed_out = _expert_mlp(module, expert, hidden[token_idx], routed_tap)
        routed_out = routed_out * top_k_weights[token_idx, top_k_pos, None]
        out.index_add_(0, token_idx, routed_out.to(out.dtype))
    return out


def _expert_mlp(module: Any, expert: int, x: torch.Tensor, tap: ExpertTap | None) -> torch.Tensor:
    x = _tapped(tap, "gate_up_proj", expert, x)
    gate, up = nn.functional.linear(x, module.gate_up_proj[expert]).chunk(2, dim=-1)
    h = _tapped(tap, "down_proj", expert, module.act_fn(gate) * up)
    return nn.functional.linear(h, module.down_proj[expert])


def _tapped(tap: ExpertTap | None, param: str, expert: int, x: torch.Tensor) -> torch.Tensor:
    replaced = tap(param, expert, x) if tap is not None else None
    return x if replaced is None else replaced


def install_eager_experts(module: Any, tap: ExpertTap | None, all_experts: bool = False,
                          on_routing: Callable[[torch.Tensor], None] | None = None) -> None:
    """From now on ``module`` runs :func:`eager_experts` with ``tap`` (undo with ``del module.forward``)."""

    def forward(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, **_: Any) -> Any:
        if on_routing is not None:
            on_routing(top_k_index)
        return eager_experts(module, hidden, top_k_index, top_k_weights, tap, all_experts)

    module.forward = forward


@contextlib.contextmanager
def tap_experts(
    module: nn.Module,
    tap: ExpertTap,
    all_experts: bool = False,
    on_routing: Callable[[torch.Tensor], None] | None = None,
) -> Iterator[None]:
    """Within the block, ``module`` runs :func:`eager_experts` with ``tap``; ``on_routing`` sees ``top_k_index``."""
    install_eager_experts(module, tap, all_experts, on_routing)
    try:
        yield
    finally:
        del module.forward
