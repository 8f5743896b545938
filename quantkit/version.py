"""quantkit's version, and the versions of what shaped a run's bytes (recorded in every report)."""

from __future__ import annotations

import platform
import sys

__version__ = "0.1.0"


def versions() -> dict[str, str]:
    """quantkit, Python, torch, transformers, safetensors, the platform and torch's thread count, as reports
    record them (the thread count changes the bytes of GPTQ and calibration: docs/determinism.md)."""
    import safetensors  # deferred: heavy, and `import quantkit` stays cheap
    import torch
    import transformers

    return {
        "quantkit": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "platform": platform.platform(),
        "torch_threads": str(torch.get_num_threads()),
    }
