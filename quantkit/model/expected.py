"""The tensors a checkpoint should hold, from its config alone (a model built on the meta device)."""

from __future__ import annotations

import contextlib
import io

import torch

from quantkit.errors import QuantkitError
from quantkit.model.archs.base import ArchSpec
from quantkit.model.checkpoint import Checkpoint


def expected_disk_shapes(checkpoint: Checkpoint, arch: ArchSpec) -> dict[str, tuple[int, ...]]:
    """On-disk (per-expert) tensor names and shapes that transformers expects from this config."""
    import transformers  # deferred: transformers takes seconds to import

    transformers.logging.set_verbosity_error()  # its load warnings are not the user's business here
    config_dict = dict(checkpoint.config)
    config_dict.pop("quantization_config", None)
    try:
        config = transformers.AutoConfig.for_model(**config_dict)
    except (ValueError, TypeError, KeyError) as exc:
        raise QuantkitError(f"invalid config.json in {checkpoint.path}: {exc}") from None
    try:
        with torch.device("meta"), contextlib.redirect_stderr(io.StringIO()):
            model = transformers.AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # transformers raises many types for inconsistent configs
        raise QuantkitError(f"cannot build {arch.model_type} from config.json in {checkpoint.path}: {exc}") from None
    memory_shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        memory_shapes.pop("lm_head.weight", None)
    return arch.disk_shapes(memory_shapes)


def check_against_config(
    checkpoint: Checkpoint, arch: ArchSpec, available: dict[str, tuple[int, ...]]
) -> list[str]:
    """Raise on missing tensors or shape mismatches; return names the config does not know."""
    expected = expected_disk_shapes(checkpoint, arch)
    for name, shape in expected.items():
        if name not in available:
            if name.endswith(("rotary_emb.inv_freq", "e_score_correction_bias")):
                continue  # buffers some writers omit; transformers initialises them
            raise QuantkitError(f"tensor {name} is missing from {checkpoint.path} (config.json expects it)")
        if available[name] != shape:
            raise QuantkitError(
                f"shape mismatch for {name}: checkpoint {list(available[name])}, config.json implies {list(shape)}"
            )
    return sorted(set(available) - set(expected))
