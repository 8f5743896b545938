"""What llama.cpp's GGUF needs to know about one architecture, declared as data on its ``ArchSpec.gguf``.

``GgufSpec.arch`` names llama.cpp's architecture; its tensor names come from gguf's table for that
architecture (:mod:`quantkit.model.gguf_names`), used by calibration's imatrix files and the k-quant
presets as well. ``GgufSpec.export`` says how the hyperparameters are written: an architecture is
GGUF-exportable only when it declares both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class GgufKey:
    """One architecture-specific hyperparameter: ``GGUFWriter.add_<key>`` of the sum of config values ``sources``.

    ``int`` keys need every source unless ``default`` stands in for a null or zero one; ``float`` keys are
    written only when their source is set, ``flag`` keys (True) only when it is true. ``head_dim`` is
    ``hidden_size / num_attention_heads`` unless the config sets it. ``zero_means_none``: read back (GGUF
    evaluation), a 0 is the config's null (``q_lora_rank``: a plain ``q_proj``).
    """

    key: str
    sources: tuple[str, ...]
    kind: Literal["int", "float", "flag"] = "int"
    default: int | None = None
    zero_means_none: bool = False


@dataclass(frozen=True)
class Refusal:
    """A config value llama.cpp's graph for the architecture would run differently: refused unless it is ``ok``.

    An absent or null value counts as ``ok``.
    """

    key: str
    ok: Any
    problem: str  # what llama.cpp cannot run, for the one-line error


@dataclass(frozen=True)
class GroupRouting:
    """Group-limited expert routing (``n_group``/``topk_group``), always or only when config key = value."""

    only_if: tuple[str, str] | None = None


@dataclass(frozen=True)
class GgufExport:
    """How the hyperparameters of an architecture are written, after the keys every architecture has."""

    head_count_kv: str = "num_key_value_heads"  # config key of attention.head_count_kv
    keys: tuple[GgufKey, ...] = ()  # in the order written
    permuted_rows: tuple[tuple[str, str], ...] = ()  # (GGUF kind, head count key): rotate-half rows -> pairs
    output_when_tied: bool = False  # llama.cpp requires output.weight even with tied embeddings
    gating_func: str | None = None  # gguf.ExpertGatingFuncType member
    group_routing: GroupRouting | None = None
    rope_yarn_log_mul: bool = False  # YaRN's mscale_all_dim as rope.scaling.yarn_log_multiplier
    refusals: tuple[Refusal, ...] = ()  # checked in order


@dataclass(frozen=True)
class GgufSpec:
    """llama.cpp's architecture for a model type, and how to export it (None: tensor names only)."""

    arch: str  # gguf.MODEL_ARCH_NAMES value, e.g. "deepseek2"
    export: GgufExport | None = None
    renames: tuple[tuple[str, str], ...] = ()  # (checkpoint name suffix, suffix in gguf's name table)
