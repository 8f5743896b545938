"""llama-quantize's type overrides of a preset: ``--tensor-type``, ``--output-tensor-type``
and ``--token-embedding-type``.

Parsed as ``tools/quantize/quantize.cpp`` parses them (llama-cpp-python 0.3.36's llama.cpp): a
``--tensor-type`` is ``PATTERN=TYPE``, split at the first ``=``, the pattern lower-cased, the type named
case-insensitively; several are written space-separated, as in a ``--tensor-type-file``. The patterns
are regular expressions searched (not matched) in the GGUF tensor name; the first that matches decides.
llama.cpp compiles them as ECMAScript ``std::regex``; here they are Python ``re`` patterns, which agree
on ordinary patterns (literals, classes, ``.``, ``*``, ``+``, ``?``, ``|``, anchors, ``\\d``, groups).
:func:`quantkit.kquants.presets.assign_types` applies them as ``llama_tensor_get_type`` does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from quantkit.errors import QuantkitError

# the KquantConfig settings (and recipe keys) that hold the overrides: they apply to the whole preset
PRESET_OVERRIDES = ("tensor_types", "output_tensor_type", "token_embedding_type")
# the ggml types an override may name: the types quantkit writes (F32: kept as it is)
OVERRIDABLE = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "F32")


def override_type(text: str, option: str) -> str:
    """The ggml type ``text`` names (any case, as llama-quantize's ``parse_ggml_type``), or a one-line error."""
    name = text.strip().upper()
    if name not in OVERRIDABLE:
        raise QuantkitError(f"unknown tensor type {text!r} for {option}; supported: {', '.join(OVERRIDABLE)}")
    return name


@dataclass(frozen=True)
class TensorTypePattern:
    """One ``--tensor-type PATTERN=TYPE``: the lower-cased pattern, compiled, and the type."""

    pattern: str
    type: str
    regex: re.Pattern[str]

    def describe(self) -> str:
        return f"--tensor-type {self.pattern}={self.type}"


def parse_tensor_types(spec: str | None) -> tuple[TensorTypePattern, ...]:
    """The ``PATTERN=TYPE`` entries of ``spec`` (space-separated), in order; a one-line error for a bad one."""
    parsed = []
    for entry in (spec or "").split():
        pattern, sep, type_text = entry.partition("=")
        if not sep:
            raise QuantkitError(f"--tensor-type {entry!r}: expected PATTERN=TYPE, e.g. attn_v=q8_0")
        if not pattern:
            raise QuantkitError(f"--tensor-type {entry!r}: missing tensor name pattern")
        if not type_text:
            raise QuantkitError(f"--tensor-type {entry!r}: missing quantization type")
        pattern = pattern.lower()
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise QuantkitError(f"--tensor-type {entry!r}: bad regular expression ({exc})") from None
        parsed.append(TensorTypePattern(pattern, override_type(type_text, "--tensor-type"), regex))
    return tuple(parsed)


def join_tensor_types(entries: list[str] | None) -> str | None:
    """Repeated ``--tensor-type`` values as one space-separated spec (None when there are none)."""
    if not entries:
        return None
    for entry in entries:
        if not entry or any(c.isspace() for c in entry):
            raise QuantkitError(f"--tensor-type {entry!r}: expected PATTERN=TYPE without spaces")
    spec = " ".join(entries)
    parse_tensor_types(spec)
    return spec


@dataclass(frozen=True)
class TypeOverrides:
    """The overrides of one run: patterns in order, and the output's and token embedding's types."""

    tensor_types: tuple[TensorTypePattern, ...] = ()
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None

    @classmethod
    def parse(cls, tensor_types: str | None, output_tensor_type: str | None,
              token_embedding_type: str | None) -> TypeOverrides:
        return cls(
            parse_tensor_types(tensor_types),
            None if output_tensor_type is None else override_type(output_tensor_type, "--output-tensor-type"),
            None if token_embedding_type is None else override_type(token_embedding_type, "--token-embedding-type"),
        )

    def match(self, name: str) -> TensorTypePattern | None:
        """The first pattern found in ``name`` (``std::regex_search``), if any."""
        return next((p for p in self.tensor_types if p.regex.search(name)), None)


NO_OVERRIDES = TypeOverrides()
