"""The fields of quantkit's JSON outputs that may differ between two runs of the same inputs, options and seed.

Everything else quantkit writes is byte-identical between such runs on one machine (docs/determinism.md);
``tests/test_determinism.py`` and ``tests/test_byte_identity.py`` compare JSON outputs without these fields.
A key is volatile wherever it appears in its file (``seconds`` is each GPTQ layer's time in a report).
"""

from __future__ import annotations

from typing import Any

# quantkit_report.json (quantize)
REPORT_VOLATILE: dict[str, str] = {
    "model": "the model's path or hub id as given on the command line",
    "output": "where the run wrote",
    "command": "the command line, which names the paths",
    "versions": "the versions of quantkit, Python, torch, transformers, safetensors, the platform and the thread "
                "count",
    "wall_time_s": "the run's time",
    "peak_rss_mb": "the process's peak memory, which depends on what it did before (other runs in one process)",
    "seconds": "the time of each GPTQ layer",
    "experts_per_chunk": "the routed experts GPTQ solved at once, per site: by default from the memory available "
                         "then (the output does not depend on it)",
    "path": "the path of the --calibration directory",
    "notes": "besides notes on the weights, what the output guard found at the target (a stale lock taken "
             "over, a killed run's leftovers removed or restored): the history of the target, not the inputs",
}
# calibration.json (calibrate)
CALIBRATION_VOLATILE: dict[str, str] = {
    "model": "the model's path as given",
    "command": "the command line",
    "versions": "as in the report",
    "seconds": "the run's time",
    "peak_rss_mb": "as in the report",
    "notes": "what the output guard found at the target, as in the report",
}
# the results JSON of `eval perplexity --save`
EVAL_VOLATILE: dict[str, str] = {
    "model": "the evaluated model's path as given",
    "base": "the base model's path as given",
    "tokenizer": "where the tokenizer was read from (a path)",
    "baseline": "the path of the --baseline results",
    "seconds": "the evaluation's time",
    "tokens_per_s": "scored tokens per second",
    "versions": "the versions of quantkit, torch, transformers and the platform",
}


def without_volatile(value: Any, volatile: dict[str, str] = REPORT_VOLATILE) -> Any:
    """``value`` (parsed JSON) with every key in ``volatile`` removed, at any depth."""
    if isinstance(value, dict):
        return {k: without_volatile(v, volatile) for k, v in value.items() if k not in volatile}
    if isinstance(value, list):
        return [without_volatile(v, volatile) for v in value]
    return value
