"""Calibration data: token windows sampled, reproducibly, from a text source.

The text (a hub recipe's calibration split, a local file or folder, or the bundled default in
``calibration_data/default/``) is joined and tokenized once into a stream of ``n`` tokens. From it,
``num_samples`` windows of ``seq_len`` tokens are cut, driven by one ``torch.Generator`` seeded with
``seed``, so the same seed gives the same windows:

- when ``num_samples * seq_len <= n``, the windows do not overlap. The ``n - num_samples * seq_len``
  tokens left over are dealt out at random into the ``num_samples + 1`` gaps before, between and
  after the windows (stars and bars: every non-overlapping placement is equally likely), so the
  windows spread over the whole text rather than crowding one end; they are then put in random order.
- otherwise the text cannot hold that many disjoint windows: each window starts at an independent
  uniform position in ``[0, n - seq_len]``, and the set is marked ``overlapping``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from quantkit.errors import QuantkitError
from quantkit.text_sources import calibration_data_dir, load_text

DEFAULT_SOURCE = "bundled default"


@dataclass(frozen=True)
class CalibrationSet:
    """Token windows for calibration and where they came from."""

    input_ids: torch.Tensor  # int64 [num_samples, seq_len]
    source: str  # dataset name or path ("bundled default" for the bundled text)
    text_tokens: int  # tokens in the whole tokenized text
    seed: int
    overlapping: bool  # True when windows had to overlap (text shorter than num_samples * seq_len)


def calibration_windows(
    dataset: str | None,
    tokenizer: Any,
    num_samples: int,
    seq_len: int,
    seed: int = 0,
    text_field: str = "text",
    split: str | None = None,
) -> CalibrationSet:
    """``num_samples`` windows of ``seq_len`` tokens from ``dataset`` (None: the bundled default text)."""
    if num_samples < 1:
        raise QuantkitError(f"--num-samples must be at least 1, got {num_samples}")
    if seq_len < 2:
        raise QuantkitError(f"--seq-len must be at least 2, got {seq_len}")
    if dataset is None:
        folder = calibration_data_dir() / "default"
        if not folder.is_dir():
            raise QuantkitError(f"the bundled calibration text is missing from {folder}; pass --dataset")
        text, source = load_text(str(folder), text_field, purpose="calibration").text, DEFAULT_SOURCE
    else:
        text, source = load_text(dataset, text_field, split, purpose="calibration").text, dataset
    if not text.strip():
        raise QuantkitError(f"no calibration text in {source}; pass a --dataset with text")
    ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)
    n = len(ids)
    if n < seq_len:
        raise QuantkitError(
            f"calibration text has {n} tokens, fewer than --seq-len {seq_len}; lower --seq-len or add text")
    g = torch.Generator().manual_seed(seed)
    overlapping = num_samples * seq_len > n
    starts = (torch.randint(0, n - seq_len + 1, (num_samples,), generator=g) if overlapping
              else _disjoint_starts(n, num_samples, seq_len, g))
    input_ids = ids[starts[:, None] + torch.arange(seq_len)]
    return CalibrationSet(input_ids, source, n, seed, overlapping)


def _disjoint_starts(n: int, num_samples: int, seq_len: int, g: torch.Generator) -> torch.Tensor:
    """Starts of ``num_samples`` non-overlapping windows, the spare tokens dealt at random into the gaps."""
    spare = n - num_samples * seq_len
    # k distinct draws from [0, spare + k), sorted, minus 0..k-1: a uniform non-decreasing k-tuple in [0, spare]
    picks = torch.randperm(spare + num_samples, generator=g)[:num_samples].sort().values
    gaps = picks - torch.arange(num_samples)  # spare tokens before window i
    starts = torch.arange(num_samples) * seq_len + gaps
    return starts[torch.randperm(num_samples, generator=g)]
