"""The demo model's tokenizer: byte-level BPE trained on the WikiText-2 training files."""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .common import BOS, EOS, PAD, SPECIAL_TOKENS, UNK


def train_tokenizer(texts: list[str], vocab_size: int, min_frequency: int, max_len: int) -> PreTrainedTokenizerFast:
    """Train a GPT-2 style byte-level BPE tokenizer and wrap it as a transformers fast tokenizer.

    No post-processor is attached, so encoding never inserts ``<s>``/``</s>``: a text is
    tokenized to exactly its BPE pieces (``add_special_tokens`` has no effect).
    """
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for text in texts for line in text.splitlines(keepends=True)]
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=max_len,
        clean_up_tokenization_spaces=False,
    )


def encode(tokenizer: Any, text: str) -> torch.Tensor:
    """Tokenize a whole text once (no special tokens) into a 1-D LongTensor."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)
