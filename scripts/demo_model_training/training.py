"""The training loop: AdamW with warmup + cosine, aux-loss-free routing bias updates, a sequence balance loss."""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DeepseekV3ForCausalLM

from .architecture import RouterTap, moe_gates, sequence_balance_loss, update_routing_bias
from .common import log
from .evaluation import shares_from_counts, window_losses


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup then cosine decay to ``lr * min_lr_ratio``."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    cos = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return args.lr * (args.min_lr_ratio + (1.0 - args.min_lr_ratio) * cos)


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only; the routers get ``lr * router_lr_scale`` and no decay."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    router: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".mlp.gate." in name:
            router.append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay, "lr_scale": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
            {"params": router, "weight_decay": 0.0, "lr_scale": args.router_lr_scale},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )


def train(
    model: DeepseekV3ForCausalLM, train_ids: torch.Tensor, heldout_ids: torch.Tensor, args: argparse.Namespace
) -> dict[str, Any]:
    """Train ``model`` in place; returns timings, the held-out history, expert shares and routing biases."""
    cfg = model.config
    num_experts, top_k = int(cfg.n_routed_experts), int(cfg.num_experts_per_tok or 0)
    opt = make_optimizer(model, args)
    tap = RouterTap.attach(model)
    rng = np.random.default_rng(args.seed)
    span = args.seq_len + 1
    max_start = train_ids.numel() - span
    tokens_per_step = args.batch_size * args.seq_len
    cum_counts = {i: torch.zeros(num_experts, dtype=torch.long) for i in tap.layers}
    history: list[dict[str, float]] = []
    ema: float | None = None
    t0 = time.perf_counter()
    model.train()
    for step in range(args.steps):
        starts = rng.integers(0, max_start + 1, size=args.batch_size)
        batch = torch.stack([train_ids[s : s + span] for s in starts.tolist()])
        x, y = batch[:, :-1], batch[:, 1:]
        lr = lr_at(step, args)
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_scale"]

        logits = model(input_ids=x, use_cache=False).logits
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss = ce
        aux = torch.zeros(())
        if args.seq_aux_alpha > 0:
            aux = sequence_balance_loss(tap, args.batch_size, top_k, num_experts)
            loss = ce + args.seq_aux_alpha * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()

        counts = tap.counts(num_experts)
        if args.bias_update_rate > 0:
            gamma = args.bias_update_rate * (1.0 if step < args.warmup_steps else lr / args.lr)
            update_routing_bias(model, counts, gamma)
        for i, c in counts.items():
            cum_counts[i] += c

        ce_val = ce.item()
        ema = ce_val if ema is None else 0.95 * ema + 0.05 * ce_val
        last = step == args.steps - 1
        if step % args.log_every == 0 or last:
            elapsed = time.perf_counter() - t0
            shares = [c.float() / c.sum() for c in counts.values()]
            mn = min(s.min().item() for s in shares)
            mx = max(s.max().item() for s in shares)
            log(
                f"step {step:5d}/{args.steps} ce {ce_val:.4f} (ema {ema:.4f}) aux {aux.item():.4f} "
                f"lr {lr:.2e} gnorm {grad_norm.item():.2f} share[min {mn:.3f} max {mx:.3f}] "
                f"{(step + 1) * tokens_per_step / elapsed:.0f} tok/s {elapsed / (step + 1):.2f} s/step"
            )
        if (step + 1) % args.eval_every == 0 or last:
            model.eval()
            ho, _ = window_losses(model, heldout_ids, args.seq_len, 16)
            model.train()
            ho_loss = float(np.mean(ho))
            history.append(
                {"step": step + 1, "train_ce_ema": ema, "heldout_ce": ho_loss, "elapsed_s": time.perf_counter() - t0}
            )
            log(f"  eval step {step + 1}: heldout ce {ho_loss:.4f} (ppl {math.exp(ho_loss):.1f})")
    train_time = time.perf_counter() - t0
    tap.remove()
    model.eval()
    biases = {str(i): gate.e_score_correction_bias.tolist() for i, gate in moe_gates(model)}
    return {
        "train_time_s": train_time,
        "final_train_ce_ema": ema,
        "history": history,
        "train_token_share": shares_from_counts(cum_counts),
        "e_score_correction_bias": biases,
    }
