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
globs (``fnmatch``), ``re:`` regexes (``fullmatch``, Python syntax, 1 s per name at most) and ``role:<role>`` with roles
embedding, lm_head, norm, router, attention, dense_mlp, shared_expert, routed_expert.
Routers, norms and embeddings are never quantized, whatever a rule says.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import regex
import yaml

from quantkit.errors import QuantkitError
from quantkit.kquants.preset_overrides import PRESET_OVERRIDES
from quantkit.kquants.presets import KQUANT_PRESETS, OVERRIDE_TYPES
from quantkit.model.archs.base import QUANTIZABLE_ROLES, Role
from quantkit.recipe_schema import (
    MAX_DEPTH,
    MAX_NODES,
    MAX_RECIPE_BYTES,
    NO_ANCHORS,
    RECIPE_VERSION,
    SIZE_LIMIT,
    TOO_DEEP,
    TOO_MANY_NODES,
    check_pattern,
    check_rule,
    show_value,
    validate_recipe,
)
from quantkit.schemes import SchemeConfig, make_config

FLOAT = "float"  # a rule's method that keeps its tensors in float


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
        check_rule({"match": list(rule.patterns), **rule.changes}, "command-line rule")
        _check_rule_scheme(rule, self.default, "command-line rule")
        return Recipe(self.default, (rule, *self.rules), self.ignore, self.name, self.version)

    def with_kquant_type(self, role: Role, type_name: str, option: str) -> Recipe:
        """A first rule giving every tensor of ``role`` the ggml type ``type_name`` (``F16``: a float16 cast).

        This is what ``--shared-experts-type`` and ``--dense-ffn-type`` add: they override a preset's choice
        exactly, and the row fallback still applies.
        """
        if self.default.method != "kquant":
            raise QuantkitError(f"{option} applies to --method kquant only")
        if type_name not in OVERRIDE_TYPES:
            supported = ", ".join(OVERRIDE_TYPES)
            raise QuantkitError(f"unknown tensor type {type_name!r} for {option}; supported: {supported}")
        changes = {"method": "fp16"} if type_name == "F16" else {"ggml_type": type_name}
        return self.with_rule([f"role:{role.value}"], **changes)

    def rule_for(self, name: str, role: Role) -> Rule | None:
        """The rule that decides tensor ``name``'s scheme (the first that matches), if any."""
        return next((rule for rule in self.rules if rule.matches(name, role)), None)

    def with_ignore(self, patterns: list[str]) -> Recipe:
        """The recipe with more ``ignore`` patterns (the CLI's --ignore), checked like a file's."""
        for pattern in patterns:
            check_pattern(pattern, "--ignore")
        return Recipe(self.default, self.rules, (*self.ignore, *patterns), self.name, self.version)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "name": self.name,
            "default": self.default.to_dict(),
            "rules": [{"match": list(r.patterns), **r.changes} for r in self.rules],
            "ignore": list(self.ignore),
        }


REGEX_TIMEOUT_S = 1.0  # per tensor name: a catastrophically backtracking pattern fails instead of hanging


def pattern_matches(pattern: str, name: str, role: Role) -> bool:
    if pattern.startswith("role:"):
        return pattern[5:] == role.value
    module = name.removesuffix(".weight")
    if pattern.startswith("re:"):
        compiled = regex.compile(pattern[3:])
        try:
            return bool(compiled.fullmatch(name, timeout=REGEX_TIMEOUT_S)
                        or compiled.fullmatch(module, timeout=REGEX_TIMEOUT_S))
        except TimeoutError:
            raise QuantkitError(f"pattern {pattern!r} takes over {REGEX_TIMEOUT_S:g} s to match {name} "
                                "(catastrophic backtracking); simplify it") from None
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(module, pattern)


def load_recipe(path: Path) -> Recipe:
    """Read and validate a YAML/JSON recipe; errors name the file and the offending field."""
    if not path.is_file():
        raise QuantkitError(f"recipe file not found: {path}")
    try:
        return recipe_from_dict(_read_recipe_data(path), name=path.stem)
    except QuantkitError as exc:
        raise QuantkitError(f"invalid recipe {path}: {exc}") from None


def recipe_from_dict(data: Any, name: str = "custom") -> Recipe:
    """A recipe from parsed YAML/JSON; one-line errors name the offending field."""
    validate_recipe(data)
    default = _checked_scheme(lambda: make_config(**data["default"]), "default")
    rules = []
    for i, raw in enumerate(data.get("rules") or []):
        patterns = raw["match"] if isinstance(raw["match"], list) else [raw["match"]]
        rule = Rule(tuple(patterns), {k: v for k, v in raw.items() if k != "match"})
        _check_rule_scheme(rule, default, f"rules[{i}]")
        rules.append(rule)
    return Recipe(default, tuple(rules), tuple(data.get("ignore") or ()), data.get("name", name))


class _RecipeLoader(yaml.SafeLoader):
    """YAML without anchors, aliases or duplicate keys, within MAX_DEPTH levels and MAX_NODES keys and values."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0
        self.nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event = self.peek_event()
        if isinstance(event, yaml.NodeEvent) and event.anchor is not None:  # an alias's anchor is its target
            raise _composer_error(NO_ANCHORS, event)
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise _composer_error(TOO_MANY_NODES, event)
        if not isinstance(event, yaml.CollectionStartEvent):
            return super().compose_node(parent, index)
        if self.depth == MAX_DEPTH:
            raise _composer_error(TOO_DEEP, event)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # collection keys are refused as unhashable by the base class
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {show_value(key)}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _composer_error(problem: str, event: yaml.Event) -> yaml.composer.ComposerError:
    return yaml.composer.ComposerError(None, None, problem, event.start_mark)  # type: ignore[arg-type]  # stubs: 2 Marks


def _read_recipe_data(path: Path) -> Any:
    """The parsed file: bounded in size and nesting, strict UTF-8, no YAML anchors or duplicate keys."""
    too_big = f"larger than the {SIZE_LIMIT} limit for recipes"
    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise QuantkitError(too_big)
        with path.open("rb") as file:
            raw = file.read(MAX_RECIPE_BYTES + 1)
    except OSError as exc:
        raise QuantkitError(f"cannot be read: {exc.strerror or exc}") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise QuantkitError(too_big)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise QuantkitError(f"not UTF-8 text: byte 0x{raw[exc.start]:02x} at offset {exc.start}") from None
    if path.suffix == ".json":
        return _parse_json(text)
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # _RecipeLoader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise QuantkitError(", ".join(filter(None, [exc.context, exc.problem])) + where) from None
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: e.g. a 5,000-digit integer, a 13th month
        raise QuantkitError(str(exc).strip().splitlines()[0]) from None


def _parse_json(text: str) -> Any:
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise QuantkitError(TOO_DEEP) from None
    except ValueError as exc:  # JSONDecodeError, duplicate keys, a 5,000-digit integer
        raise QuantkitError(str(exc).strip().splitlines()[0]) from None
    _check_nesting(data)
    return data


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise ValueError(f"duplicate key {show_value(key)}")
        data[key] = value
    return data


def _check_nesting(data: Any) -> None:
    """The YAML loader's limits for parsed JSON: MAX_DEPTH levels, MAX_NODES keys and values (no recursion)."""
    nodes, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        is_dict, is_list = isinstance(value, dict), isinstance(value, list)
        nodes += 1 + (len(value) if is_dict else 0)
        if nodes > MAX_NODES:
            raise QuantkitError(TOO_MANY_NODES)
        if not (is_dict or is_list):
            continue
        if depth > MAX_DEPTH:
            raise QuantkitError(TOO_DEEP)
        stack.extend((child, depth + 1) for child in (value.values() if is_dict else value))


def _checked_scheme(make: Callable[[], SchemeConfig], where: str) -> SchemeConfig:
    """The scheme ``make`` builds, validated; errors name ``where`` (the default, a rule)."""
    try:
        config = make()
        config.validate()
    except QuantkitError as exc:
        raise QuantkitError(f"{where}: {exc}") from None
    return config


def _check_rule_scheme(rule: Rule, default: SchemeConfig, where: str) -> None:
    """The default updated with the rule's fields must be a valid scheme (unless the rule keeps float)."""
    if rule.changes.get("method") == FLOAT:
        return
    whole_preset = sorted(set(rule.changes) & set(PRESET_OVERRIDES))
    if whole_preset:
        raise QuantkitError(f"{where}: {', '.join(whole_preset)} override the whole preset; set them in default")
    _checked_scheme(lambda: default.with_updates(**rule.changes), where)


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
    if name in KQUANT_PRESETS:
        return Recipe(make_config("kquant", kquant_preset=name), name=name)
    if name not in PRESETS:
        raise QuantkitError(f"unknown preset {name!r}; presets: {', '.join([*PRESETS, *KQUANT_PRESETS])}")
    return PRESETS[name]
