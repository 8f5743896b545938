"""Scheme configs: one frozen dataclass per method, which validates, describes and sizes itself.

A recipe's ``default`` and each of its rules become one of these (:func:`make_config`,
:meth:`SchemeConfig.with_updates`). The integer grid shared by absmax, zeropoint and GPTQ is
:class:`IntConfig` (bits, granularity, clipping, INT8 activations); :class:`AbsmaxConfig` and
:class:`ZeropointConfig` are here because the grid code builds them, GPTQ's, the k-quants' and the
casts' configs live with their schemes. A setting that does not apply to a method is refused by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Literal

from quantkit.errors import QuantkitError
from quantkit.ranges.selectors import RANGE_SELECTORS

if TYPE_CHECKING:
    from collections.abc import Set

Granularity = Literal["tensor", "channel", "group"]
RangeMode = Literal["restricted", "full"]
MIN_BITS, MAX_BITS = 2, 8
WEIGHT_CLIPS = ("minmax", "percentile", "mse")
ACTIVATION_MODES = ("none", "static", "dynamic")
ACTIVATION_BITS = 8
PER_CHANNEL_GROUP_SIZES = (-1, 0)  # GPTQ tooling's spelling of "no groups": one scale per row


class SettingNotApplicable(QuantkitError):
    """Settings given for a method that does not have them."""

    def __init__(self, settings: list[str], method: str) -> None:
        self.settings, self.method = settings, method
        verb = "does" if len(settings) == 1 else "do"
        super().__init__(f"{', '.join(settings)} {verb} not apply to method {method}")


@dataclass(frozen=True)
class SchemeConfig(ABC):
    """What to do with one weight: the method's name and its settings (a subclass per method)."""

    method: str

    @classmethod
    def settings(cls) -> frozenset[str]:
        """The names of this config's settings (every field but ``method``)."""
        return frozenset(f.name for f in fields(cls) if f.name != "method")

    @classmethod
    def carried_settings(cls) -> frozenset[str]:
        """The settings a switch to this method keeps from the previous one (those both have, unless narrowed)."""
        return cls.settings()

    @abstractmethod
    def describe(self) -> str:
        """One short line for reports and tables, e.g. ``absmax int8 per-channel, restricted``."""

    def validate(self) -> None:  # noqa: B027  (a hook: a method without settings has nothing to check)
        """One-line errors for impossible settings (independent of any tensor)."""

    def check_shape(self, name: str, shape: tuple[int, ...]) -> None:  # noqa: B027  (a hook: casts take any shape)
        """One-line error when ``name`` of ``shape`` cannot take this scheme."""

    @abstractmethod
    def bits_per_weight(self, shape: tuple[int, ...], scale_bits: int) -> float:
        """Storage bits per weight on a weight of ``shape`` (scales of ``scale_bits``), without quantizing it."""

    def with_updates(self, **changes: Any) -> SchemeConfig:
        """A copy with ``changes`` (None values ignored); a new ``method`` keeps the settings both methods share.

        A setting the (new) method does not have is refused by name.
        """
        changes = {k: v for k, v in changes.items() if v is not None}
        method = str(changes.pop("method", self.method))
        target = config_type(method)
        refused = sorted(set(changes) - target.settings())
        if refused:
            raise SettingNotApplicable(refused, method)
        carried = target.settings() if target is type(self) else target.carried_settings()
        kept = {name: getattr(self, name) for name in self.settings() & carried}
        return target(method=method, **{**kept, **changes})._normalised(changes.keys())

    def _normalised(self, changed: Set[str]) -> SchemeConfig:
        """The config after an update of ``changed`` settings, made consistent (see :class:`IntConfig`)."""
        return self

    def to_dict(self) -> dict[str, Any]:
        """The settings as a recipe spells them (None values left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def n_groups(in_features: int, group_size: int) -> int:
    """Scale columns of a row of ``in_features`` in groups of ``group_size`` (the last one may be shorter)."""
    return -(-in_features // group_size)


def config_type(method: str) -> type[SchemeConfig]:
    """The config class of a registered method (one-line error for an unknown one)."""
    from quantkit.schemes.base import SCHEMES  # the registry is filled by the scheme modules, which import this one

    return SCHEMES.get(method).config_type


def make_config(method: str, **settings: Any) -> SchemeConfig:
    """The config of ``method`` with ``settings`` (the rest at their defaults), checked by name, not validated."""
    return config_type(method)(method=method).with_updates(**settings)


@dataclass(frozen=True)
class IntConfig(SchemeConfig):
    """An integer grid: ``bits``-bit codes with a scale per tensor, row or group, optionally INT8 activations."""

    bits: int = 8
    granularity: Granularity = "channel"
    group_size: int | None = None
    clip: str = "minmax"  # weight clipping per channel/group: one of WEIGHT_CLIPS
    percentile: float = 99.99  # for clip/activation_range "percentile"
    activations: str = "none"  # INT8 input activations: none (weight-only), static or dynamic
    activation_range: str = "minmax"  # selector for static input scales (quantkit.ranges.selectors)

    @property
    @abstractmethod
    def writes_zero_points(self) -> bool:
        """Whether the grid is asymmetric: codes come with an integer zero point per scale."""

    def describe(self) -> str:
        grid = {"tensor": "per-tensor", "channel": "per-channel"}.get(self.granularity, f"g{self.group_size}")
        clip = f", clip {self.clip}" if self.clip != "minmax" else ""
        acts = {"none": "", "static": f", A8 static {self.activation_range}", "dynamic": ", A8 dynamic"}
        return f"{self.method} int{self.bits} {grid}{self._grid_details()}{clip}{acts.get(self.activations, '')}"

    def _grid_details(self) -> str:
        """What the method adds to :meth:`describe` after the granularity."""
        return ""

    def _normalised(self, changed: Set[str]) -> SchemeConfig:
        """A group size implies group granularity; other granularities have none.

        A group size of -1 or 0 means per channel, as GPTQ tooling spells it (``group_size: -1``).
        """
        updated = self
        if "group_size" in changed and "granularity" not in changed:
            updated = replace(updated, granularity="group")
        if updated.granularity == "group" and updated.group_size in PER_CHANNEL_GROUP_SIZES:
            updated = replace(updated, granularity="channel")
        if updated.granularity != "group":
            updated = replace(updated, group_size=None)
        return updated

    def validate(self) -> None:
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise QuantkitError(f"bits must be between {MIN_BITS} and {MAX_BITS} for {self.method}, got {self.bits}")
        if self.granularity not in ("tensor", "channel", "group"):
            raise QuantkitError(f"granularity must be tensor, channel or group, got {self.granularity!r}")
        if self.granularity == "group" and (self.group_size is None or self.group_size <= 0):
            raise QuantkitError(
                f"group granularity needs a positive group size, got {self.group_size} "
                "(group size -1 or 0 means one scale per row: granularity channel)"
            )
        if self.clip not in WEIGHT_CLIPS:
            raise QuantkitError(f"weight clip must be one of {', '.join(WEIGHT_CLIPS)}, got {self.clip!r}")
        if not 0 < self.percentile <= 100:
            raise QuantkitError(f"percentile must be in (0, 100], got {self.percentile}")
        if self.activations not in ACTIVATION_MODES:
            raise QuantkitError(
                f"activations must be one of {', '.join(ACTIVATION_MODES)}, got {self.activations!r}"
            )
        RANGE_SELECTORS.get(self.activation_range)

    def check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if len(shape) != 2:
            raise QuantkitError(f"{name}: {self.method} quantizes 2-D weights, got shape {list(shape)}")

    def partial_group(self, in_features: int) -> int | None:
        """The width of the last, shorter group of a row of ``in_features``; None when groups divide the row.

        Groups are columns ``[k * g, (k + 1) * g)`` and the last one ends at the row's end, as in the
        reference GPTQ and compressed-tensors: a row shorter than the group is one group.
        """
        if self.granularity != "group" or not self.group_size or in_features % self.group_size == 0:
            return None
        return in_features % self.group_size

    def bits_per_weight(self, shape: tuple[int, ...], scale_bits: int) -> float:
        out_features, in_features = shape
        n_scales = {"tensor": 1, "channel": out_features}.get(
            self.granularity, out_features * n_groups(in_features, self.group_size or in_features)
        )
        per_scale = scale_bits + (self.bits if self.writes_zero_points else 0)
        return self.bits + n_scales * per_scale / (out_features * in_features)


@dataclass(frozen=True)
class AbsmaxConfig(IntConfig):
    """Symmetric codes, no zero point; ``range`` says whether the lowest code is used."""

    range: RangeMode = "restricted"

    @property
    def writes_zero_points(self) -> bool:
        return False

    def _grid_details(self) -> str:
        return f", {self.range}"

    def validate(self) -> None:
        super().validate()
        if self.range not in ("restricted", "full"):
            raise QuantkitError(f"range must be restricted or full, got {self.range!r}")


@dataclass(frozen=True)
class ZeropointConfig(IntConfig):
    """Asymmetric codes with an integer zero point per scale."""

    @property
    def writes_zero_points(self) -> bool:
        return True
