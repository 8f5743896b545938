"""Evaluation: per-window cross-entropy (the GPTQ perplexity protocol), per-expert token shares, a greedy sample."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .architecture import RouterTap
from .common import TEST_FILE, log, read_text
from .tokenizer import encode


def window_losses(
    model: torch.nn.Module,
    ids: torch.Tensor,
    seq_len: int,
    batch_size: int,
    tap: RouterTap | None = None,
    num_experts: int = 0,
) -> tuple[list[float], dict[int, torch.Tensor]]:
    """Mean next-token cross-entropy of every non-overlapping ``seq_len`` window (remainder dropped).

    Returns the per-window losses and, if ``tap`` is given, the per-expert routed-slot counts
    accumulated over all windows.
    """
    n = ids.numel() // seq_len
    windows = ids[: n * seq_len].view(n, seq_len)
    losses: list[float] = []
    counts: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for s in range(0, n, batch_size):
            x = windows[s : s + batch_size]
            logits = model(input_ids=x, use_cache=False).logits.float()
            ce = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none"
            ).view(x.shape[0], -1)
            losses.extend(ce.mean(1).tolist())
            if tap is not None:
                for i, c in tap.counts(num_experts).items():
                    counts[i] = counts.get(i, torch.zeros_like(c)) + c
    return losses, counts


def shares_from_counts(counts: dict[int, torch.Tensor]) -> dict[str, list[float]]:
    """Per-expert fractions of the routed slots, keyed by MoE layer index as a string."""
    return {str(i): (c.double() / c.sum()).tolist() for i, c in sorted(counts.items())}


def sample_generation(model: Any, tokenizer: Any, prompt: str, new_tokens: int) -> str:
    """Greedy continuation of ``prompt`` by ``new_tokens`` tokens, decoded without special tokens."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def summarize_shares(shares: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Minimum, maximum and max/min ratio of the expert shares of every MoE layer."""
    return {
        layer: {"min": min(s), "max": max(s), "max_over_min": max(s) / max(min(s), 1e-12)}
        for layer, s in shares.items()
    }


def evaluate_test_file(
    model: Any, tokenizer: Any, test_path: Path, seq_len: int, batch_size: int, num_experts: int
) -> dict[str, Any]:
    """Perplexity of ``model`` on ``wiki.test.raw`` (GPTQ protocol) and its per-expert token shares."""
    t = time.perf_counter()
    test_text = read_text(test_path)
    test_ids = encode(tokenizer, test_text)
    tap = RouterTap.attach(model)
    losses, counts = window_losses(model, test_ids, seq_len, batch_size, tap=tap, num_experts=num_experts)
    tap.remove()
    mean_ce = float(np.mean(losses))
    shares = shares_from_counts(counts)
    evaluation: dict[str, Any] = {
        "file": TEST_FILE,
        "protocol": "gptq: whole file tokenized once, non-overlapping windows, remainder dropped, "
        "ppl = exp(mean of per-window mean CE)",
        "seq_len": seq_len,
        "tokens_total": int(test_ids.numel()),
        "num_windows": len(losses),
        "tokens_used": len(losses) * seq_len,
        "mean_ce": mean_ce,
        "ppl": math.exp(mean_ce),
        "compute": "float32 compute (bf16 weights upcast at load)",
        "expert_token_share": shares,
        "expert_token_share_summary": summarize_shares(shares),
        "eval_time_s": time.perf_counter() - t,
    }
    log(
        f"wiki.test.raw: {len(losses)} windows x {seq_len}, ppl {math.exp(mean_ce):.2f} "
        f"({evaluation['eval_time_s']:.0f}s)"
    )
    for layer, sm in evaluation["expert_token_share_summary"].items():
        log(f"  layer {layer}: share min {sm['min']:.4f} max {sm['max']:.4f}")
    return evaluation
