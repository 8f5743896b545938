"""A GGUF file's tokenizer: SentencePiece from tokenizer.model, or BPE from tokenizer.json, as llama.cpp reads them.

tokenizer.model is read with sentencepiece's own ModelProto (as convert_hf_to_gguf.py reads its
``normalizer_spec``): every piece with its score and type (SentencePiece's piece types 1 normal .. 6
byte are gguf.TokenType's values).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2

from quantkit.errors import QuantkitError


def add_tokenizer(writer: gguf.GGUFWriter, directory: Path, n_vocab: int) -> None:
    """The checkpoint's tokenizer: SentencePiece (tokenizer.model), or BPE from tokenizer.json; else none."""
    spm_file, json_file = directory / "tokenizer.model", directory / "tokenizer.json"
    if spm_file.is_file():
        pieces, add_dummy_prefix = _sentencepiece_model(spm_file)
        tokens, scores, types = _sentencepiece_vocab(pieces, json_file, n_vocab)
        _add_spm(writer, tokens, scores, types, directory)
        writer.add_add_space_prefix(add_dummy_prefix)
    elif json_file.is_file():
        tokenizer = json.loads(json_file.read_text(encoding="utf-8"))
        model = tokenizer.get("model") or {}
        if model.get("type") != "BPE":
            raise QuantkitError(f"{json_file}: GGUF export supports BPE and SentencePiece tokenizers, "
                                f"not {model.get('type')!r}")
        if model.get("byte_fallback"):  # a SentencePiece BPE model saved as tokenizer.json
            tokens, scores, types = _byte_fallback_vocab(tokenizer, n_vocab)
            _add_spm(writer, tokens, scores, types, directory)
            pre = tokenizer.get("pre_tokenizer") or {}
            if pre.get("type") == "Metaspace":
                writer.add_add_space_prefix(pre.get("prepend_scheme", "always") != "never")
        else:
            tokens, _, types = _bpe_vocab(tokenizer, n_vocab)
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(_bpe_pre_tokenizer(tokenizer))
            writer.add_token_list(tokens)
            writer.add_token_types(types)
            gguf.SpecialVocab(directory, load_merges=True, n_vocab=n_vocab).add_to_gguf(writer, quiet=True)
    else:
        writer.add_tokenizer_model("none")  # llama.cpp then makes vocab_size dummy tokens


def _add_spm(writer: gguf.GGUFWriter, tokens: list[str], scores: list[float], types: list[int],
             directory: Path) -> None:
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(directory, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def _bpe_pre_tokenizer(tokenizer: dict[str, Any]) -> str:
    """``tokenizer.ggml.pre``: "gpt-2" for GPT-2's byte-level regex, else llama.cpp's generic "default"."""
    pre = tokenizer.get("pre_tokenizer") or {}
    gpt2 = pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not tokenizer.get("normalizer")
    return "gpt-2" if gpt2 else "default"


def _padded(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """convert_hf_to_gguf.py's filler for ids no token uses."""
    return [f"[PAD{i}]" for i in range(n_vocab)], [-10000.0] * n_vocab, [gguf.TokenType.UNUSED] * n_vocab


def _bpe_vocab(tokenizer: dict[str, Any], n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """Token texts (as stored in tokenizer.json) by id, with added tokens typed CONTROL/USER_DEFINED."""
    tokens, scores, types = _padded(n_vocab)
    for text, token_id in tokenizer["model"]["vocab"].items():
        _set_token(tokens, types, token_id, text, gguf.TokenType.NORMAL)
    for added in tokenizer.get("added_tokens") or []:
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        _set_token(tokens, types, int(added["id"]), added["content"], kind)
    return tokens, scores, types


def _byte_fallback_vocab(tokenizer: dict[str, Any], n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """SentencePiece-style vocab from a byte-fallback BPE tokenizer.json.

    llama.cpp's SentencePiece tokenizer merges the pair whose result scores highest. SentencePiece's
    BPE models list their normal pieces best first and score the n-th one ``-n``; the same is
    written here, so that llama.cpp merges in the order the tokenizer.json's BPE does.
    """
    tokens, scores, types = _bpe_vocab(tokenizer, n_vocab)
    rank = 0
    for i, text in enumerate(tokens):
        if types[i] == gguf.TokenType.UNUSED:
            continue
        scores[i] = 0.0
        if types[i] != gguf.TokenType.NORMAL:
            continue
        if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types[i] = gguf.TokenType.BYTE
        else:
            scores[i], rank = -float(rank), rank + 1
    return tokens, scores, types


def _set_token(tokens: list[str], types: list[int], token_id: int, text: str, kind: int) -> None:
    if token_id >= len(tokens):
        raise QuantkitError(f"tokenizer token {text!r} has id {token_id}, beyond the model's vocab_size {len(tokens)}")
    tokens[token_id], types[token_id] = text, kind


def _sentencepiece_vocab(pieces: list[tuple[str, float, int]], json_file: Path,
                         n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """SentencePiece pieces, scores and types padded to ``n_vocab``, plus tokenizer.json's added tokens."""
    tokens, scores, types = _padded(n_vocab)
    if len(pieces) > n_vocab:
        raise QuantkitError(f"tokenizer.model has {len(pieces)} pieces, more than the model's vocab_size {n_vocab}")
    for i, (piece, score, kind) in enumerate(pieces):
        tokens[i], scores[i], types[i] = piece, score, kind
    if json_file.is_file():
        for added in json.loads(json_file.read_text(encoding="utf-8")).get("added_tokens") or []:
            token_id = int(added["id"])
            if token_id < len(pieces) and tokens[token_id] == added["content"]:
                continue  # a piece of the model itself keeps its own type
            kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
            _set_token(tokens, types, token_id, added["content"], kind)
            scores[token_id] = -1000.0
    return tokens, scores, types


def _sentencepiece_model(spm_file: Path) -> tuple[list[tuple[str, float, int]], bool]:
    """(piece, score, type) of every piece and ``add_dummy_prefix`` of a serialized SentencePiece model."""
    model = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined]  # generated protobuf code
    try:
        model.ParseFromString(spm_file.read_bytes())
    except DecodeError:
        raise QuantkitError(f"{spm_file} is not a valid SentencePiece model") from None
    pieces = [(p.piece, p.score, p.type) for p in model.pieces]
    if not all(isinstance(piece, str) for piece, _, _ in pieces):  # protobuf hands back invalid UTF-8 as bytes
        raise QuantkitError(f"{spm_file} is not a valid SentencePiece model")
    return pieces, model.normalizer_spec.add_dummy_prefix
