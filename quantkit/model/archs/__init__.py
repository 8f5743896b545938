"""Architecture registry: one module per family, each registering an :class:`ArchSpec`."""

from __future__ import annotations

import importlib
import pkgutil

from quantkit.errors import QuantkitError
from quantkit.model.archs.base import ArchSpec, ExpertLayout, Role
from quantkit.registry import Registry

ARCHS: Registry[ArchSpec] = Registry("model_type")


def register_arch(spec: ArchSpec) -> ArchSpec:
    ARCHS.add(spec.model_type, spec)
    return spec


def get_arch(model_type: str) -> ArchSpec:
    if model_type not in ARCHS:
        raise QuantkitError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(ARCHS)}"
        )
    return ARCHS.get(model_type)


for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ARCHS", "ArchSpec", "ExpertLayout", "Role", "get_arch", "register_arch"]
