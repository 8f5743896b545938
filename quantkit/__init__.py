"""quantkit: post-training quantization for Hugging Face Mixture-of-Experts language models.

Importing the package is cheap and side-effect free; heavy modules load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from quantkit.version import __version__

if TYPE_CHECKING:
    from quantkit.api import CalibrationSettings, QuantizeOptions, calibrate, inspect, quantize
    from quantkit.calib.artifact import load_calibration
    from quantkit.formats.load import load_quantized

__all__ = ["CalibrationSettings", "QuantizeOptions", "__version__", "calibrate", "inspect", "load_calibration",
           "load_quantized", "quantize"]


def __getattr__(name: str) -> Any:
    if name in ("quantize", "inspect", "calibrate", "CalibrationSettings", "QuantizeOptions"):
        from quantkit import api  # lazy: `import quantkit` stays light; the API pulls in torch

        return getattr(api, name)
    if name == "load_calibration":
        # lazy: `import quantkit` stays light; the API pulls in torch
        from quantkit.calib.artifact import load_calibration

        return load_calibration
    if name == "load_quantized":
        from quantkit.formats.load import load_quantized  # lazy: `import quantkit` stays light; the API pulls in torch

        return load_quantized
    raise AttributeError(f"module 'quantkit' has no attribute {name!r}")
