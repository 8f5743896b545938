"""Token windows for the perplexity protocols (FORMATS.md §5).

Every window is a run of input tokens whose last ``n_scored`` tokens are scored, each predicted
from the positions before it:

- ``gptq``: non-overlapping windows of ``seq_len``, remainder dropped; all but the first token
  of each window scored (HF ``labels=input_ids``). ppl = exp(mean window loss).
- ``llamacpp``: non-overlapping chunks of ``seq_len`` (512 in llama-perplexity), the first token
  replaced by BOS, only the second half scored (tokens ``seq_len//2 + 1 .. seq_len-1``).
- ``stride``: sliding windows of ``seq_len`` advancing by ``stride``; each scores only the tokens
  no earlier window scored (the transformers "perplexity of fixed-length models" recipe).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.errors import QuantkitError

PROTOCOLS = ("gptq", "llamacpp")


@dataclass(frozen=True)
class Window:
    tokens: torch.Tensor  # (L,) input ids
    n_scored: int  # the last n_scored tokens are targets

    def __post_init__(self) -> None:
        assert 0 < self.n_scored < len(self.tokens)


def make_windows(
    ids: torch.Tensor, protocol: str, seq_len: int, stride: int | None = None, bos_id: int | None = None
) -> list[Window]:
    """Windows over the 1-D token ids for a protocol (``stride`` switches to sliding windows)."""
    if protocol not in PROTOCOLS:
        raise QuantkitError(f"unknown protocol {protocol!r}; protocols: {', '.join(PROTOCOLS)}")
    if seq_len < 2:
        raise QuantkitError(f"--seq-len must be at least 2, got {seq_len}")
    if stride is not None:
        return _sliding(ids, seq_len, stride)
    n_windows = len(ids) // seq_len
    if n_windows == 0:
        raise QuantkitError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len}")
    chunks = [ids[i * seq_len : (i + 1) * seq_len] for i in range(n_windows)]
    if protocol == "gptq":
        return [Window(c, seq_len - 1) for c in chunks]
    first = seq_len // 2
    windows = []
    for chunk in chunks:
        tokens = chunk.clone()
        if bos_id is not None:
            tokens[0] = bos_id
        windows.append(Window(tokens, seq_len - 1 - first))
    return windows


def _sliding(ids: torch.Tensor, seq_len: int, stride: int) -> list[Window]:
    if not 0 < stride <= seq_len:
        raise QuantkitError(f"--stride must be between 1 and --seq-len ({seq_len}), got {stride}")
    if len(ids) < 2:
        raise QuantkitError("the text has fewer than 2 tokens")
    windows, scored_until = [], 1  # token 0 is never predicted
    for begin in range(0, len(ids), stride):
        end = min(begin + seq_len, len(ids))
        if end - begin >= 2 and end > scored_until:
            windows.append(Window(ids[begin:end], end - max(scored_until, begin + 1)))
            scored_until = end
        if end == len(ids):
            break
    return windows
