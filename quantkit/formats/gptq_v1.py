"""GPTQ v1 checkpoints: ``quant_method: "gptq"``, ``checkpoint_format: "gptq"``.

The layout AutoGPTQ, GPTQModel (its default ``format="gptq"``), vLLM's ``gptq``/``gptq_marlin``
and ExLlama read. Per quantized linear ``M`` with weight ``[out, in]``, b bits (2, 3, 4 or 8)
and n_g groups (``in / g``, or 1 per channel):

    M.qweight  int32 [in * b / 32, out]   codes as unsigned u = q + 2^(b-1), packed along the INPUT dim
    M.qzeros   int32 [n_g, out * b / 32]  unsigned zero points minus one (z_u - 1), packed along out
    M.scales   fp16  [n_g, out]
    M.g_idx    int32 [in]                 group of each input column: c // g, or GPTQ's act-order map
    M.bias     kept as in the source checkpoint (float)

    W[r, c] = (u[c, r] - z_u[g_idx[c], r]) * scales[g_idx[c], r]      in fp16, z_u = stored + 1

Packing follows AutoGPTQ's ``QuantLinear.pack`` (``auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py``):
for b = 2, 4, 8 word k holds values ``k*32/b ...`` with value j at bits ``[b*j, b*j + b)``; for b = 3
32 values fill 3 words, value 10 straddling words 0/1 (bits 30-31, then bit 0) and value 21 words
1/2 (bit 31, then bits 0-1). Both are "value i starts at bit i*b, little-endian across words":
quantkit's dense layout (:mod:`quantkit.formats.packing`), applied to ``qweight`` along dim 0 and
to ``qzeros`` along dim 1. ``zeros -= 1`` before packing is the v1 off-by-one (readers add 1 back);
GPTQModel's ``gptq_v2`` format stores z_u itself (:func:`decode` reads both).

Mapping from quantkit's signed :class:`IntQuantized`: ``u = q + 2^(b-1)``; zero-point schemes have
``z_u = z + 2^(b-1)``; symmetric schemes (absmax, GPTQ ``symmetric``) have no zero point and get
``z_u = 2^(b-1)`` (GPTQ's own symmetric grid), which holds absmax codes of either range.
Per-tensor scales are written per channel (``group_size: -1``), which decodes identically.

Restrictions (``check_shape`` and ``encode`` raise a one-line error):
- bits 2, 3, 4 or 8;
- ``in * b`` and ``out * b`` multiples of 32 (whole int32 words: in and out multiples of 16, 32,
  8, 4 for b = 2, 3, 4, 8). AutoGPTQ's own ``QuantLinear`` allocates ``in // 32 * b`` rows, i.e.
  also wants ``in`` a multiple of 32; kernels add their own alignment rules;
- no unsigned zero point 0 (signed ``-2^(b-1)``): v1 would store -1, which is not a b-bit value
  (AutoGPTQ's pack() then corrupts the neighbouring zero points, readers decode ``2^b``);
- scales are stored as fp16. A bf16/fp32 scale is rounded to fp16, so the dequantized weight
  changes by that rounding (quantize with fp16 scales for an exact round trip; an fp16 overflow
  is an error).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from quantkit.errors import QuantkitError
from quantkit.formats.clients import GPTQMODEL, QUANTKIT_LOADER, TRANSFORMERS, VLLM_CPU, ClientNote, IntegerFacts
from quantkit.formats.compressed_tensors import (
    compact_targets,
    contiguous_g_idx,
    group_actorder,
    stored_group_size,
    validate_g_idx,
)
from quantkit.formats.output import OUTPUT_FORMATS, DirectoryFormat, WrittenWeights, refuse_kquants
from quantkit.formats.packing import pack_int32, unpack_int32
from quantkit.schemes.base import IntQuantized, Quantized, dequantize_codes
from quantkit.schemes.config import IntConfig
from quantkit.schemes.gptq import GptqConfig
from quantkit.version import __version__

if TYPE_CHECKING:
    from quantkit.plan import QuantPlan

QUANT_METHOD = "gptq"
CHECKPOINT_FORMAT = "gptq"
CHECKPOINT_FORMAT_V2 = "gptq_v2"
QUANTIZE_CONFIG_FILE = "quantize_config.json"
SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
BITS = (2, 3, 4, 8)
_FIELDS = ("bits", "group_size", "sym", "desc_act")  # what a `dynamic` override can change per module


def check_shape(name: str, shape: tuple[int, ...], bits: int) -> None:
    """One-line error when a ``[out, in]`` weight cannot be stored in GPTQ v1 at ``bits``."""
    if bits not in BITS:
        raise QuantkitError(f"{name}: GPTQ v1 stores 2, 3, 4 or 8 bits, not {bits}")
    out_features, in_features = shape
    for what, size in (("input", in_features), ("output", out_features)):
        if size * bits % 32:
            raise QuantkitError(
                f"{name}: GPTQ v1 packs whole int32 words, so its {what} size {size} times {bits} bits "
                "must be a multiple of 32"
            )


def encode(module: str, quantized: IntQuantized) -> dict[str, torch.Tensor]:
    """The GPTQ v1 tensors of one quantized linear (``qweight``, ``qzeros``, ``scales``, ``g_idx``)."""
    bits = quantized.config.bits
    in_features = quantized.shape[1]
    check_shape(module, quantized.shape, bits)
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = quantized.codes
    if codes.dtype != torch.int8 or int(codes.min()) < qmin or int(codes.max()) > qmax:
        raise ValueError(f"{module}: codes must be int8 in [{qmin}, {qmax}]")
    scale, zero = _per_group(quantized)
    low_zeros = int((zero == qmin).sum())
    if low_zeros:
        raise QuantkitError(
            f"{module}: {low_zeros} group(s) have the lowest zero point ({qmin}, unsigned 0), which GPTQ v1 "
            "cannot store (it writes zero - 1); use the compressed-tensors format or a symmetric scheme"
        )
    scales = scale.to(torch.float16)
    if not bool(torch.isfinite(scales).all()):
        raise QuantkitError(f"{module}: a scale overflows fp16, which GPTQ v1 stores scales in")
    n_groups = scale.shape[1]
    group_size = stored_group_size(quantized) if quantized.scale.ndim == 2 else in_features
    g_idx = (contiguous_g_idx(in_features, group_size) if quantized.g_idx is None
             else validate_g_idx(module, quantized.g_idx, n_groups, in_features, group_size))
    stored_zeros = (zero.to(torch.int16) - 1).to(torch.int8)  # signed view of z_u - 1
    return {
        f"{module}.qweight": pack_int32(codes, bits, dim=1).T.contiguous(),
        f"{module}.qzeros": pack_int32(stored_zeros.T.contiguous(), bits, dim=1),
        f"{module}.scales": scales.T.contiguous(),
        f"{module}.g_idx": g_idx,
    }


def decode(tensors: dict[str, torch.Tensor], bits: int, checkpoint_format: str = CHECKPOINT_FORMAT) -> torch.Tensor:
    """The dequantized weight ``[out, in]`` (in the scales' dtype) from one module's tensors.

    ``tensors`` are keyed without the module prefix (``qweight``, ``qzeros``, ``scales``, optional
    ``g_idx``: contiguous groups when absent). ``checkpoint_format`` ``"gptq_v2"`` reads zero points
    stored without v1's minus one.
    """
    if checkpoint_format not in (CHECKPOINT_FORMAT, CHECKPOINT_FORMAT_V2):
        raise QuantkitError(f"unsupported GPTQ checkpoint_format {checkpoint_format!r} (quantkit reads gptq, gptq_v2)")
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    if qweight.ndim != 2 or qweight.shape[0] * 32 % bits:
        raise QuantkitError(f"GPTQ qweight of shape {list(qweight.shape)} does not hold whole {bits}-bit rows")
    in_features, out_features = qweight.shape[0] * 32 // bits, qweight.shape[1]
    n_groups = scales.shape[0]
    if scales.shape != (n_groups, out_features) or qzeros.shape != (n_groups, out_features * bits // 32):
        raise QuantkitError(
            f"GPTQ tensors disagree: qweight {list(qweight.shape)}, qzeros {list(qzeros.shape)}, "
            f"scales {list(scales.shape)} at {bits} bits"
        )
    codes = unpack_int32(qweight, bits, (in_features, out_features), dim=0).T  # signed: u - 2^(b-1)
    stored = unpack_int32(qzeros, bits, (n_groups, out_features)).to(torch.int16)
    zero = (stored + (1 if checkpoint_format == CHECKPOINT_FORMAT else 0)).T  # signed: z_u - 2^(b-1)
    g_idx = tensors.get("g_idx")
    if g_idx is None:
        if in_features % n_groups:
            raise QuantkitError(f"GPTQ tensors without g_idx: {n_groups} groups do not divide {in_features} columns")
        g_idx = contiguous_g_idx(in_features, in_features // n_groups)
    return dequantize_codes(codes, scales.T, zero, None, g_idx)


def _per_group(quantized: IntQuantized) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and signed zero point (int16), both ``[out, n_groups]``; per-tensor becomes per-channel."""
    out_features = quantized.shape[0]
    scale = quantized.scale
    if scale.ndim == 1:
        scale = scale.reshape(1, 1).expand(out_features, 1)
    zero_point = quantized.zero_point
    if zero_point is None:
        zero = torch.zeros(scale.shape, dtype=torch.int16)  # z_u = 2^(b-1): the symmetric grid
    else:
        zero = zero_point.to(torch.int16).reshape(-1, 1).expand(out_features, 1) if zero_point.ndim == 1 \
            else zero_point.to(torch.int16)
    return scale, zero


def module_key(config: IntConfig) -> tuple[int, int, bool, bool]:
    """``(bits, group_size, sym, desc_act)`` of one scheme, as GPTQ configs spell them.

    ``group_size`` is -1 per channel (and per tensor, written per channel). ``desc_act`` is set
    when the groups are not contiguous (act-order without static groups), which is what tells
    loaders to honour ``g_idx``; act-order with static groups has contiguous groups.
    """
    group_size = config.group_size if config.granularity == "group" and config.group_size else -1
    return (config.bits, group_size, not config.writes_zero_points, group_actorder(config))


def quantization_config(
    assignments: dict[str, IntConfig], float_modules: list[str], *, true_sequential: bool = True
) -> dict[str, Any]:
    """``quantization_config`` for ``config.json`` (also the content of ``quantize_config.json``).

    GPTQ configs hold one scheme; the most common one becomes the base and modules with another
    get a ``dynamic`` override (``"+:regex": {"bits": ..., ...}``, GPTQModel's and vLLM's per-module
    syntax, first ``re.match`` wins). Linears left in float get a negative ``"-:regex": {}``
    entry, which GPTQModel and vLLM skip. ``damp_percent`` and ``static_groups`` come from the base
    scheme; ``true_sequential`` is metadata only.
    """
    if not assignments:
        raise ValueError("a GPTQ quantization_config needs at least one quantized module")
    for module, config in assignments.items():
        if config.bits not in BITS:
            raise QuantkitError(f"{module}: GPTQ v1 stores 2, 3, 4 or 8 bits, not {config.bits}")
    keys = {module: module_key(config) for module, config in sorted(assignments.items())}
    counts = Counter(keys.values())
    base = max(counts, key=lambda key: counts[key])  # ties: the first in module-name order
    representative = assignments[next(m for m, key in keys.items() if key == base)]
    solver = representative if isinstance(representative, GptqConfig) else GptqConfig("gptq")  # its defaults
    universe = list(assignments) + list(float_modules)
    dynamic: dict[str, dict[str, Any]] = {}
    for target in compact_targets(float_modules, universe) if float_modules else []:
        dynamic["-:" + target.removeprefix("re:")] = {}
    for key in sorted(set(counts) - {base}):
        overrides = {name: value for name, value, default in zip(_FIELDS, key, base, strict=True) if value != default}
        for target in compact_targets([m for m, k in keys.items() if k == key], universe):
            dynamic["+:" + target.removeprefix("re:")] = dict(overrides)
    bits, group_size, sym, desc_act = base
    result: dict[str, Any] = {
        "quant_method": QUANT_METHOD,
        "checkpoint_format": CHECKPOINT_FORMAT,
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "static_groups": solver.static_groups,
        "damp_percent": solver.damp,
        "true_sequential": true_sequential,
        "lm_head": "lm_head" in assignments,
        "pack_dtype": "int32",
    }
    if dynamic:
        result["dynamic"] = dynamic
    result["meta"] = {"quantizer": [f"quantkit:{__version__}"]}
    return result


def quantize_config_json(quant_config: dict[str, Any]) -> dict[str, Any]:
    """Content of ``quantize_config.json``: the same dict as config.json's ``quantization_config``.

    AutoGPTQ, GPTQModel and vLLM read this file when config.json lacks ``quantization_config``.
    """
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in quant_config.items()}


def module_args(quant_config: dict[str, Any], module: str) -> dict[str, Any] | None:
    """``bits``, ``group_size``, ``sym``, ``desc_act`` of ``module`` after ``dynamic`` overrides; None if skipped."""
    args = {name: quant_config.get(name) for name in _FIELDS}
    if args["bits"] is None:
        raise QuantkitError("GPTQ quantization_config lacks bits")
    for pattern, overrides in (quant_config.get("dynamic") or {}).items():
        if pattern.startswith("-:"):
            if re.match(pattern[2:], module):
                return None
        elif re.match(pattern.removeprefix("+:"), module):
            args.update({k: v for k, v in (overrides or {}).items() if k in args})
            break
    return args


def checkpoint_format(quant_config: dict[str, Any]) -> str:
    """The checkpoint format a GPTQ config declares (``checkpoint_format``, else ``format``; default v1)."""
    return str(quant_config.get("checkpoint_format") or quant_config.get("format") or CHECKPOINT_FORMAT).lower()


class GptqV1Format(DirectoryFormat):
    """GPTQ v1 (``qweight``/``qzeros``/``scales``/``g_idx``) for GPTQModel, vLLM and ExLlama; GPTQ weights only."""

    name = "gptq-v1"
    scale_dtype = torch.float16  # v1 stores fp16 scales: GPTQ solves against the rounded ones

    def check(self, plan: QuantPlan) -> None:
        refuse_kquants(plan, self.name)
        for item in plan.tensors:
            if not isinstance(item.scheme, IntConfig):
                continue
            if not isinstance(item.scheme, GptqConfig) or item.scheme.activations != "none":
                raise QuantkitError(f"--format gptq-v1 holds GPTQ weights only; {item.name} is "
                                    f"{item.scheme.describe()}")
            check_shape(item.name, item.shape, item.scheme.bits)

    def encode(self, module: str, quantized: Quantized) -> dict[str, torch.Tensor]:
        assert isinstance(quantized, IntQuantized), "check() admits GPTQ weights and casts only"
        return encode(module, quantized)

    def finish(self, directory: Path, config: dict[str, Any], written: WrittenWeights) -> None:
        if not written.integer:
            return
        config["quantization_config"] = quantization_config(written.integer, written.float_linears,
                                                            true_sequential=written.true_sequential)
        side_file = json.dumps(quantize_config_json(config["quantization_config"]), indent=2) + "\n"
        (directory / QUANTIZE_CONFIG_FILE).write_text(side_file)

    def clients(self, plan: QuantPlan) -> list[ClientNote]:
        """GPTQModel loads symmetric v1 only (asymmetric v1 only from its own quantizer); transformers needs optimum."""
        gptqmodel = (ClientNote(GPTQMODEL, False, "refuses asymmetric v1 not written by its own quantizer (>= 0.9.0)")
                     if IntegerFacts.of(plan).asymmetric() else ClientNote(GPTQMODEL, True, "logits equal quantkit's"))
        return [ClientNote(QUANTKIT_LOADER, True), gptqmodel,
                ClientNote(TRANSFORMERS, None, "needs optimum and GPTQModel; not run"),
                ClientNote(VLLM_CPU, None, "not run")]


OUTPUT_FORMATS.add(GptqV1Format.name, GptqV1Format())
