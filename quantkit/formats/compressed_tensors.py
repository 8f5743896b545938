"""The compressed-tensors formats (vLLM's native checkpoints; transformers loads them).

Each module's format is the one compressed-tensors' own format inference gives its scheme
(``infer_module_format``): ``int-quantized`` when the inputs are quantized too (W8A8: integer
weights with INT8 activations), ``pack-quantized`` for weight-only schemes. vLLM picks its kernel
from the format: it runs ``int-quantized`` as W8A8 and ``pack-quantized`` as weight-only (WNA16).
The config's ``format`` is the modules' one format, or ``mixed-precision`` when both occur.

``pack-quantized``, per quantized linear ``M`` (module name, e.g. ``model.layers.0.self_attn.q_proj``):

    M.weight_packed      int32 [out, ceil(in * b / 32)]     codes, see packing.py
    M.weight_scale       float [out, in / g] | [out, 1] | [1]
    M.weight_zero_point  int32 [ceil(out * b / 32), in / g]  asymmetric only (packed along dim 0)
    M.weight_shape       int64 [2]                           (out, in)
    M.weight_g_idx       int32 [in]                          act-order groups only (see below)
    M.input_scale        float [1]                           static INT8 activations only

``int-quantized`` (codes stored unpacked, as compressed-tensors' ``IntQuantizationCompressor``)::

    M.weight             int8  [out, in]                     signed codes
    M.weight_scale       float [out, in / g] | [out, 1] | [1]
    M.weight_zero_point  int8  like weight_scale             asymmetric only
    M.input_scale        float [1]                           static INT8 activations only

``config.json`` gains ``quantization_config`` with one config group per distinct scheme;
each group's ``targets`` are anchored ``re:`` patterns that match exactly its modules, and
``input_activations`` says whether inputs are quantized too (INT8, static per tensor or
dynamic per token, see :mod:`quantkit.schemes.activations`).

Act-order: GPTQ with act-order and without static groups gives column ``c`` the scale column
``g_idx[c]`` (groups are not contiguous, each still holds ``g`` columns). The group's weights
args then carry ``"actorder": "group"`` and each module a ``weight_g_idx``; readers apply it only
under that setting (compressed-tensors <= 0.18 ``PackedQuantizationCompressor``, vLLM's WNA16
``has_g_idx = actorder == ActivationOrdering.GROUP``). compressed-tensors <= 0.18 sorts the
columns by ``g_idx`` (``argsort``), applies contiguous groups and undoes the sort, which equals
``W[:, c] = (q[:, c] - z[:, g_idx[c]]) * s[:, g_idx[c]]``. compressed-tensors 0.19 removed
``actorder: "group"``: its ``QuantizationArgs`` rejects it, so transformers (or vLLM) running with
it cannot load such a checkpoint; quantkit's loader reads it. Act-order with contiguous groups
(static groups, or per channel) needs no ``g_idx`` and is written as ``"actorder": "weight"``
(calibration-only metadata that every version accepts). ``int-quantized`` has no ``g_idx``, so group
act-order with INT8 activations is refused.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from quantkit.errors import QuantkitError
from quantkit.formats.clients import (
    COMPRESSED_TENSORS,
    QUANTKIT_LOADER,
    TRANSFORMERS,
    VLLM_CPU,
    VLLM_WNA16_OUT_MULTIPLE,
    ClientNote,
    IntegerFacts,
)
from quantkit.formats.output import OUTPUT_FORMATS, DirectoryFormat, WrittenWeights, refuse_kquants
from quantkit.formats.packing import pack_int32, unpack_int32
from quantkit.schemes.base import IntQuantized, Quantized, dequantize_codes
from quantkit.schemes.config import ACTIVATION_BITS, IntConfig
from quantkit.schemes.gptq import GptqConfig

if TYPE_CHECKING:
    from quantkit.plan import QuantPlan

FORMAT = "pack-quantized"
INT_FORMAT = "int-quantized"
MIXED_FORMAT = "mixed-precision"
FORMATS = (FORMAT, INT_FORMAT, MIXED_FORMAT)
SUFFIXES: tuple[str, ...] = (
    "weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx", "input_scale")
INT_SUFFIXES: tuple[str, ...] = ("weight", "weight_scale", "weight_zero_point", "input_scale")


def module_format(config: IntConfig) -> str:
    """The format compressed-tensors infers for ``config``: int-quantized with INT8 inputs, else pack-quantized."""
    return INT_FORMAT if config.activations != "none" else FORMAT


def encode(module: str, quantized: IntQuantized) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized linear, in its :func:`module_format`."""
    if module_format(quantized.config) == INT_FORMAT:
        return _encode_unpacked(module, quantized)
    bits = quantized.config.bits
    out = {
        f"{module}.weight_packed": pack_int32(quantized.codes, bits),
        f"{module}.weight_scale": quantized.scale.contiguous(),
        f"{module}.weight_shape": torch.tensor(quantized.shape, dtype=torch.int64),
    }
    if quantized.zero_point is not None:
        zero_point = quantized.zero_point
        out[f"{module}.weight_zero_point"] = (
            zero_point.contiguous() if zero_point.ndim == 1 else pack_int32(zero_point, bits, dim=0)
        )
    g_idx = _checked_g_idx(module, quantized)
    if g_idx is not None:
        out[f"{module}.weight_g_idx"] = g_idx
    return out


def _encode_unpacked(module: str, quantized: IntQuantized) -> dict[str, torch.Tensor]:
    """``int-quantized``: int8 codes as they are, the scale, and the int8 zero point when asymmetric."""
    if _checked_g_idx(module, quantized) is not None:
        raise ValueError(f"{module}: int-quantized (INT8 activations) cannot store act-order groups (g_idx)")
    out = {f"{module}.weight": quantized.codes.contiguous(), f"{module}.weight_scale": quantized.scale.contiguous()}
    if quantized.zero_point is not None:
        out[f"{module}.weight_zero_point"] = quantized.zero_point.to(torch.int8).contiguous()
    return out


def group_actorder(config: IntConfig) -> bool:
    """Whether ``config`` makes non-contiguous groups (GPTQ act-order without static groups)."""
    return (isinstance(config, GptqConfig) and config.act_order and config.granularity == "group"
            and not config.static_groups)


def contiguous_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    """The group map of contiguous groups: column ``c`` is in group ``c // group_size`` (the last may be shorter)."""
    return torch.arange(in_features, dtype=torch.int32) // group_size


def stored_group_size(quantized: IntQuantized) -> int:
    """Columns per group of a grouped ``quantized`` (``scale`` ``[out, n_groups]``): the scheme's group size,
    whose last group may be shorter, or ``in / n_groups`` when the config has none (per channel, per tensor)."""
    config, in_features = quantized.config, quantized.shape[1]
    if config.granularity == "group" and config.group_size:
        return config.group_size
    return in_features // quantized.scale.shape[1]


def _checked_g_idx(module: str, quantized: IntQuantized) -> torch.Tensor | None:
    """The ``weight_g_idx`` to write (int32), or None when the groups are contiguous.

    Written when the scheme has group act-order (:func:`group_actorder`; contiguous when the
    quantizer gave no ``g_idx``) or when ``quantized.g_idx`` is not contiguous. Readers apply it only
    under ``"actorder": "group"``, so such a module must sit in a config group made from a scheme
    with group act-order (the caller's GPTQ ``SchemeConfig``), as :func:`quantization_config` does.
    """
    config, g_idx = quantized.config, quantized.g_idx
    in_features = quantized.shape[1]
    if quantized.scale.ndim != 2 or (g_idx is None and not group_actorder(config)):
        return None
    n_groups = quantized.scale.shape[1]
    contiguous = contiguous_g_idx(in_features, stored_group_size(quantized))
    if g_idx is None:
        return contiguous
    g_idx = validate_g_idx(module, g_idx, n_groups, in_features, stored_group_size(quantized))
    return g_idx if group_actorder(config) or not torch.equal(g_idx, contiguous) else None


def validate_g_idx(
    module: str, g_idx: torch.Tensor, n_groups: int, in_features: int, group_size: int | None = None
) -> torch.Tensor:
    """``g_idx`` as int32 after checking it maps ``in_features`` columns onto ``n_groups`` groups of ``group_size``.

    Readers sort the columns by ``g_idx`` and cut contiguous groups, so every group needs ``group_size``
    columns but the last, which has the rest (GPTQ's act-order map ``g_idx[perm[i]] = i // group_size``
    has that). Without ``group_size`` the groups are equal (``in / n_groups``).
    """
    g_idx = g_idx.to(torch.int32).contiguous()
    size = group_size or in_features // n_groups
    sizes = torch.full((n_groups,), size)
    sizes[-1] = in_features - (n_groups - 1) * size
    ok = g_idx.shape == (in_features,) and bool((g_idx >= 0).all()) and bool((g_idx < n_groups).all())
    if not ok or bool((torch.bincount(g_idx.to(torch.long), minlength=n_groups) != sizes).any()):
        last = "" if int(sizes[-1]) == size else f" (the last {int(sizes[-1])})"
        raise ValueError(f"{module}: g_idx must give each of the {n_groups} groups exactly {size} columns{last}")
    return g_idx


def decode(tensors: dict[str, torch.Tensor], args: dict[str, Any]) -> torch.Tensor:
    """The dequantized weight from one module's tensors (keys without the module prefix), either format."""
    if "weight_packed" not in tensors:  # int-quantized: int8 codes [out, in]
        group_size = args.get("group_size")
        return dequantize_codes(tensors["weight"], tensors["weight_scale"], tensors.get("weight_zero_point"),
                                int(group_size) if group_size else None)
    bits = int(args["num_bits"])
    shape_tensor = tensors["weight_shape"]
    shape = (int(shape_tensor[0]), int(shape_tensor[1]))
    codes = unpack_int32(tensors["weight_packed"], bits, shape)
    scale = tensors["weight_scale"]
    zero_point = tensors.get("weight_zero_point")
    if zero_point is not None and zero_point.dtype == torch.int32 and scale.ndim == 2:
        zero_point = unpack_int32(zero_point, bits, (shape[0], scale.shape[1]), dim=0)
    group_size = args.get("group_size")
    g_idx = tensors.get("weight_g_idx")
    if g_idx is not None and (scale.ndim != 2 or bool((g_idx == -1).any())):  # -1: never set (column order)
        g_idx = None
    return dequantize_codes(codes, scale, zero_point, int(group_size) if group_size else None, g_idx)


def weight_args(config: IntConfig) -> dict[str, Any]:
    """compressed-tensors ``QuantizationArgs`` for one scheme."""
    args: dict[str, Any] = {
        "num_bits": config.bits,
        "type": "int",
        "symmetric": not config.writes_zero_points,
        "group_size": config.group_size if config.granularity == "group" else None,
        "strategy": config.granularity,
        "dynamic": False,
        "observer": "minmax",
    }
    if isinstance(config, GptqConfig) and config.act_order:  # absent otherwise, as compressed-tensors serializes None
        args["actorder"] = "group" if group_actorder(config) else "weight"
    return args


def input_activation_args(config: IntConfig) -> dict[str, Any] | None:
    """compressed-tensors ``QuantizationArgs`` for the inputs (None for weight-only schemes)."""
    if config.activations == "none":
        return None
    static = config.activations == "static"
    return {
        "num_bits": ACTIVATION_BITS,
        "type": "int",
        "symmetric": True,
        "group_size": None,
        "strategy": "tensor" if static else "token",
        "dynamic": not static,
        "observer": "minmax" if static else None,
    }


def quantization_config(assignments: dict[str, IntConfig], float_modules: list[str]) -> dict[str, Any]:
    """``quantization_config`` for ``config.json``: module name -> scheme, plus modules left float."""
    by_args: dict[str, list[str]] = defaultdict(list)
    for module, config in assignments.items():
        key = json.dumps([weight_args(config), input_activation_args(config), module_format(config)], sort_keys=True)
        by_args[key].append(module)
    all_names = list(assignments) + list(float_modules)
    groups = {}
    for i, (key, modules) in enumerate(sorted(by_args.items(), key=lambda kv: kv[1][0])):
        weights, inputs, group_format = json.loads(key)
        groups[f"group_{i}"] = {
            "targets": compact_targets(modules, all_names),
            "weights": weights,
            "input_activations": inputs,
            "output_activations": None,
            "format": group_format,
        }
    formats = {group["format"] for group in groups.values()}
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else MIXED_FORMAT,  # as compressed-tensors flattens them
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": compact_targets(float_modules, all_names) if float_modules else [],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def compact_targets(selected: list[str], universe: list[str]) -> list[str]:
    """Anchored ``re:`` patterns matching exactly ``selected`` among ``universe``.

    Numeric path components become ``\\d+`` where every name of that shape is selected
    (e.g. all experts of all layers); otherwise the exact name is kept.
    """
    def shape(name: str) -> str:
        return re.sub(r"(?<=\.)\d+(?=\.|$)", "#", name)

    chosen = set(selected)
    by_shape: dict[str, list[str]] = defaultdict(list)
    for name in universe:
        by_shape[shape(name)].append(name)
    targets: list[str] = []
    for name in sorted(chosen):
        pattern_shape = shape(name)
        if all(n in chosen for n in by_shape[pattern_shape]):
            target = "re:^" + re.escape(pattern_shape).replace("\\#", "#").replace("#", r"\d+") + "$"
        else:
            target = "re:^" + re.escape(name) + "$"
        if target not in targets:
            targets.append(target)
    return targets


def module_args(quant_config: dict[str, Any]) -> list[tuple[list[str], dict[str, Any]]]:
    """(targets, group) for each config group of a ``quantization_config`` that quantizes weights."""
    if quant_config.get("format") not in FORMATS and not any(
        g.get("format") in FORMATS for g in quant_config.get("config_groups", {}).values()
    ):
        raise QuantkitError(f"unsupported compressed-tensors format {quant_config.get('format')!r}")
    groups = quant_config.get("config_groups") or {}
    return [(list(g.get("targets", [])), dict(g)) for g in groups.values() if g.get("weights")]


def quantized_modules(tensor_names: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """Module -> the suffixes of its format's tensors: ``weight_packed`` marks pack-quantized, an int8
    ``weight`` beside a ``weight_scale`` (and no ``weight_packed``) int-quantized."""
    names = set(tensor_names)
    modules = {n.removesuffix(".weight_packed"): SUFFIXES for n in names if n.endswith(".weight_packed")}
    for name in names:
        module = name.removesuffix(".weight_scale")
        if name.endswith(".weight_scale") and module not in modules and f"{module}.weight" in names:
            modules[module] = INT_SUFFIXES
    return modules


def args_for(module: str, groups: list[tuple[list[str], dict[str, Any]]], kind: str = "weights") -> dict[str, Any]:
    """The ``kind`` args (weights, or input_activations: possibly empty) of the group targeting ``module``."""
    for targets, group in groups:
        if any(t.startswith("re:") and re.match(t[3:], module) for t in targets):
            return dict(group.get(kind) or {})
    for targets, group in groups:  # class-name targets such as "Linear" match any linear
        if any(not t.startswith("re:") for t in targets):
            return dict(group.get(kind) or {})
    raise QuantkitError(f"no quantization_config group targets {module}")


def clients(plan: QuantPlan) -> list[ClientNote]:
    """The engines that load this plan's compressed-tensors output, with the limits measured for them."""
    facts = IntegerFacts.of(plan)
    act_order = any(isinstance(t.scheme, IntConfig) and group_actorder(t.scheme) for t in facts.items)
    return [ClientNote(QUANTKIT_LOADER, True),
            ClientNote(COMPRESSED_TENSORS, False, "refuses actorder group (g_idx)") if act_order
            else ClientNote(COMPRESSED_TENSORS, True, "decodes to exactly quantkit's weights"),
            _transformers(facts, act_order), _vllm(facts, act_order)]


def _transformers(facts: IntegerFacts, act_order: bool) -> ClientNote:
    if facts.asymmetric():
        return ClientNote(TRANSFORMERS, False, "zero points: its integration drops them for fused experts and "
                                               "allocates them unpacked for dense linears")
    if facts.routed(facts.w8a8):
        return ClientNote(TRANSFORMERS, False, "W8A8 routed experts: it decompresses only packed or FP8 experts")
    if act_order:
        return ClientNote(TRANSFORMERS, False, "refuses actorder group (g_idx)")
    if facts.partial_groups():
        return ClientNote(TRANSFORMERS, False, "partial last group: compressed-tensors' forward pass raises")
    return ClientNote(TRANSFORMERS, True)


def _vllm(facts: IntegerFacts, act_order: bool) -> ClientNote:
    w8a8, weight_only = facts.w8a8, facts.weight_only
    if facts.routed(w8a8):
        return ClientNote(VLLM_CPU, False, "W8A8 routed experts: no Int8 MoE backend without AMX")
    if facts.routed(weight_only):
        return ClientNote(VLLM_CPU, False, "quantized routed experts: no WNA16 MoE backend without AMX")
    if facts.grouped(w8a8) or facts.asymmetric(w8a8):
        return ClientNote(VLLM_CPU, False, "W8A8 with group scales or zero points: no vLLM scheme")
    uneven = facts.outputs_not_multiple(weight_only, VLLM_WNA16_OUT_MULTIPLE)
    if uneven:
        return ClientNote(VLLM_CPU, False, f"WNA16 needs output sizes divisible by {VLLM_WNA16_OUT_MULTIPLE}: "
                                           f"{uneven[0]} is not")
    untried = [reason for reason, present in (
        ("zero points", facts.asymmetric(weight_only)), ("partial groups", facts.partial_groups()),
        ("act-order g_idx", act_order), ("static INT8 inputs", facts.static_activations()),
        ("weight-only bits other than 4", facts.bits(weight_only) - {4}),
        ("W8A8 weight bits other than 8", facts.bits(w8a8) - {8})) if present]
    if untried:
        return ClientNote(VLLM_CPU, None, f"not run: {', '.join(untried)}")
    if weight_only:
        return ClientNote(VLLM_CPU, True, "weight-only (WNA16) runs in bfloat16 only")
    return ClientNote(VLLM_CPU, True, "INT8 kernels (dynamic per-token inputs)" if w8a8 else None)


class CompressedTensorsFormat(DirectoryFormat):
    """compressed-tensors ``pack-quantized`` / ``int-quantized``, which plain transformers and vLLM load."""

    name = "compressed-tensors"

    def check(self, plan: QuantPlan) -> None:
        refuse_kquants(plan, self.name)
        for item in plan.tensors:
            if isinstance(item.scheme, IntConfig) and item.scheme.activations != "none" and group_actorder(
                    item.scheme):
                raise QuantkitError(f"{item.name}: INT8 activations are written as int-quantized, which has no "
                                    "act-order groups (g_idx): use --static-groups or per-channel scales")

    def encode(self, module: str, quantized: Quantized) -> dict[str, torch.Tensor]:
        assert isinstance(quantized, IntQuantized), "check() admits integer schemes and casts only"
        return encode(module, quantized)

    def finish(self, directory: Path, config: dict[str, Any], written: WrittenWeights) -> None:
        if written.integer:
            config["quantization_config"] = quantization_config(written.integer, written.float_linears)

    def clients(self, plan: QuantPlan) -> list[ClientNote]:
        return clients(plan)


OUTPUT_FORMATS.add(CompressedTensorsFormat.name, CompressedTensorsFormat())
