"""``quantkit eval perplexity``: load model(s) and text, build windows, evaluate, compare to a baseline."""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quantkit.errors import QuantkitError
from quantkit.eval.perplexity import EvalResult, evaluate
from quantkit.eval.sources import describe_loader, eval_tokenizer, load_model, resolve_source
from quantkit.eval.windows import make_windows
from quantkit.jsonfile import read_json_object
from quantkit.model.checkpoint import Checkpoint
from quantkit.model.tokenizer import check_token_ids
from quantkit.outputs import atomic_file
from quantkit.text_sources import load_text
from quantkit.version import __version__

EVAL_VERSION = 1
DEFAULT_SEQ_LEN = {"gptq": 2048, "llamacpp": 512}


@dataclass(frozen=True)
class EvalSettings:
    dataset: str = "wikitext2"
    protocol: str = "gptq"
    seq_len: int | None = None  # default: 2048 (gptq) or 512 (llamacpp)
    stride: int | None = None
    max_windows: int | None = None
    batch_size: int = 4
    text_field: str = "text"
    split: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False  # run Python code shipped in the model directory (auto_map)
    tokenizer: str | None = None  # a directory or GGUF to take the tokenizer from (default: see eval/sources.py)

    @property
    def window_len(self) -> int:
        return self.seq_len or DEFAULT_SEQ_LEN[self.protocol]


def run_perplexity(
    model: str | Path | None,
    settings: EvalSettings,
    base: str | Path | None = None,
    on_progress: Any = None,
) -> dict[str, Any]:
    """Evaluate ``model`` (and ``base`` on the same windows); each a checkpoint directory or a GGUF file.

    Returns the results record.
    """
    model_path = resolve_source(model)
    base_path = resolve_source(base) if base is not None else None
    dtype = _dtype(settings.dtype)
    explicit = Path(settings.tokenizer).expanduser() if settings.tokenizer else None
    tokenizer, tokenizer_source = eval_tokenizer(explicit, model_path, base_path, settings.trust_remote_code)
    source = load_text(settings.dataset, settings.text_field, settings.split)
    ids = torch.tensor(tokenizer(source.text, verbose=False)["input_ids"], dtype=torch.long)
    for path in (model_path, *([base_path] if base_path else [])):
        if path.is_dir():  # a GGUF's vocabulary is checked once it is loaded
            check_token_ids(ids, Checkpoint(path).config, path)
    windows = make_windows(ids, settings.protocol, settings.window_len, settings.stride, tokenizer.bos_token_id)
    if settings.max_windows is not None:
        if settings.max_windows < 1:
            raise QuantkitError(f"--max-windows must be positive, got {settings.max_windows}")
        windows = windows[: settings.max_windows]
    quantized = load_model(model_path, dtype, settings.device, settings.trust_remote_code)
    reference = load_model(base_path, dtype, settings.device, settings.trust_remote_code) if base_path else None
    if model_path.is_file():
        check_token_ids(ids, {"vocab_size": quantized.config.vocab_size}, model_path)
    if base_path is not None and base_path.is_file() and reference is not None:
        check_token_ids(ids, {"vocab_size": reference.config.vocab_size}, base_path)
    if reference is not None and reference.config.vocab_size != quantized.config.vocab_size:
        raise QuantkitError("MODEL and --base have different vocabularies; they must share a tokenizer")
    if on_progress is not None:
        on_progress(total=len(windows))
    result = evaluate(quantized, windows, base=reference, batch_size=settings.batch_size, device=settings.device,
                      on_batch=on_progress)
    record = results_record(model_path, base_path, source.name, settings, len(ids), result)
    record["loaded"] = {"model": describe_loader(model_path),
                        "base": describe_loader(base_path) if base_path else None}
    record["tokenizer"] = tokenizer_source
    return record


def results_record(
    model: Path, base: Path | None, dataset: str, settings: EvalSettings, text_tokens: int, result: EvalResult
) -> dict[str, Any]:
    import transformers  # deferred: slow to import; only its version is recorded here

    return {
        "quantkit_eval_version": EVAL_VERSION,
        "model": str(model),
        "base": str(base) if base else None,
        "dataset": dataset,
        "protocol": "stride" if settings.stride else settings.protocol,
        "seq_len": settings.window_len,
        "stride": settings.stride,
        "text_tokens": text_tokens,
        "windows": result.windows,
        "tokens_scored": result.tokens,
        "ppl": result.model.ppl,
        "mean_nll": result.model.nll / result.tokens,
        "base_ppl": result.base.ppl if result.base else None,
        "kl": result.kl,
        "top1_agreement": result.top1_agreement,
        "seconds": result.seconds,
        "tokens_per_s": result.tokens_per_s,  # scored tokens per second, both models included
        "dtype": settings.dtype,
        "versions": {"quantkit": __version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "platform": platform.platform()},
    }


def check_regression(
    result: dict[str, Any], baseline_file: Path | None, max_increase: float | None, max_kl: float | None
) -> str | None:
    """A one-line explanation when the gate fails, None when it passes (errors for unusable input)."""
    if max_kl is not None:
        if result["kl"] is None:
            raise QuantkitError("--max-kl needs --base (KL is measured against the base model)")
        if result["kl"] > max_kl:
            return f"regression: KL {result['kl']:.5f} exceeds --max-kl {max_kl:g}"
    if baseline_file is None:
        if max_increase is not None:
            raise QuantkitError("--max-increase needs --baseline results.json")
        return None
    baseline = _read_baseline(baseline_file)
    for key in ("protocol", "seq_len", "stride", "tokens_scored"):
        if baseline.get(key) != result[key]:
            raise QuantkitError(
                f"baseline {baseline_file} was measured with {key}={baseline.get(key)!r}, this run has "
                f"{result[key]!r}; compare like with like"
            )
    increase = result["ppl"] / baseline["ppl"] - 1
    if max_increase is not None and increase > max_increase:
        return (f"regression: perplexity {result['ppl']:.4f} vs baseline {baseline['ppl']:.4f} "
                f"(+{increase:.2%} > {max_increase:.2%})")
    return None


def save_results(path: Path, result: dict[str, Any]) -> None:
    """Write ``result`` to ``path`` atomically; an existing file is replaced only if it holds earlier results."""
    with atomic_file(path, True, is_previous=_is_results_file) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")


def _is_results_file(path: Path) -> bool:
    try:
        return "quantkit_eval_version" in json.loads(path.read_text())
    except (ValueError, OSError, TypeError):
        return False


def _read_baseline(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise QuantkitError(f"baseline file not found: {path}")
    data = read_json_object(path)
    if "ppl" not in data:
        raise QuantkitError(f"{path} is not a `quantkit eval perplexity --save` results file")
    return data


def _dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise QuantkitError(f"--dtype must be one of {', '.join(dtypes)}, got {name!r}")
    return dtypes[name]
