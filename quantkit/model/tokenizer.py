"""The tokenizer of a model directory, loaded without running the directory's code, and checked against the model.

Also the one-line message for anything transformers refuses to load (used for models too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from quantkit.errors import QuantkitError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(*paths: Path, trust_remote_code: bool = False) -> Any:
    """The tokenizer of the first directory that has one (its own code only with ``trust_remote_code``)."""
    import transformers  # deferred: transformers takes seconds to import

    for path in paths:
        if any((path / name).is_file() for name in TOKENIZER_FILES):
            transformers.logging.set_verbosity_error()
            try:
                return transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            except Exception as exc:  # transformers, and code the user trusted, raise anything: one line each
                raise QuantkitError(transformers_refusal(path, exc)) from None
    raise QuantkitError(f"no tokenizer files in {', '.join(map(str, paths))}")


def check_token_ids(ids: torch.Tensor, config: dict[str, Any], model: Path) -> None:
    """Refuse token ids the model has no embedding for (a tokenizer that does not belong to the model)."""
    vocab_size = config.get("vocab_size")
    if ids.numel() and isinstance(vocab_size, int) and int(ids.max()) >= vocab_size:
        raise QuantkitError(
            f"the tokenizer in {model} yields token id {int(ids.max())}, but the model's vocab_size is "
            f"{vocab_size}: the tokenizer files do not belong to this model"
        )


def transformers_refusal(path: Path, exc: Exception) -> str:
    """One line for transformers' refusal to load ``path``."""
    if "trust_remote_code" in str(exc) or "custom code" in str(exc):
        return (f"{path} needs Python code from the model directory (auto_map); quantkit runs none unless "
                "you pass --trust-remote-code")
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"transformers cannot load {path}: {type(exc).__name__}: {first}"
