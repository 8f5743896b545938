"""Reading a JSON object from a user-supplied file, with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; a one-line QuantkitError if it is missing, invalid or not an object."""
    if not path.is_file():
        raise QuantkitError(f"file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (ValueError, RecursionError) as exc:  # also undecodable bytes, too-deep nesting, over-long integers
        raise QuantkitError(f"invalid JSON in {path}: {exc}") from None
    if not isinstance(data, dict):
        raise QuantkitError(f"{path} is not a JSON object")
    return data
