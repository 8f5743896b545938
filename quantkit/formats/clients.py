"""Which engines load an output, and the measured limits that apply to it (docs/formats.md#client-compatibility).

Each output format lists its clients for one plan (``OutputFormat.clients``) from the facts below; the report stores
the list as data (``clients`` in ``quantkit_report.json``). Engine versions are those the docs measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from quantkit.model.archs.base import Role
from quantkit.schemes.config import IntConfig

if TYPE_CHECKING:
    from quantkit.plan import QuantPlan, TensorPlan

QUANTKIT_LOADER = "quantkit.load_quantized"
COMPRESSED_TENSORS = "compressed-tensors 0.20 decompressor"
TRANSFORMERS = "transformers 5.25"
VLLM_CPU = "vLLM 0.32 (CPU, no AMX)"
GPTQMODEL = "GPTQModel 7.3.6"
LLAMA_CPP = "llama.cpp (llama-cpp-python 0.3.36)"
VLLM_WNA16_OUT_MULTIPLE = 32  # vLLM's CPU WNA16 GEMM takes output sizes divisible by this


@dataclass(frozen=True)
class ClientNote:
    """One engine and this output: ``loads`` True, False (refused or fails), or None (not run here); ``why``."""

    engine: str
    loads: bool | None
    why: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "loads": self.loads, "why": self.why}


@dataclass(frozen=True)
class IntegerFacts:
    """What a plan's integer weights are, as the client limits ask about them."""

    items: tuple[TensorPlan, ...]

    @classmethod
    def of(cls, plan: QuantPlan) -> IntegerFacts:
        return cls(tuple(t for t in plan.tensors if isinstance(t.scheme, IntConfig)))

    def _schemes(self, items: tuple[TensorPlan, ...] | None = None) -> list[IntConfig]:
        return [t.scheme for t in (self.items if items is None else items) if isinstance(t.scheme, IntConfig)]

    @property
    def w8a8(self) -> tuple[TensorPlan, ...]:
        return tuple(t for t in self.items if isinstance(t.scheme, IntConfig) and t.scheme.activations != "none")

    @property
    def weight_only(self) -> tuple[TensorPlan, ...]:
        return tuple(t for t in self.items if isinstance(t.scheme, IntConfig) and t.scheme.activations == "none")

    def asymmetric(self, items: tuple[TensorPlan, ...] | None = None) -> bool:
        return any(s.writes_zero_points for s in self._schemes(items))

    def routed(self, items: tuple[TensorPlan, ...] | None = None) -> bool:
        return any(t.role == Role.ROUTED_EXPERT for t in (self.items if items is None else items))

    def grouped(self, items: tuple[TensorPlan, ...] | None = None) -> bool:
        return any(s.granularity == "group" for s in self._schemes(items))

    def bits(self, items: tuple[TensorPlan, ...]) -> set[int]:
        return {s.bits for s in self._schemes(items)}

    def static_activations(self) -> bool:
        return any(s.activations == "static" for s in self._schemes(self.w8a8))

    def partial_groups(self) -> bool:
        """A group size that does not divide a row: the last group is shorter."""
        return any(t.scheme.granularity == "group" and t.scheme.group_size and t.shape[-1] % t.scheme.group_size
                   for t in self.items if isinstance(t.scheme, IntConfig))

    def outputs_not_multiple(self, items: tuple[TensorPlan, ...], multiple: int) -> list[str]:
        return [t.name for t in items if t.shape[0] % multiple]
