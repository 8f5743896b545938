"""What quantize will do to every tensor, decided and validated before anything is written."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from quantkit.errors import QuantkitError
from quantkit.kquant_types import resolve_kquant_types
from quantkit.model.archs import ArchSpec, Role, get_arch
from quantkit.model.checkpoint import Checkpoint
from quantkit.model.expected import check_against_config
from quantkit.recipe import Recipe
from quantkit.schemes import SchemeConfig


@dataclass(frozen=True)
class TensorPlan:
    """One output weight: its on-disk name, role, shape and scheme (None: copied unchanged)."""

    name: str
    role: Role
    shape: tuple[int, ...]
    dtype: torch.dtype
    scheme: SchemeConfig | None

    @property
    def module(self) -> str:
        return self.name.removesuffix(".weight")


@dataclass(frozen=True)
class SourcePlan:
    """One checkpoint tensor and the output tensors made from it (several for fused experts)."""

    source: str
    outputs: tuple[TensorPlan, ...]


@dataclass
class QuantPlan:
    checkpoint: Checkpoint
    arch: ArchSpec
    recipe: Recipe
    sources: list[SourcePlan]
    unexpected: list[str] = field(default_factory=list)
    type_rules: dict[str, str] = field(default_factory=dict)  # kquant: why each tensor got its block type
    # kquant preset: the scheme of the output.weight a GGUF adds for tied embeddings (qwen2moe), in a 1-tuple
    # (None inside: kept in F32); () when the embedding's scheme serves it
    tied_output: tuple[SchemeConfig | None, ...] = ()

    @property
    def tensors(self) -> list[TensorPlan]:
        return [t for s in self.sources for t in s.outputs]


def make_plan(checkpoint: Checkpoint, recipe: Recipe) -> QuantPlan:
    """Resolve the recipe for every tensor and validate the checkpoint against its config.

    k-quant tensors get their block type here (a preset's rules, or a ``ggml_type`` the recipe's rules
    give, see :mod:`quantkit.kquant_types`).
    """
    if "quantization_config" in checkpoint.config:
        raise QuantkitError(f"{checkpoint.path} is already quantized; use its float original instead")
    arch = get_arch(checkpoint.model_type)
    sources: list[SourcePlan] = []
    available: dict[str, tuple[int, ...]] = {}
    for source, info in sorted(checkpoint.tensors.items(), key=lambda kv: natural_key(kv[0])):
        if arch.experts is not None and arch.is_fused(source):
            shapes = arch.experts.fused_shapes(source, info.shape)
        else:
            shapes = {source: info.shape}
        outputs = []
        for name, shape in shapes.items():
            role = arch.role(name)
            scheme = recipe.scheme_for(name, role) if len(shape) == 2 else None
            if scheme is not None:
                scheme.check_shape(name, shape)
            if not info.dtype.is_floating_point and scheme is not None:
                raise QuantkitError(f"{name}: cannot quantize a {info.dtype} tensor")
            outputs.append(TensorPlan(name, role, shape, info.dtype, scheme))
            if name in available:
                raise QuantkitError(f"tensor {name} appears twice in {checkpoint.path}")
            available[name] = shape
        sources.append(SourcePlan(source, tuple(outputs)))
    unexpected = check_against_config(checkpoint, arch, available)
    if unexpected:  # e.g. DeepSeek-V3's multi-token-prediction layer: no model class uses it, keep it as is
        unknown = set(unexpected)
        sources = [
            SourcePlan(s.source, tuple(replace(t, scheme=None) if t.name in unknown else t for t in s.outputs))
            for s in sources
        ]

    return resolve_kquant_types(QuantPlan(checkpoint, arch, recipe, sources, unexpected))


def natural_key(name: str) -> list[tuple[int, int, str]]:
    """Sort ``layers.10`` after ``layers.9``; numbers sort before words at the same position."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split(".")]
