"""Recipes: a versioned default scheme plus ordered per-tensor rules, and named presets.

A recipe file (YAML or JSON)::

    version: 1
    default: {method: zeropoint, bits: 4, group_size: 128}
    rules:                              # first match wins; fields override the default
      - match: ["role:shared_expert", "*.self_attn.*"]
        method: absmax
        bits: 8
        granularity: channel
      - match: "re:.*layers\\.0\\..*"
        method: float                   # keep in float
    ignore: ["lm_head"]                 # always float

Patterns match the tensor name (``...q_proj.weight``) or its module name (``...q_proj``):
globs (``fnmatch``), ``re:`` regexes (``re.fullmatch``) and ``role:<role>`` with roles
embedding, lm_head, norm, router, attention, dense_mlp, shared_expert, routed_expert.
Routers, norms and embeddings are never quantized, whatever a rule says.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from quantkit.errors import QuantkitError
from quantkit.model.archs.base import QUANTIZABLE_ROLES, Role
from quantkit.schemes import SCHEMES, SchemeConfig

RECIPE_VERSION = 1
FLOAT = "float"
_SCHEME_FIELDS = {f.name for f in fields(SchemeConfig)}


@dataclass(frozen=True)
class Rule:
    """Tensors matching any of ``patterns`` get the default scheme updated with ``changes``."""

    patterns: tuple[str, ...]
    changes: dict[str, Any]

    def matches(self, name: str, role: Role) -> bool:
        return any(pattern_matches(p, name, role) for p in self.patterns)


@dataclass(frozen=True)
class Recipe:
    default: SchemeConfig
    rules: tuple[Rule, ...] = ()
    ignore: tuple[str, ...] = ()
    name: str = "custom"
    version: int = RECIPE_VERSION

    def scheme_for(self, name: str, role: Role) -> SchemeConfig | None:
        """The scheme for tensor ``name``, or None to keep it as it is."""
        if role not in QUANTIZABLE_ROLES or not name.endswith(".weight"):
            return None
        if any(pattern_matches(p, name, role) for p in self.ignore):
            return None
        for rule in self.rules:
            if rule.matches(name, role):
                if rule.changes.get("method") == FLOAT:
                    return None
                return self.default.with_updates(**rule.changes)
        return self.default

    def with_default(self, **changes: Any) -> Recipe:
        """The recipe with default-scheme fields replaced (None values are ignored)."""
        default = self.default.with_updates(**changes)
        default.validate()
        return Recipe(default, self.rules, self.ignore, self.name, self.version)

    def with_rule(self, patterns: list[str], **changes: Any) -> Recipe:
        """The recipe with a rule placed first (CLI overrides win over file rules)."""
        rule = Rule(tuple(patterns), {k: v for k, v in changes.items() if v is not None})
        _validate_rule(rule, self.default, "command line")
        return Recipe(self.default, (rule, *self.rules), self.ignore, self.name, self.version)

    def with_ignore(self, patterns: list[str]) -> Recipe:
        return Recipe(self.default, self.rules, (*self.ignore, *patterns), self.name, self.version)

    def to_dict(self) -> dict[str, Any]:
        default = {k: v for k, v in vars(self.default).items() if v is not None}
        return {
            "version": self.version,
            "name": self.name,
            "default": default,
            "rules": [{"match": list(r.patterns), **r.changes} for r in self.rules],
            "ignore": list(self.ignore),
        }


def pattern_matches(pattern: str, name: str, role: Role) -> bool:
    if pattern.startswith("role:"):
        return pattern[5:] == role.value
    module = name.removesuffix(".weight")
    if pattern.startswith("re:"):
        regex = re.compile(pattern[3:])
        return bool(regex.fullmatch(name) or regex.fullmatch(module))
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(module, pattern)


def load_recipe(path: Path) -> Recipe:
    """Read and validate a YAML/JSON recipe; errors name the file and the offending field."""
    if not path.is_file():
        raise QuantkitError(f"recipe file not found: {path}")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise QuantkitError(f"invalid recipe {path}: {first}") from None
    try:
        return recipe_from_dict(data, name=path.stem)
    except QuantkitError as exc:
        raise QuantkitError(f"invalid recipe {path}: {exc}") from None


def recipe_from_dict(data: Any, name: str = "custom") -> Recipe:
    if not isinstance(data, dict):
        raise QuantkitError("a recipe is a mapping with version, default, rules, ignore")
    unknown = set(data) - {"version", "name", "default", "rules", "ignore"}
    if unknown:
        raise QuantkitError(f"unknown recipe key(s): {', '.join(sorted(unknown))}")
    version = data.get("version")
    if version != RECIPE_VERSION:
        raise QuantkitError(f"recipe version must be {RECIPE_VERSION}, got {version!r}")
    default = _scheme_from_dict(data.get("default"), "default")
    rules = []
    for i, raw in enumerate(data.get("rules") or []):
        if not isinstance(raw, dict) or "match" not in raw:
            raise QuantkitError(f"rules[{i}] needs a 'match' pattern or list of patterns")
        patterns = raw["match"] if isinstance(raw["match"], list) else [raw["match"]]
        changes = {k: v for k, v in raw.items() if k != "match"}
        rule = Rule(tuple(str(p) for p in patterns), changes)
        _validate_rule(rule, default, f"rules[{i}]")
        rules.append(rule)
    ignore = data.get("ignore") or []
    if not isinstance(ignore, list):
        raise QuantkitError("'ignore' must be a list of patterns")
    return Recipe(default, tuple(rules), tuple(str(p) for p in ignore), str(data.get("name", name)))


def _scheme_from_dict(raw: Any, where: str) -> SchemeConfig:
    if not isinstance(raw, dict) or "method" not in raw:
        raise QuantkitError(f"'{where}' must be a mapping with at least 'method'")
    unknown = set(raw) - _SCHEME_FIELDS
    if unknown:
        raise QuantkitError(f"unknown field(s) in '{where}': {', '.join(sorted(unknown))}")
    SCHEMES.get(str(raw["method"]))
    config = SchemeConfig(method=str(raw["method"])).with_updates(**raw)
    config.validate()
    return config


def _validate_rule(rule: Rule, default: SchemeConfig, where: str) -> None:
    unknown = set(rule.changes) - _SCHEME_FIELDS
    if unknown:
        raise QuantkitError(f"unknown field(s) in {where}: {', '.join(sorted(unknown))}")
    for pattern in rule.patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise QuantkitError(f"bad regex {pattern!r} in {where}: {exc}") from None
        if pattern.startswith("role:") and pattern[5:] not in {r.value for r in Role}:
            raise QuantkitError(f"unknown role {pattern[5:]!r} in {where}; roles: {', '.join(r.value for r in Role)}")
    if rule.changes.get("method") == FLOAT:
        return
    if "method" in rule.changes:
        SCHEMES.get(str(rule.changes["method"]))
    default.with_updates(**rule.changes).validate()


PRESETS: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        recipe_from_dict(
            {"version": 1, "default": {"method": "absmax", "bits": 8}, "ignore": ["role:lm_head"]},
            name="int8",
        ),
        recipe_from_dict(
            {"version": 1, "default": {"method": "absmax", "bits": 4, "group_size": 128},
             "ignore": ["role:lm_head"]},
            name="int4-sym-g128",
        ),
        recipe_from_dict(
            {"version": 1, "default": {"method": "zeropoint", "bits": 4, "group_size": 128},
             "ignore": ["role:lm_head"]},
            name="int4-g128",
        ),
        recipe_from_dict(
            {
                "version": 1,
                "default": {"method": "zeropoint", "bits": 4, "group_size": 128},
                "rules": [{"match": ["role:shared_expert", "role:attention", "role:dense_mlp"],
                           "method": "absmax", "bits": 8, "granularity": "channel"}],
                "ignore": ["role:lm_head"],
            },
            name="int4-g128-moe",
        ),
        recipe_from_dict({"version": 1, "default": {"method": "fp16"}, "ignore": ["role:lm_head"]}, name="fp16"),
        recipe_from_dict({"version": 1, "default": {"method": "bf16"}, "ignore": ["role:lm_head"]}, name="bf16"),
    )
}
PRESET_DESCRIPTIONS = {
    "int8": "INT8 absmax per-channel weights (W8A16), near-lossless",
    "int4-sym-g128": "INT4 absmax, groups of 128 (symmetric, Marlin-friendly)",
    "int4-g128": "INT4 zero-point, groups of 128 (the usual W4A16)",
    "int4-g128-moe": "INT4 g128 routed experts; attention, dense MLPs and shared experts INT8",
    "fp16": "cast quantizable weights to float16",
    "bf16": "cast quantizable weights to bfloat16",
}
DEFAULT_PRESET = "int8"


def get_preset(name: str) -> Recipe:
    """A named recipe, or a k-quant preset (``Q4_K_M``: llama.cpp's per-tensor type rules)."""
    from quantkit.kquants.presets import PRESETS as KQUANT_PRESETS

    if name in KQUANT_PRESETS:
        return Recipe(SchemeConfig(method="kquant", kquant_preset=name), name=name)
    if name not in PRESETS:
        raise QuantkitError(f"unknown preset {name!r}; presets: {', '.join([*PRESETS, *KQUANT_PRESETS])}")
    return PRESETS[name]
