"""Batched perplexity, and KL / top-1 agreement against a base model on the same tokens."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from quantkit.eval.windows import Window
from quantkit.model.archs import ARCHS


@dataclass
class Scores:
    """Sums over scored tokens; ``ppl`` derives from them."""

    nll: float = 0.0
    tokens: int = 0

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")


@dataclass
class EvalResult:
    model: Scores
    base: Scores | None
    kl_sum: float
    top1_matches: int
    windows: int
    seconds: float

    @property
    def tokens(self) -> int:
        return self.model.tokens

    @property
    def kl(self) -> float | None:
        return self.kl_sum / self.tokens if self.base is not None and self.tokens else None

    @property
    def top1_agreement(self) -> float | None:
        return self.top1_matches / self.tokens if self.base is not None and self.tokens else None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")


def batches(windows: list[Window], batch_size: int) -> list[list[Window]]:
    """Consecutive windows of equal length grouped into batches of at most ``batch_size``."""
    out: list[list[Window]] = []
    for window in windows:
        if out and len(out[-1]) < batch_size and len(out[-1][0].tokens) == len(window.tokens) \
                and out[-1][0].n_scored == window.n_scored:
            out[-1].append(window)
        else:
            out.append([window])
    return out


LOGIT_CHUNK = 128  # scored positions per lm_head call: peak memory O(batch x chunk x vocab), not x seq_len


def scored_log_probs(model: Any, batch: list[Window], device: str,
                     chunk: int = LOGIT_CHUNK) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Log-probabilities at the scored positions ``(B, c, V)`` and their targets ``(B, c)``, ``chunk`` at a time.

    Where the model is a decoder followed by a plain ``lm_head`` (every architecture quantkit knows), the
    decoder runs once and the head on ``chunk`` positions at a time, so the logits of a whole window never
    exist at once. Any other model is scored from its full logits.
    """
    tokens = torch.stack([w.tokens for w in batch]).to(device)  # (B, L)
    n = batch[0].n_scored
    targets = tokens[:, -n:]
    split = _decoder_and_head(model) if chunk < n else None
    if split is None:
        logits = model(tokens, use_cache=False).logits[:, -n - 1 : -1].float()  # (B, n, V): position t predicts t+1
        yield torch.log_softmax(logits, dim=-1), targets
        return
    decoder, head = split
    hidden = decoder(tokens, use_cache=False).last_hidden_state[:, -n - 1 : -1]  # (B, n, H)
    for start in range(0, n, chunk):
        logits = head(hidden[:, start : start + chunk]).float()
        yield torch.log_softmax(logits, dim=-1), targets[:, start : start + chunk]


def _decoder_and_head(model: Any) -> tuple[Any, Any] | None:
    """``(decoder, lm_head)`` of a causal LM whose logits are exactly ``lm_head(decoder(x))``, else None."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in ARCHS or not hasattr(model, "get_decoder"):
        return None
    head = model.get_output_embeddings()
    return (model.get_decoder(), head) if isinstance(head, torch.nn.Linear) else None


def evaluate(
    model: Any,
    windows: list[Window],
    *,
    base: Any | None = None,
    batch_size: int = 4,
    device: str = "cpu",
    on_batch: Callable[[int], None] | None = None,
) -> EvalResult:
    """Perplexity of ``model`` over ``windows``; with ``base``, also KL(base || model) and top-1 agreement."""
    scores, base_scores = Scores(), (Scores() if base is not None else None)
    kl_sum, matches = 0.0, 0
    # model and base are scored in the same chunks: both split, or both from their full logits
    splits = all(_decoder_and_head(m) is not None for m in (model, base) if m is not None)
    chunk = LOGIT_CHUNK if splits else max(len(w.tokens) for w in windows) if windows else 1
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in batches(windows, batch_size):
            base_chunks = scored_log_probs(base, batch, device, chunk) if base is not None else None
            for log_probs, targets in scored_log_probs(model, batch, device, chunk):
                scores.nll -= float(log_probs.gather(-1, targets[..., None]).sum())
                scores.tokens += targets.numel()
                if base_chunks is not None and base_scores is not None:
                    base_log_probs, _ = next(base_chunks)
                    base_scores.nll -= float(base_log_probs.gather(-1, targets[..., None]).sum())
                    base_scores.tokens += targets.numel()
                    kl = (base_log_probs.exp() * (base_log_probs - log_probs)).sum(-1)  # (B, c)
                    kl_sum += float(kl.sum())
                    matches += int((base_log_probs.argmax(-1) == log_probs.argmax(-1)).sum())
            if on_batch is not None:
                on_batch(len(batch))
    return EvalResult(scores, base_scores, kl_sum, matches, len(windows), time.perf_counter() - started)
