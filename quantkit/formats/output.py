"""Output formats as plugins: what a format accepts, how it stores one weight, how it finishes the output.

A format is one module with an :class:`OutputFormat` subclass registered in :data:`OUTPUT_FORMATS`;
``quantkit quantize --format NAME`` and :func:`quantkit.quantize` find it there. A
:class:`DirectoryFormat` receives every tensor through the sink from :meth:`DirectoryFormat.open`
(sharded safetensors unless it says otherwise) and writes its ``quantization_config`` (and any side
files) in :meth:`DirectoryFormat.finish`. A single-file format (GGUF) only declares what it accepts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from quantkit.errors import QuantkitError
from quantkit.formats.sharded import ShardedWriter
from quantkit.registry import Registry
from quantkit.schemes import CastTensor, IntConfig, KquantConfig, Quantized

if TYPE_CHECKING:
    from quantkit.plan import QuantPlan

AUTO = "auto"


class TensorSink(Protocol):
    """Where a directory format's tensors go: ``add`` each one, then ``finish`` (returns the files written)."""

    total_bytes: int

    def add(self, name: str, tensor: torch.Tensor) -> None: ...

    def finish(self) -> list[str]: ...


@dataclass
class WrittenWeights:
    """What a run stored, by kind, for the format's ``quantization_config``."""

    integer: dict[str, IntConfig] = field(default_factory=dict)  # module -> integer scheme
    blocks: dict[str, tuple[str, tuple[int, int]]] = field(default_factory=dict)  # module -> (ggml type, shape)
    float_linears: list[str] = field(default_factory=list)  # linears left in float


class OutputFormat(ABC):
    """One on-disk format, registered in :data:`OUTPUT_FORMATS` under ``name``."""

    name: str

    @abstractmethod
    def check(self, plan: QuantPlan) -> None:
        """A one-line :class:`QuantkitError` if the plan holds a weight this format cannot store."""


class DirectoryFormat(OutputFormat):
    """A format written as a checkpoint directory: tensors through a sink, then config.json and side files."""

    scale_dtype: torch.dtype | None = None  # GPTQ rounds its scales to this dtype while solving, if set

    @abstractmethod
    def encode(self, module: str, quantized: Quantized) -> dict[str, torch.Tensor]:
        """The tensors that store one quantized weight of ``module`` (casts are handled by :meth:`tensors`)."""

    @abstractmethod
    def finish(self, directory: Path, config: dict[str, Any], written: WrittenWeights) -> None:
        """Add the format's entries to ``config`` (written as config.json afterwards) and write side files."""

    def open(self, directory: Path, max_shard_bytes: int) -> TensorSink:
        """The sink for this run's tensors: sharded safetensors with the Hugging Face index."""
        return ShardedWriter(directory, max_shard_bytes)

    def tensors(self, module: str, weight_name: str, quantized: Quantized) -> dict[str, torch.Tensor]:
        """What one weight becomes on disk: a cast stays one tensor under its name; the rest is the format's."""
        if isinstance(quantized, CastTensor):
            return {weight_name: quantized.tensor}
        return self.encode(module, quantized)


OUTPUT_FORMATS: Registry[OutputFormat] = Registry("output format")


def resolve_output_format(requested: str, plan: QuantPlan) -> OutputFormat:
    """The format ``requested`` names (``auto``: ggml for k-quants, else compressed-tensors), checked."""
    if requested == AUTO:
        requested = "ggml" if has_kquants(plan) else "compressed-tensors"
    if requested not in OUTPUT_FORMATS:
        raise QuantkitError(f"--format must be {AUTO} or one of {', '.join(OUTPUT_FORMATS)}, got {requested!r}")
    chosen = OUTPUT_FORMATS.get(requested)
    chosen.check(plan)
    return chosen


def has_kquants(plan: QuantPlan) -> bool:
    return any(isinstance(t.scheme, KquantConfig) for t in plan.tensors)


def refuse_kquants(plan: QuantPlan, format_name: str) -> None:
    if has_kquants(plan):
        raise QuantkitError(f"k-quant weights are written as --format ggml or gguf, not {format_name}")


def refuse_integer_schemes(plan: QuantPlan, format_name: str) -> None:
    """Block formats hold k-quants and float weights only (``--method kquant``)."""
    if not has_kquants(plan):
        raise QuantkitError(f"--format {format_name} holds k-quant weights: use --method kquant")
    for item in plan.tensors:
        if isinstance(item.scheme, IntConfig):
            raise QuantkitError(f"--format {format_name} holds k-quant and float weights only; "
                                f"{item.name} is {item.scheme.describe()}")
