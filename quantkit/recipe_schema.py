"""The recipe schema as data, and its validation: every key's type, allowed values, default and meaning.

:func:`validate_recipe` checks a parsed recipe's structure, types and numeric ranges (names such as
methods or block types are checked by :meth:`SchemeConfig.validate` and the registries they name).
:func:`render_reference` turns the same data into the Markdown reference in ``docs/recipes.md``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import MISSING, dataclass, fields
from typing import Any, Literal, get_args

import regex

from quantkit.errors import QuantkitError
from quantkit.kquants import BLOCK_FORMATS
from quantkit.kquants.preset_overrides import OVERRIDABLE
from quantkit.kquants.presets import KQUANT_PRESETS
from quantkit.model.archs.base import Role
from quantkit.ranges.selectors import RANGE_SELECTORS
from quantkit.schemes import SCHEMES
from quantkit.schemes.config import ACTIVATION_MODES, MAX_BITS, MIN_BITS, WEIGHT_CLIPS, Granularity, RangeMode
from quantkit.schemes.gptq_solver import GROUP_FITS

RECIPE_VERSION = 1
MAX_RECIPE_BYTES = 1_000_000
SIZE_LIMIT = f"{MAX_RECIPE_BYTES / 1e6:g} MB ({MAX_RECIPE_BYTES:,} bytes)"
MAX_DEPTH = 32  # nested mappings/lists; a recipe needs 4 (recipe, rules, rule, match)
MAX_NODES = 100_000  # keys and values: bounds pure-Python YAML parsing (1 MB of "x," would take ~10 s)
NO_ANCHORS = "anchors and aliases are not allowed in recipes"
TOO_DEEP = f"nested deeper than {MAX_DEPTH} levels"
TOO_MANY_NODES = f"more than {MAX_NODES:,} keys and values"
ROLE_NAMES = tuple(role.value for role in Role)

Kind = Literal["int", "number", "bool", "str"]
_KINDS: dict[Kind, tuple[str, str, Callable[[Any], bool]]] = {  # kind -> (noun, type column, check)
    "int": ("an integer", "integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "number": ("a number", "number", lambda v: isinstance(v, int | float) and not isinstance(v, bool)),
    "bool": ("true or false", "boolean", lambda v: isinstance(v, bool)),
    "str": ("a string", "string", lambda v: isinstance(v, str)),
}
_SCHEME_DEFAULTS: dict[str, Any] = {}  # setting -> its default (the same in every method that has it)
_METHODS_OF: dict[str, list[str]] = {}  # setting -> the methods whose config has it
for _method in SCHEMES:
    for _field in fields(SCHEMES.get(_method).config_type):
        _SCHEME_DEFAULTS.setdefault(_field.name, _field.default)
        _METHODS_OF.setdefault(_field.name, []).append(_method)


@dataclass(frozen=True)
class Interval:
    """Numbers from ``low`` to ``high`` (None: unbounded), each end closed unless marked open."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def __contains__(self, value: float) -> bool:  # NaN is in no interval
        above = self.low is None or (value > self.low if self.open_low else value >= self.low)
        below = self.high is None or (value < self.high if self.open_high else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None and not self.open_low:
            return f"at least {self.low}"
        if not (self.open_low or self.open_high):
            return f"between {self.low} and {self.high}"
        return f"in {'(' if self.open_low else '['}{self.low}, {self.high}{')' if self.open_high else ']'}"


@dataclass(frozen=True)
class SchemeField:
    """One :class:`SchemeConfig` field as a recipe spells it (in ``default`` and in rules)."""

    name: str
    kind: Kind
    description: str
    choices: Iterable[str] = ()  # the names it may take (checked by SchemeConfig.validate)
    interval: Interval | None = None  # checked here
    nullable: bool = False
    hint: str = ""  # added to an out-of-interval error

    @property
    def expected(self) -> str:
        return _KINDS[self.kind][0] + (" or null" if self.nullable else "")

    def check(self, value: Any, where: str) -> None:
        """One-line error unless ``value`` has this field's type and lies in its interval."""
        if value is None and self.nullable:
            return
        if not _KINDS[self.kind][2](value):
            raise QuantkitError(f"{where} must be {self.expected}, got {show_value(value)}")
        if self.interval is not None and value not in self.interval:
            hint = f"; {self.hint}" if self.hint else ""
            raise QuantkitError(f"{where} must be {self.interval}, got {show_value(value)}{hint}")


SCHEME_FIELDS: tuple[SchemeField, ...] = (
    SchemeField("method", "str", "How the weight is stored; in a rule, `float` keeps the matched tensors in float.",
                choices=SCHEMES),
    SchemeField("bits", "int", "Bits per weight of the integer methods.", interval=Interval(MIN_BITS, MAX_BITS)),
    SchemeField("granularity", "str", "One scale per tensor, per row (channel) or per `group_size` weights of a row.",
                choices=get_args(Granularity)),
    SchemeField("group_size", "int", "Weights per scale along a row; setting it implies `granularity: group`. "
                "The last group of a row is shorter when the size does not divide the row; -1 or 0 means one "
                "scale per row (`granularity: channel`), as GPTQ tools spell it.",
                interval=Interval(-1), nullable=True, hint="-1 or 0 means one scale per row"),
    SchemeField("range", "str", "The code range: `restricted` is symmetric, `full` adds the lowest code.",
                choices=get_args(RangeMode)),
    SchemeField("clip", "str", "Weight clipping per channel or group.", choices=WEIGHT_CLIPS),
    SchemeField("percentile", "number", "Percentile kept by `clip: percentile` and `activation_range: percentile`.",
                interval=Interval(0, 100, open_low=True)),
    SchemeField("activations", "str", "INT8 input activations: `none` is weight-only.", choices=ACTIVATION_MODES),
    SchemeField("activation_range", "str", "How static activation scales are chosen from calibration.",
                choices=RANGE_SELECTORS),
    SchemeField("symmetric", "bool", "An absmax grid instead of zero points."),
    SchemeField("act_order", "bool", "Quantize columns in decreasing order of the Hessian diagonal."),
    SchemeField("static_groups", "bool", "Fix group parameters before the act-order permutation."),
    SchemeField("damp", "number", "Dampening added to the Hessian diagonal, as a fraction of its mean.",
                interval=Interval(0, 1, open_low=True, open_high=True)),
    SchemeField("block_size", "int", "Columns per lazy batch update.", interval=Interval(1)),
    SchemeField("group_fit", "str", "GPTQ: fit a group that starts inside a block of columns to the weights as the "
                "block started (`block-start`, the IST-DASLab reference's rule) or to its `current` weights.",
                choices=GROUP_FITS),
    SchemeField("ggml_type", "str", "One ggml block type for every weight (ternary: `TQ1_0` or `TQ2_0`, the GGUF "
                "block type, default `TQ2_0`).", choices=BLOCK_FORMATS, nullable=True),
    SchemeField("kquant_preset", "str", "The llama.cpp preset choosing each tensor's block type.",
                choices=KQUANT_PRESETS, nullable=True),
    SchemeField("tensor_types", "str", "A preset's per-tensor overrides, llama-quantize's `--tensor-type`: "
                "space-separated `PATTERN=TYPE`, the first pattern found in the GGUF name wins "
                "(default only).", nullable=True),
    SchemeField("output_tensor_type", "str", "A preset's type for `output.weight` (`--output-tensor-type`; "
                "default only).", choices=OVERRIDABLE, nullable=True),
    SchemeField("token_embedding_type", "str", "A preset's type for `token_embd.weight` "
                "(`--token-embedding-type`; default only).", choices=OVERRIDABLE, nullable=True),
)
_BY_NAME = {spec.name: spec for spec in SCHEME_FIELDS}


@dataclass(frozen=True)
class RecipeKey:
    """A top-level key (or a rule's ``match``), as documented; :func:`validate_recipe` checks it."""

    name: str
    type: str
    allowed: str
    default: str
    description: str


_PATTERNS = "globs, `re:<regex>`, `role:<role>` with role one of " + ", ".join(f"`{r}`" for r in ROLE_NAMES)
RECIPE_KEYS: tuple[RecipeKey, ...] = (
    RecipeKey("version", "integer", f"`{RECIPE_VERSION}`", "required", "Recipe format version."),
    RecipeKey("name", "string", "any", "the file name without extension", "Shown by `inspect` and in reports."),
    RecipeKey("default", "mapping", "scheme fields (below)", "required; `method` required",
              "The scheme of every quantizable weight that no rule or ignore pattern claims."),
    RecipeKey("rules", "list of mappings, or null", "`match` plus scheme fields", "`[]`",
              "Checked in order; the first rule with a matching pattern updates the default with its fields."),
    RecipeKey("rules[].match", "string or non-empty list of strings", _PATTERNS, "required",
              "A rule applies to tensors matching any of its patterns."),
    RecipeKey("ignore", "list of strings, or null", _PATTERNS, "`[]`",
              "Tensors matching any of these stay in float; checked before the rules."),
)
TOP_LEVEL_KEYS = frozenset(key.name for key in RECIPE_KEYS if "." not in key.name)


def validate_recipe(data: Any) -> None:
    """One-line error, naming the field, unless ``data`` has the recipe's structure and types."""
    if not isinstance(data, dict):
        raise QuantkitError("a recipe is a mapping with version, default, rules, ignore")
    _refuse_unknown(data, TOP_LEVEL_KEYS, "unknown recipe key(s)")
    version = data.get("version")
    if not _KINDS["int"][2](version) or version != RECIPE_VERSION:
        raise QuantkitError(f"recipe version must be {RECIPE_VERSION}, got {show_value(version)}")
    if "name" in data and not isinstance(data["name"], str):
        raise QuantkitError(f"name must be a string, got {show_value(data['name'])}")
    default = data.get("default")
    if not isinstance(default, dict) or "method" not in default:
        raise QuantkitError("'default' must be a mapping with at least 'method'")
    _check_scheme_fields(default, "default", "'default'")
    rules = data.get("rules")
    if rules is not None and not isinstance(rules, list):
        raise QuantkitError(f"rules must be a list of mappings, got {show_value(rules)}")
    for i, rule in enumerate(rules or []):
        check_rule(rule, f"rules[{i}]")
    ignore = data.get("ignore")
    if ignore is not None and not isinstance(ignore, list):
        raise QuantkitError(f"ignore must be a list of patterns, got {show_value(ignore)}")
    for i, pattern in enumerate(ignore or []):
        check_pattern(pattern, f"ignore[{i}]")


def check_rule(rule: Any, where: str) -> None:
    """One-line error unless ``rule`` is a mapping of ``match`` (valid patterns) and typed scheme fields."""
    if not isinstance(rule, dict) or "match" not in rule:
        raise QuantkitError(f"{where} needs a 'match' pattern or list of patterns")
    match = rule["match"]
    if isinstance(match, str):
        check_pattern(match, f"{where}.match")
    elif isinstance(match, list) and match:
        for i, pattern in enumerate(match):
            check_pattern(pattern, f"{where}.match[{i}]")
    else:
        raise QuantkitError(f"{where}.match must be a pattern or a non-empty list of patterns, got {show_value(match)}")
    _check_scheme_fields({k: v for k, v in rule.items() if k != "match"}, where, where)


def check_pattern(pattern: Any, where: str) -> None:
    """One-line error unless ``pattern`` is a string whose regex compiles and whose role exists."""
    if not isinstance(pattern, str):
        raise QuantkitError(f"{where} must be a pattern string, got {show_value(pattern)}")
    if pattern.startswith("re:"):
        try:
            regex.compile(pattern[3:])  # the engine recipe.pattern_matches uses
        except (regex.error, RecursionError, OverflowError) as exc:
            raise QuantkitError(f"bad regex {show_value(pattern)} in {where}: {exc}") from None
    if pattern.startswith("role:") and pattern[5:] not in ROLE_NAMES:
        raise QuantkitError(f"unknown role {_clip(repr(pattern[5:]))} in {where}; roles: {', '.join(ROLE_NAMES)}")


def _check_scheme_fields(raw: dict[Any, Any], where: str, label: str) -> None:
    _refuse_unknown(raw, _BY_NAME, f"unknown field(s) in {label}")
    for name, value in raw.items():
        _BY_NAME[name].check(value, f"{where}.{name}")


def _refuse_unknown(mapping: dict[Any, Any], known: Iterable[str], message: str) -> None:
    unknown = sorted(_key_text(key) for key in set(mapping) - set(known))
    if unknown:
        raise QuantkitError(_clip(f"{message}: {', '.join(unknown)}", 200))


def _key_text(key: Any) -> str:
    return key if isinstance(key, str) and key.isprintable() else show_value(key)


def show_value(value: Any) -> str:
    """``value`` for an error message: JSON, on one short line."""
    try:
        text = json.dumps(value, default=str)
    except (TypeError, ValueError, RecursionError):
        text = type(value).__name__
    return _clip(text)


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def render_reference() -> str:
    """The recipe reference in Markdown: limits, top-level keys and scheme fields (docs/recipes.md)."""
    lines = [
        "### Limits",
        "",
        f"- A recipe file is at most {SIZE_LIMIT} of UTF-8 text.",
        f"- Mappings and lists nest at most {MAX_DEPTH} levels deep, and hold at most {MAX_NODES:,} keys and values",
        "  in all.",
        "- YAML anchors (`&name`) and aliases (`*name`) are refused.",
        "- A key given twice in one mapping is refused, in YAML and in JSON.",
        "- Unknown keys and fields are refused; so are values of the wrong type: `bits: \"4\"`, `bits: 4.5`,",
        "  `symmetric: \"no\"` and `version: true` are errors, not conversions.",
        "- `rules: null` and `ignore: null` (an empty YAML key) mean none.",
        "",
        "### Top-level keys",
        "",
        "| key | type | allowed values | default | description |",
        "|---|---|---|---|---|",
        *(f"| `{k.name}` | {k.type} | {k.allowed} | {k.default} | {k.description} |" for k in RECIPE_KEYS),
        "",
        "### Scheme fields (in `default` and in each rule)",
        "",
        "Each method has its own settings; a field the method does not have is refused (`bits` with",
        "`method: kquant`, say). A rule that changes the method keeps the default's settings both methods have.",
        "",
        "| field | methods | type | allowed values | default | description |",
        "|---|---|---|---|---|---|",
        *(f"| `{f.name}` | {_methods_column(f)} | {_type_column(f)} | {_allowed_column(f)} | {_default_column(f)} "
          f"| {f.description} |" for f in SCHEME_FIELDS),
    ]
    return "\n".join(lines) + "\n"


def _methods_column(spec: SchemeField) -> str:
    if spec.name == "method":
        return "all"
    return ", ".join(_METHODS_OF[spec.name])


def _type_column(spec: SchemeField) -> str:
    return _KINDS[spec.kind][1] + (" or null" if spec.nullable else "")


def _allowed_column(spec: SchemeField) -> str:
    if spec.kind == "bool":
        return "`true`, `false`"
    if spec.interval is not None:
        return str(spec.interval)
    return ", ".join(f"`{name}`" for name in spec.choices) or "any"


def _default_column(spec: SchemeField) -> str:
    default = _SCHEME_DEFAULTS[spec.name]
    if default is MISSING:
        return "required"
    return "`" + json.dumps(default).strip('"') + "`"
