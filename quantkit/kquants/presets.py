"""llama.cpp's k-quant presets (``Q4_K_M`` ...): which ggml type each GGUF tensor gets.

A port of ``llama_tensor_get_type`` and its helpers (``tensor_get_category``,
``tensor_allows_quantization``, ``tensor_type_fallback``, ``llama_ftype_get_default_type``) from
``src/llama-quant.cpp`` of the llama.cpp vendored in llama-cpp-python 0.3.36, for the non-IQ file
types Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K and Q8_0 with no imatrix, and with llama-quantize's
``--tensor-type``, ``--output-tensor-type`` and ``--token-embedding-type`` overrides
(:mod:`quantkit.kquants.preset_overrides`; not ``--pure``). As in llama.cpp:

* tensors are visited in llama.cpp's file order (``weight_name_comparer``: by block number, then
  name); the attn_v-like tensors (``attn_v``, ``attn_qkv``, ``attn_kv_b``) are counted in that
  order, and ``ffn_down`` is placed by its block number when ``n_expert > 1`` (merged
  ``ffn_down_exps`` and ``ffn_down_shexp`` of a block share it), else by a running count; a tensor
  a ``--tensor-type`` pattern sets is not counted;
* the 8-expert special cases test ``n_expert == 8`` exactly (Mixtral), not ``>= 8``;
* with no ``output.weight`` (tied embeddings) ``token_embd`` takes the output rules;
* ``LLM_TYPE_70B`` (an 80-block Llama with grouped KV heads, an 80-block Qwen2) raises a Q3_K or
  Q4_K attn_v to Q5_K.

Left out: the rules of architectures quantkit does not know (Falcon, GLM5-next, BailingMoE3) and the
IQ/TQ/MXFP4 file types. The row-length fallback is
``tensor_type_fallback``'s table (llama-quant.cpp lines 390-440): Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0,
Q5_K -> Q5_1, Q6_K -> Q8_0, a 32-block type keeps its type, and a row that the fallback's block does
not divide either becomes F16 (IQ4_NL is only the IQ types' fallback there). Differences from llama.cpp:

* two MoE options llama.cpp lacks: ``--shared-experts-type`` sets the shared experts
  (``ffn_{gate,up,down}_shexp``) and ``--dense-ffn-type`` the FFN of dense blocks (``ffn_{gate,up,down}``
  without experts, e.g. DeepSeek's first_k_dense_replace blocks; in a dense model that is every FFN).
  They are recipe rules (``role:shared_expert`` / ``role:dense_mlp`` with a ``ggml_type``, see
  ``Recipe.with_kquant_type``) that replace the preset's choice exactly, as ``--tensor-type`` does, and
  are still subject to the fallback; they come before ``--tensor-type``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import gguf

from quantkit.errors import QuantkitError
from quantkit.kquants.preset_overrides import NO_OVERRIDES, TypeOverrides
from quantkit.kquants.preset_tensors import (
    ATTN_V_LIKE,
    TensorSpec,
    block_of,
    file_order,
    kept_reason,
    tensor_category,
)
from quantkit.registry import Registry

OVERRIDE_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16")
KEEP = "F32"  # the type reported for a tensor that is left as it is

# tensor_type_fallback's switch (llama-quant.cpp, llama-cpp-python 0.3.36), for the types quantkit encodes;
# a type not listed (the 32-blocks Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) falls back to itself, then to F16
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def block_size(type_name: str) -> int:
    """Weights per block of a ggml type (256 for k-quants, 32 for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, 1 for F16/F32)."""
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][0]


def type_bits_per_weight(type_name: str) -> float:
    """Storage bits per weight of a ggml type (Q4_K: 4.5, Q6_K: 6.5625, Q8_0: 8.5 ...)."""
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    return size * 8 / block


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers and every third between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


@dataclass(frozen=True)
class Selector:
    """Which layers a rule picks: ``picks(index, count, n_gqa)``; the texts describe a hit or miss."""

    describe: str
    hit: str
    miss: str
    picks: Callable[[int, int, int], bool]


EVERY_LAYER = Selector("", "in every layer", "", lambda i, n, gqa: True)
MORE_BITS = Selector(
    "on use_more_bits layers (first and last n/8, every 3rd between)",
    "on a more-bits layer",
    "off the more-bits layers",
    lambda i, n, gqa: use_more_bits(i, n),
)
FIRST_16TH = Selector(
    "on layers < n/16", "in the first n/16 layers", "past the first n/16 layers", lambda i, n, gqa: i < n // 16
)
FIRST_8TH = Selector(
    "on layers < n/8", "in the first n/8 layers", "past the first n/8 layers", lambda i, n, gqa: i < n // 8
)
FIRST_2 = Selector("on the first 2 of them", "among the first 2", "past the first 2", lambda i, n, gqa: i < 2)
FIRST_4 = Selector("on the first 4 of them", "among the first 4", "past the first 4", lambda i, n, gqa: i < 4)
GQA_4 = Selector("if n_head/n_head_kv >= 4", "with n_gqa >= 4", "with n_gqa < 4", lambda i, n, gqa: gqa >= 4)


@dataclass(frozen=True)
class TypeRule:
    """``type`` where ``where`` picks the layer, else ``otherwise`` (None: the preset's base type)."""

    type: str
    where: Selector = EVERY_LAYER
    otherwise: str | None = None

    def describe(self, base: str) -> str:
        if self.where is EVERY_LAYER:
            return self.type
        return f"{self.type} {self.where.describe}, else {self.otherwise or base}"


@dataclass(frozen=True)
class Preset:
    """A llama.cpp file type: its base type and the per-category rules of ``llama_tensor_get_type``."""

    name: str
    base: str  # llama_ftype_get_default_type
    note: str  # llama-quantize's size and perplexity line
    attn_v: TypeRule | None = None  # attn_v, attn_qkv, attn_kv_b
    ffn_down: TypeRule | None = None
    attn_output: TypeRule | None = None
    attn_output_8_experts: str | None = None  # attn_output when n_expert == 8


PRESET_ORDER = (
    Preset("Q2_K", "Q2_K", "2.96G, +3.5199 ppl @ Llama-3-8B", attn_v=TypeRule("Q4_K", GQA_4, "Q3_K"),
           ffn_down=TypeRule("Q3_K"), attn_output=TypeRule("Q3_K"), attn_output_8_experts="Q5_K"),
    Preset("Q3_K_S", "Q3_K", "3.41G, +1.6321 ppl @ Llama-3-8B", attn_output_8_experts="Q5_K"),
    Preset("Q3_K_M", "Q3_K", "3.74G, +0.6569 ppl @ Llama-3-8B", attn_v=TypeRule("Q5_K", FIRST_2, "Q4_K"),
           ffn_down=TypeRule("Q5_K", FIRST_16TH, "Q4_K"), attn_output=TypeRule("Q4_K"), attn_output_8_experts="Q5_K"),
    Preset("Q3_K_L", "Q3_K", "4.03G, +0.5562 ppl @ Llama-3-8B", attn_v=TypeRule("Q5_K"), ffn_down=TypeRule("Q5_K"),
           attn_output=TypeRule("Q5_K")),
    Preset("Q4_K_S", "Q4_K", "4.37G, +0.2689 ppl @ Llama-3-8B", attn_v=TypeRule("Q5_K", FIRST_4),
           ffn_down=TypeRule("Q5_K", FIRST_8TH), attn_output_8_experts="Q5_K"),
    Preset("Q4_K_M", "Q4_K", "4.58G, +0.1754 ppl @ Llama-3-8B", attn_v=TypeRule("Q6_K", MORE_BITS),
           ffn_down=TypeRule("Q6_K", MORE_BITS), attn_output_8_experts="Q5_K"),
    Preset("Q5_K_S", "Q5_K", "5.21G, +0.1049 ppl @ Llama-3-8B"),
    Preset("Q5_K_M", "Q5_K", "5.33G, +0.0569 ppl @ Llama-3-8B", attn_v=TypeRule("Q6_K", MORE_BITS),
           ffn_down=TypeRule("Q6_K", MORE_BITS)),
    Preset("Q6_K", "Q6_K", "6.14G, +0.0217 ppl @ Llama-3-8B"),
    Preset("Q8_0", "Q8_0", "7.96G, +0.0026 ppl @ Llama-3-8B"),
)
KQUANT_PRESETS: Registry[Preset] = Registry("k-quant preset")
for _preset in PRESET_ORDER:
    KQUANT_PRESETS.add(_preset.name, _preset)


@dataclass(frozen=True)
class Assignment:
    """The type chosen for a tensor (``F32``: left unquantized) and why."""

    type: str
    rule: str
    fallback_from: str | None = None  # the type the rules chose when the row length forced another


@dataclass
class _State:
    """``quantize_state_impl``: the model facts and the running counters of one assignment."""

    preset: Preset
    n_layers: int
    n_expert: int
    n_gqa: int
    tied_embeddings: bool
    n_attention_wv: int
    llama_70b: bool = False
    output_tensor_type: str | None = None
    i_attention_wv: int = 0
    i_ffn_down: int = 0


def _apply(rule: TypeRule | None, what: str, index: int, count: int, state: _State) -> tuple[str, str]:
    base = state.preset.base
    if rule is None:
        return base, f"{what}: base type"
    if rule.where.picks(index, count, state.n_gqa):
        return rule.type, f"{what} {rule.where.hit}"
    return rule.otherwise or base, f"{what} {rule.where.miss}"


def _preset_type(spec: TensorSpec, state: _State) -> tuple[str, str]:
    """``llama_tensor_get_type_impl`` for one quantizable tensor; advances the counters."""
    preset, base, category = state.preset, state.preset.base, tensor_category(spec.name)
    if category == "output" or (category == "token_embd" and state.tied_embeddings):
        what = "output" if category == "output" else "token_embd (tied embeddings): as output"
        if state.output_tensor_type is not None:
            return state.output_tensor_type, f"{what}: --output-tensor-type"
        if spec.shape[-1] % block_size(base):
            return "Q8_0", f"{what}, row {spec.shape[-1]} not a multiple of {block_size(base)}"
        return ("Q6_K" if base != "Q8_0" else base), what
    if category in ATTN_V_LIKE:
        index = state.i_attention_wv
        state.i_attention_wv += 1
        if state.n_expert == 8:
            return "Q8_0", f"{category} in an 8-expert model"
        type_name, rule = _apply(preset.attn_v, category, index, state.n_attention_wv, state)
        if state.llama_70b and type_name in ("Q3_K", "Q4_K"):
            return "Q5_K", f"{rule}, raised to Q5_K in a 70B Llama (8 heads share attn_v)"
        return type_name, rule
    if category == "attn_k" and state.n_expert == 8:
        return "Q8_0", "attn_k in an 8-expert model"
    if category == "ffn_down":
        i_layer = state.i_ffn_down
        if state.n_expert > 1:  # layer_info: merged experts are placed by their block number
            block = block_of(spec.name)
            if block is None or block >= state.n_layers:
                raise QuantkitError(f"tensor {spec.name}: no block number in [0, {state.n_layers})")
            i_layer = block
        state.i_ffn_down += 1
        return _apply(preset.ffn_down, "ffn_down", i_layer, state.n_layers, state)
    if category == "attn_output":
        if state.n_expert == 8:
            if preset.attn_output_8_experts:
                return preset.attn_output_8_experts, "attn_output in an 8-expert model"
            return base, "attn_output in an 8-expert model: base type"
        return _apply(preset.attn_output, "attn_output", 0, 0, state)
    return base, "base type"


def fallback_type(type_name: str, n_per_row: int, rule: str | None = None) -> Assignment | None:
    """``tensor_type_fallback``: None if ``type_name``'s block divides the row, else the type to use instead.

    The replacement is the type's fallback (F16 if its block does not divide the row either);
    ``rule``, the reason ``type_name`` was chosen, is kept in the new rule.
    """
    block = block_size(type_name)
    if n_per_row % block == 0:
        return None
    new = _FALLBACK.get(type_name, type_name)
    if n_per_row % block_size(new):
        new = "F16"
    reason = f"fallback from {type_name}: row {n_per_row} not divisible by {block}"
    return Assignment(new, f"{reason} ({rule})" if rule else reason, fallback_from=type_name)


def is_llama_70b(gguf_arch: str, n_layers: int, n_experts: int, n_head: int, n_head_kv: int) -> bool:
    """llama.cpp's ``LLM_TYPE_70B`` for the architectures quantkit knows: an 80-block ``llama`` (not 8 experts)
    with grouped KV heads, or an 80-block ``qwen2`` (``load_arch_hparams`` of src/models/llama.cpp, qwen2.cpp)."""
    if n_layers != 80:
        return False
    if gguf_arch == "llama":
        return n_experts != 8 and n_head != n_head_kv
    return gguf_arch == "qwen2"


def assign_types(
    preset: str,
    tensors: Sequence[TensorSpec],
    *,
    n_layers: int,
    n_experts: int,
    n_head: int,
    n_head_kv: int,
    llama_70b: bool = False,
    overrides: TypeOverrides = NO_OVERRIDES,
) -> dict[str, Assignment]:
    """The type of every tensor under ``preset``, keyed by name in the order given.

    ``n_layers`` is the block count (llama.cpp's ``n_layer_all``), ``n_experts`` the routed
    experts per layer (0 or 1 for a dense model); ``n_head``/``n_head_kv`` (the GGUF's) give ``n_gqa``;
    ``llama_70b`` is llama.cpp's ``LLM_TYPE_70B`` (:func:`is_llama_70b`). ``overrides`` are applied as
    ``llama_tensor_get_type`` applies llama-quantize's options: ``--token-embedding-type`` and
    ``--output-tensor-type`` replace the type of ``token_embd``/``output`` with no row fallback;
    else the first ``--tensor-type`` pattern found in the name replaces the preset's rules for that
    tensor (which then does not advance the attn_v/ffn_down counters), and the fallback applies.
    """
    state = _State(
        preset=KQUANT_PRESETS.get(preset),
        n_layers=n_layers,
        n_expert=max(1, n_experts),
        n_gqa=n_head // n_head_kv if n_head_kv else 0,
        tied_embeddings=all(t.name != "output.weight" for t in tensors),
        n_attention_wv=sum(tensor_category(t.name) in ATTN_V_LIKE for t in tensors),
        llama_70b=llama_70b,
        output_tensor_type=overrides.output_tensor_type,
    )
    if n_layers < 1:
        raise QuantkitError(f"n_layers must be at least 1, got {n_layers}")
    if len({t.name for t in tensors}) != len(tensors):
        raise QuantkitError("tensor names must be unique")

    chosen: dict[str, Assignment] = {}
    for spec in sorted(tensors, key=file_order):
        kept = kept_reason(spec)
        if kept is not None:
            chosen[spec.name] = Assignment(KEEP, kept)
            continue
        category, manual = tensor_category(spec.name), overrides.match(spec.name)
        # per_layer_token_embd follows --token-embedding-type unless a --tensor-type pattern names it
        if overrides.token_embedding_type and category == "token_embd" and (
                manual is None or spec.name != "per_layer_token_embd.weight"):
            chosen[spec.name] = _exact(spec, overrides.token_embedding_type, "--token-embedding-type")
            continue
        if overrides.output_tensor_type and category == "output":
            chosen[spec.name] = _exact(spec, overrides.output_tensor_type, "--output-tensor-type")
            continue
        if manual is not None:
            type_name, rule = manual.type, manual.describe()
        else:
            type_name, rule = _preset_type(spec, state)
        chosen[spec.name] = fallback_type(type_name, spec.shape[-1], rule) or Assignment(type_name, rule)
    return {t.name: chosen[t.name] for t in tensors}


def _exact(spec: TensorSpec, type_name: str, option: str) -> Assignment:
    """A type llama.cpp applies with no row fallback: refused (llama.cpp aborts) where its block does not fit."""
    block = block_size(type_name)
    if spec.shape[-1] % block:
        raise QuantkitError(f"{option} {type_name}: {spec.name} has rows of {spec.shape[-1]} weights, not a "
                            f"multiple of its block of {block} (llama.cpp applies this type with no fallback)")
    return Assignment(type_name, option)


def preset_rules(preset: str) -> list[tuple[str, str]]:
    """(tensor pattern, type rule) rows describing ``preset`` (first match wins), for ``quantkit presets``."""
    p = KQUANT_PRESETS.get(preset)
    base, block = p.base, block_size(p.base)
    output = "Q8_0" if base == "Q8_0" else f"Q6_K; Q8_0 if its row is not a multiple of {block}"

    def rule(r: TypeRule | None, with_8_experts: str) -> str:
        text = r.describe(base) if r else base
        return text if text == with_8_experts else f"{text}; {with_8_experts} with exactly 8 experts"

    return [
        ("norms, routers (ffn_gate_inp), biases, 1-D", f"{KEEP}: kept as they are"),
        ("ffn_gate/up/down_shexp", "--shared-experts-type when given"),
        ("ffn_gate/up/down of dense blocks", "--dense-ffn-type when given"),
        ("token_embd.weight, output.weight", "--token-embedding-type, --output-tensor-type when given"),
        ("names a --tensor-type PATTERN is found in", "its type (the first PATTERN that matches)"),
        ("output.weight", output),
        ("token_embd.weight", f"{base}; as output.weight when embeddings are tied (no output.weight)"),
        ("attn_v, attn_qkv, attn_kv_b", rule(p.attn_v, "Q8_0")),
        ("attn_v, attn_qkv, attn_kv_b in a 70B Llama", "Q3_K and Q4_K raised to Q5_K (not with 8 experts)"),
        ("attn_k", rule(None, "Q8_0")),
        ("attn_output", rule(p.attn_output, p.attn_output_8_experts or base)),
        ("ffn_down, ffn_down_exps, ffn_down_shexp", p.ffn_down.describe(base) if p.ffn_down else base),
        ("other weights (2-D and 3-D)", base),
        (
            "then: rows not a multiple of the type's block",
            "Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; F16 if not a multiple of 32",
        ),
    ]
