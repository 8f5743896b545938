"""Option values from their command-line spelling: sizes, percentages, devices, and the command as typed."""

from __future__ import annotations

import re
import sys

from quantkit.errors import QuantkitError


def command_line() -> list[str]:
    """The command as typed, recorded in reports and calibration metadata."""
    return ["quantkit", *sys.argv[1:]]


def parse_size(text: str) -> int:
    """``"2GB"`` -> bytes (decimal units KB/MB/GB, binary KiB/MiB/GiB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise QuantkitError(f"invalid size {text!r}; use e.g. 2GB or 500MB")
    units = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    size = int(float(match[1]) * units[(match[2] or "B").lower()])
    if size <= 0:
        raise QuantkitError(f"shard size must be positive, got {text!r}")
    return size


def parse_percent(text: str) -> float:
    """``"2%"`` or ``"2"`` -> 0.02."""
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        raise QuantkitError(f"invalid percentage {text!r}; use e.g. 2%") from None
    if value < 0:
        raise QuantkitError(f"--max-increase must not be negative, got {text!r}")
    return value / 100


def resolve_device(device: str) -> str:
    """``auto`` -> cuda where available, else cpu; one-line errors for anything else but cpu, cuda, cuda:N."""
    import torch  # deferred: pulls in torch; --help stays fast

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise QuantkitError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QuantkitError("--device cuda, but no CUDA device is available")
    return device
