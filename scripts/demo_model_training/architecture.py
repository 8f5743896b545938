"""The demo model's DeepSeek-V3 architecture: its config, router taps, load balancing and parameter counts."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DeepseekV3Config, PreTrainedTokenizerFast


def build_config(args: argparse.Namespace, tokenizer: PreTrainedTokenizerFast) -> DeepseekV3Config:
    """The ``DeepseekV3Config`` of the demo model from the command line and the trained tokenizer."""
    return DeepseekV3Config(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.dense_intermediate_size,
        moe_intermediate_size=args.moe_intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_heads,
        n_shared_experts=args.n_shared_experts,
        n_routed_experts=args.n_routed_experts,
        routed_scaling_factor=args.routed_scaling_factor,
        kv_lora_rank=args.kv_lora_rank,
        q_lora_rank=args.q_lora_rank,
        qk_rope_head_dim=args.qk_rope_head_dim,
        v_head_dim=args.v_head_dim,
        qk_nope_head_dim=args.qk_nope_head_dim,
        n_group=args.n_group,
        topk_group=args.topk_group,
        num_experts_per_tok=args.experts_per_tok,
        first_k_dense_replace=args.first_k_dense,
        norm_topk_prob=True,
        hidden_act="silu",
        max_position_embeddings=args.max_position_embeddings,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rope_interleave=True,
        attention_bias=False,
        attention_dropout=0.0,
        num_mtp_layers=0,
    )


def moe_gates(model: Any) -> list[tuple[int, Any]]:
    """(layer index, ``DeepseekV3TopkRouter``) for every MoE layer."""
    out: list[tuple[int, Any]] = []
    for i, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and hasattr(gate, "e_score_correction_bias"):
            out.append((i, gate))
    return out


@dataclass
class RouterTap:
    """Forward hooks on the routers that keep the latest (scores, top-k indices) per MoE layer.

    ``DeepseekV3TopkRouter.forward`` returns ``(router_logits, topk_weights, topk_indices)``;
    the selection uses ``sigmoid(logits) + e_score_correction_bias`` (group-limited), the
    mixing weights use the un-biased sigmoid scores, normalised over the top-k and
    multiplied by ``routed_scaling_factor``.
    """

    layers: list[int]
    logits: dict[int, torch.Tensor] = field(default_factory=dict)
    indices: dict[int, torch.Tensor] = field(default_factory=dict)
    handles: list[Any] = field(default_factory=list)

    @classmethod
    def attach(cls, model: torch.nn.Module) -> RouterTap:
        """Hook every MoE router of ``model``."""
        gates = moe_gates(model)
        tap = cls(layers=[i for i, _ in gates])
        for i, gate in gates:
            tap.handles.append(gate.register_forward_hook(tap._hook(i)))
        return tap

    def _hook(self, layer: int) -> Any:
        def hook(_module: torch.nn.Module, _inp: Any, out: tuple[torch.Tensor, ...]) -> None:
            self.logits[layer] = out[0]
            self.indices[layer] = out[2]

        return hook

    def counts(self, num_experts: int) -> dict[int, torch.Tensor]:
        """Routed-slot count per expert of the latest forward pass, by MoE layer."""
        return {i: torch.bincount(self.indices[i].reshape(-1), minlength=num_experts) for i in self.layers}

    def remove(self) -> None:
        """Detach the hooks."""
        for h in self.handles:
            h.remove()
        self.handles.clear()


def sequence_balance_loss(tap: RouterTap, batch: int, top_k: int, num_experts: int) -> torch.Tensor:
    """DeepSeek-V3 complementary sequence-wise balance loss, averaged over MoE layers and sequences.

    L = sum_i f_i * P_i with f_i = E / (K T) * #{t : i in topk(t)} and P_i = mean_t s'_{i,t},
    s' being the sigmoid scores normalised to sum 1 per token.
    """
    losses = []
    for i in tap.layers:
        scores = tap.logits[i].float().sigmoid().view(batch, -1, num_experts)
        seq_len = scores.shape[1]
        probs = scores / scores.sum(-1, keepdim=True)
        sel = F.one_hot(tap.indices[i].view(batch, seq_len * top_k), num_experts).sum(1).float()
        f = sel * (num_experts / (top_k * seq_len))
        losses.append((f * probs.mean(1)).sum(-1).mean())
    return torch.stack(losses).mean()


@torch.no_grad()
def update_routing_bias(model: torch.nn.Module, counts: dict[int, torch.Tensor], rate: float) -> None:
    """Aux-loss-free balancing: push the selection bias of overloaded experts down, underloaded up."""
    for i, gate in moe_gates(model):
        load = counts[i].float()
        gate.e_score_correction_bias.add_(rate * torch.sign(load.mean() - load))


def param_breakdown(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts by role (tied lm_head counted once, inside embeddings)."""
    groups = {
        "embeddings": 0,
        "attention": 0,
        "router": 0,
        "routed_experts": 0,
        "shared_experts": 0,
        "dense_mlp": 0,
        "norms": 0,
    }
    for name, p in model.named_parameters():  # deduplicates tied parameters
        n = p.numel()
        if "embed_tokens" in name or name.startswith("lm_head"):
            groups["embeddings"] += n
        elif ".self_attn." in name:
            groups["attention"] += n
        elif ".mlp.experts." in name:
            groups["routed_experts"] += n
        elif ".mlp.shared_experts." in name:
            groups["shared_experts"] += n
        elif ".mlp.gate." in name:
            groups["router"] += n
        elif ".mlp." in name:
            groups["dense_mlp"] += n
        else:
            groups["norms"] += n
    groups["total"] = sum(groups.values())
    return groups


def active_params_per_token(cfg: DeepseekV3Config, breakdown: dict[str, int]) -> int:
    """Parameters used per token: the total less the routed experts a token does not select."""
    n_moe = cfg.num_hidden_layers - int(cfg.first_k_dense_replace or 0)
    per_expert = breakdown["routed_experts"] // max(1, n_moe * cfg.n_routed_experts)
    inactive = n_moe * (cfg.n_routed_experts - int(cfg.num_experts_per_tok or 0)) * per_expert
    return breakdown["total"] - inactive
