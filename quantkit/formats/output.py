"""Output formats as plugins: what a format accepts, how it stores one weight, how it finishes the output.

A format is one module with an :class:`OutputFormat` subclass registered in :data:`OUTPUT_FORMATS`;
``quantkit quantize --format NAME`` and :func:`quantkit.quantize` find it there. A
:class:`DirectoryFormat` receives every tensor through the sink from :meth:`DirectoryFormat.open`
(sharded safetensors unless it says otherwise) and writes its ``quantization_config`` (and any side
files) in :meth:`DirectoryFormat.finish`. A :class:`FileFormat` (GGUF) groups the plan into the tensors
of its file (:meth:`FileFormat.layout`); the driver loads, quantizes and records each one through that
layout, which then writes the file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from quantkit.errors import QuantkitError
from quantkit.formats.sharded import ShardedWriter
from quantkit.registry import Registry
from quantkit.schemes import CastTensor, IntConfig, KquantConfig, Quantized

if TYPE_CHECKING:
    from quantkit.formats.clients import ClientNote
    from quantkit.plan import QuantPlan, TensorPlan

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
    true_sequential: bool = True  # how GPTQ took its Hessians (GPTQ configs record it)


class OutputFormat(ABC):
    """One on-disk format, registered in :data:`OUTPUT_FORMATS` under ``name``."""

    name: str

    @abstractmethod
    def check(self, plan: QuantPlan) -> None:
        """A one-line :class:`QuantkitError` if the plan holds a weight this format cannot store."""

    def clients(self, plan: QuantPlan) -> list[ClientNote]:
        """The engines that load this format's output of ``plan`` and the known limits that apply (none known)."""
        return []


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


@dataclass(frozen=True)
class FileTensor:
    """One tensor of a single-file output, grouped from the plan.

    ``items`` are the plan weights it holds, stacked on its first axis when there are several (routed experts),
    none when the format computes it; ``shape`` is its float shape in the file's layout.
    """

    name: str
    items: tuple[TensorPlan, ...]
    shape: tuple[int, ...]


@dataclass(frozen=True)
class StoredTensor:
    """A file tensor as stored: its type (``Q4_K``, ``F16``, ...), its data (a float array or uint8 blocks), the
    float values the data stands for (None: exactly the loaded data) and its items' quantized weights, if any."""

    name: str
    type_name: str
    data: np.ndarray
    values: torch.Tensor | None = None
    quantized: tuple[Quantized, ...] = ()


QuantizeItem = Callable[["TensorPlan", torch.Tensor], Quantized]
"""The driver's quantization of one plan item's weight: its scheme, with calibration importance where it has one."""


class FileLayout(Protocol):
    """A single-file format's plan for one run: its tensors, how each is loaded and stored, and the file's writer."""

    tensors: list[FileTensor]  # in file order

    def load(self, tensor: FileTensor) -> torch.Tensor:
        """The float32 data of ``tensor`` in the file's layout (item i of several is ``data[i]``)."""
        ...

    def store(self, tensor: FileTensor, data: torch.Tensor, quantize: QuantizeItem) -> StoredTensor:
        """What the file holds for ``tensor``; its quantized items through ``quantize``."""
        ...

    def write(self, path: Path, tensors: Iterable[StoredTensor]) -> None:
        """Write the file at ``path`` (a temporary path the driver renames into place), ``tensors`` in order."""
        ...


class FileFormat(OutputFormat):
    """A format written as one file at ``--out``, with the run's report beside it."""

    @abstractmethod
    def layout(self, plan: QuantPlan) -> FileLayout:
        """The file's tensors for ``plan`` (no data read); a one-line :class:`QuantkitError` if it cannot hold them."""

    @abstractmethod
    def report_path(self, out: Path) -> Path:
        """Where the report of an output at ``out`` lies."""

    @abstractmethod
    def is_previous(self, path: Path) -> bool:
        """Whether the existing file ``path`` is a previous quantkit output of this format (``--overwrite`` may
        replace only those)."""


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
