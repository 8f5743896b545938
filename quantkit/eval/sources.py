"""What ``eval perplexity`` evaluates: a checkpoint directory or a GGUF file, loaded as a float model, and the
tokenizer that turns the text into its tokens.

Tokenizer, first found: ``--tokenizer`` (a directory or a GGUF); else Hugging Face tokenizer files in MODEL's
directory, then in ``--base``'s; else the tokenizer a GGUF (MODEL, then ``--base``) carries in its metadata,
rebuilt by transformers (its GGUF tokenizer support covers fewer architectures than quantkit reads; the error
says to pass ``--tokenizer``). A GGUF next to its original checkpoint is thus tokenized exactly as it was.
"""

from __future__ import annotations

import contextlib
import io
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from quantkit.errors import QuantkitError
from quantkit.formats.gguf.scan import check_gguf
from quantkit.formats.load import load_gguf, load_quantized
from quantkit.model.archs import ARCHS
from quantkit.model.checkpoint import Checkpoint, resolve_model_path
from quantkit.model.tokenizer import TOKENIZER_FILES, load_tokenizer, transformers_refusal


def resolve_source(model: str | Path | None) -> Path:
    """A GGUF file as it is; else the checkpoint directory :func:`resolve_model_path` finds."""
    if model is not None and (path := Path(model).expanduser()).is_file():
        return path
    return resolve_model_path(model)


def load_model(path: Path, dtype: torch.dtype, device: str, trust_remote_code: bool = False) -> Any:
    """A float model: a GGUF dequantized, quantkit's loader for its architectures (quantized or not), else
    transformers.

    Code in the model directory (``auto_map``) runs only with ``trust_remote_code``; never a prompt.
    """
    import transformers  # deferred: slow to import; the CLI's --help and errors come without it

    transformers.logging.set_verbosity_error()
    if path.is_file():
        return load_gguf(path, dtype, device)
    if Checkpoint(path).model_type in ARCHS:
        return load_quantized(path, dtype=dtype, device=device)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            model: Any = transformers.AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers and code the user trusted raise anything; each is one line here
        raise QuantkitError(transformers_refusal(path, exc)) from None
    return model.to(device).eval()


def describe_loader(path: Path) -> str:
    """How :func:`load_model` reads ``path``, for the results."""
    if path.is_file():
        types = ", ".join(f"{count} {kind}" for kind, count in sorted(check_gguf(path).items()))
        return f"GGUF dequantized through the gguf package {version('gguf')} ({types})"
    checkpoint = Checkpoint(path)
    if checkpoint.model_type in ARCHS:
        method = (checkpoint.config.get("quantization_config") or {}).get("quant_method")
        return "quantkit's loader" + (f" ({method} weights dequantized)" if method else " (float checkpoint)")
    return "transformers AutoModelForCausalLM"


def eval_tokenizer(explicit: Path | None, model: Path, base: Path | None,
                   trust_remote_code: bool = False) -> tuple[Any, str]:
    """The tokenizer and where it came from (see the module's docstring for the order)."""
    candidates = [explicit] if explicit is not None else [p for p in (model, base) if p is not None]
    directories = [p for p in candidates if p.is_dir()]
    for directory in directories:
        if any((directory / name).is_file() for name in TOKENIZER_FILES):
            return load_tokenizer(directory, trust_remote_code=trust_remote_code), str(directory)
    ggufs = [p for p in candidates if p.is_file()]
    if ggufs:
        return _gguf_tokenizer(ggufs[0]), f"{ggufs[0]} (GGUF metadata, rebuilt by transformers)"
    if explicit is not None and not explicit.exists():
        raise QuantkitError(f"--tokenizer {explicit} does not exist")
    raise QuantkitError(f"no tokenizer files in {', '.join(map(str, directories))}")


def _gguf_tokenizer(path: Path) -> Any:
    """transformers' tokenizer rebuilt from a GGUF's ``tokenizer.ggml.*`` metadata (the file checked first)."""
    import transformers  # deferred: slow to import

    check_gguf(path)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:  # transformers raises anything for a GGUF it does not support: one line here
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise QuantkitError(f"transformers cannot rebuild the tokenizer of {path} ({first}); pass --tokenizer DIR "
                            "with the model's Hugging Face tokenizer, or a --base directory that has one") from None
