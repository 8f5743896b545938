"""The Python API the CLI calls: :func:`inspect`, :func:`quantize` and :func:`calibrate`."""

from __future__ import annotations

import json
import resource
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from quantkit.calib.artifact import Calibration, check_model, load_calibration
from quantkit.calib.run import CalibrationSettings, calibrate, settings_of, windows_for
from quantkit.errors import QuantkitError
from quantkit.formats import compressed_tensors, gptq_v1
from quantkit.formats.sharded import ShardedWriter, atomic_directory
from quantkit.gptq.sequential import LayerResult, gptq_layers
from quantkit.model.archs.base import LINEAR_ROLES
from quantkit.model.checkpoint import Checkpoint
from quantkit.pipeline import LayerPipeline
from quantkit.plan import QuantPlan, TensorPlan, make_plan
from quantkit.progress import StepProgress, track
from quantkit.recipe import Recipe
from quantkit.report.report import QuantReport, TensorRecord
from quantkit.schemes import SCHEMES, IntQuantized, Quantized, SchemeConfig
from quantkit.schemes.activations import static_input_scale
from quantkit.schemes.base import estimate_bits_per_weight, storage_dtype

__all__ = ["CalibrationSettings", "calibrate", "expert_coverage", "inspect", "quantize"]
DEFAULT_MAX_SHARD_BYTES = 2 * 10**9  # the CLI's --max-shard-size 2GB


def inspect(model: str | Path | None, recipe: Recipe) -> dict[str, Any]:
    """Architecture, parameters by role, expert coverage and what ``recipe`` would do."""
    checkpoint = Checkpoint.open(model)
    plan = make_plan(checkpoint, recipe)
    params: dict[str, int] = defaultdict(int)
    actions: dict[str, dict[str, Any]] = {}
    for t in plan.tensors:
        numel = _numel(t.shape)
        params[t.role.value] += numel
        key = f"{t.role.value} / {t.scheme.describe() if t.scheme else 'float (unchanged)'}"
        row = actions.setdefault(key, {"tensors": 0, "params": 0, "bits": 0.0})
        row["tensors"] += 1
        row["params"] += numel
        row["bits"] += numel * _planned_bits(t)
    total_params = sum(params.values())
    total_bits = sum(r["bits"] for r in actions.values())
    for row in actions.values():
        row["bits_per_weight"] = row.pop("bits") / row["params"] if row["params"] else 0.0
    return {
        "model": str(checkpoint.path),
        "architecture": plan.arch.summary(checkpoint.config),
        "params": {"total": total_params, **dict(sorted(params.items()))},
        "experts": expert_coverage(plan),
        "recipe": recipe.to_dict(),
        "plan": actions,
        "estimated_size_mb": total_bits / 8 / 2**20,
        "original_size_mb": checkpoint.total_bytes() / 2**20,
        "unexpected_tensors": plan.unexpected,
    }


def expert_coverage(plan: QuantPlan) -> dict[str, Any]:
    """Routed experts found per MoE layer vs. the config's count (every expert must be present)."""
    expected = plan.arch.num_experts(plan.checkpoint.config)
    if not expected or plan.arch.experts is None:
        return {}
    pattern = plan.arch.experts.per_expert_pattern
    found: dict[str, set[int]] = defaultdict(set)
    for t in plan.tensors:
        match = pattern.match(t.name)
        if match:
            found[match["layer"]].add(int(match["expert"]))
    return {
        "expected_per_layer": expected,
        "layers_with_experts": len(found),
        "complete": all(len(v) == expected for v in found.values())
        and len(found) == len(plan.arch.moe_layers(plan.checkpoint.config)),
    }


def quantize(
    model: str | Path | None,
    recipe: Recipe,
    out: str | Path,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    seed: int = 0,
    calibration: str | Path | None = None,
    data: CalibrationSettings | None = None,
    output_format: str = "compressed-tensors",
    max_memory: int | None = None,
    command: list[str] | None = None,
    show_progress: bool = True,
    console: Console | None = None,
) -> QuantReport:
    """Quantize ``model`` with ``recipe`` into ``out`` (compressed-tensors pack-quantized), atomically.

    ``calibration`` is a directory from ``quantkit calibrate`` on the same model; schemes with
    static activations take their input scales from it. GPTQ runs on the windows ``data``
    describes, or else on the calibration's own windows (same data, samples, length and seed).
    ``output_format`` is ``compressed-tensors`` (pack-quantized) or ``gptq-v1`` (GPTQ methods only);
    ``max_memory`` (bytes) bounds how many experts GPTQ solves at once.
    """
    started = time.perf_counter()
    out = Path(out)
    torch.manual_seed(seed)
    checkpoint = Checkpoint.open(model)
    plan = make_plan(checkpoint, recipe)
    calib = _load_calibration(calibration, checkpoint, plan)
    report = QuantReport(
        model=str(checkpoint.path),
        model_type=checkpoint.model_type,
        recipe=recipe.to_dict(),
        command=command or [],
        seed=seed,
        output=str(out),
    )
    if calib is not None:
        report.calibration = {key: calib.metadata.get(key) for key in
                              ("dataset", "num_samples", "seq_len", "tokens", "all_experts", "min_expert_tokens")}
        report.calibration["path"] = str(calibration)
        report.calibration["flagged_experts"] = len(calib.starved())
    if plan.unexpected:
        report.notes.append(
            f"{len(plan.unexpected)} tensor(s) unknown to config.json copied unchanged, e.g. {plan.unexpected[0]}"
        )
    assignments: dict[str, SchemeConfig] = {}
    float_modules: list[str] = []
    hessian_items = {t.name: t for t in plan.tensors if t.scheme is not None and _needs_hessian(t.scheme)}
    gptq_data = _gptq_data(hessian_items, data, calib)
    encode = _encoder(output_format, plan)

    def finish(item: TensorPlan, weight: torch.Tensor, record: TensorRecord) -> None:
        if item.scheme is not None and item.scheme.activations == "static":
            assert calib is not None
            _write_input_scale(item, weight, calib, plan, writer, record)
        report.tensors.append(record)
        if item.scheme is not None and SCHEMES.get(item.scheme.method).integer:
            assignments[item.module] = item.scheme
        elif item.name.endswith(".weight") and item.role in LINEAR_ROLES:
            float_modules.append(item.module)

    with atomic_directory(out, overwrite) as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes)
        if gptq_data is not None:
            scale_dtype = torch.float16 if output_format == "gptq-v1" else None  # v1 stores fp16 scales
            layers = _gptq_layers(checkpoint, hessian_items, gptq_data, scale_dtype, max_memory, show_progress, console)
            for layer in layers:
                report.gptq_layers.append({"layer": layer.index, "seconds": round(layer.seconds, 3),
                                           "weights": len(layer.weights)})
                for result in layer.weights:
                    item = hessian_items[result.name]
                    record = _write_tensor(item, result.original, writer, encode, result.quantized)
                    record.gptq = {"loss": result.loss, "damp": result.damp, "retries": result.retries,
                                   "tokens": result.tokens, "fallback": result.fallback}
                    finish(item, result.original, record)
            report.gptq = {"samples": gptq_data.num_samples, "seq_len": gptq_data.seq_len,
                           "dataset": gptq_data.dataset or "bundled default", "all_experts": gptq_data.all_experts,
                           "min_expert_tokens": gptq_data.min_expert_tokens}
        for source in track(plan.sources, "quantizing", show_progress, console):
            if all(item.name in hessian_items for item in source.outputs):
                continue
            tensor = checkpoint.get(source.source)
            views = plan.arch.per_expert_view(source.source, tensor)
            for item in source.outputs:
                if item.name in hessian_items:
                    continue
                weight = views[item.name]
                _check_finite(item.name, weight, checkpoint)
                finish(item, weight, _write_tensor(item, weight, writer, encode))
            del tensor, views
        writer.finish()
        config = dict(checkpoint.config)
        if assignments and output_format == "gptq-v1":
            config["quantization_config"] = gptq_v1.quantization_config(assignments, float_modules)
            quantize_config = gptq_v1.quantize_config_json(config["quantization_config"])
            (tmp / gptq_v1.QUANTIZE_CONFIG_FILE).write_text(json.dumps(quantize_config, indent=2) + "\n")
        elif assignments:
            config["quantization_config"] = compressed_tensors.quantization_config(assignments, float_modules)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for file in checkpoint.other_files():
            shutil.copy2(file, tmp / file.name)
        fallbacks = sum(1 for t in report.tensors if t.input_fallback)
        if fallbacks:
            report.notes.append(f"{fallbacks} starved expert weight(s) use a fallback input range (see input_fallback)")
        report.wall_time_s = time.perf_counter() - started
        report.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        report.write(tmp)
    return report


def _load_calibration(path: str | Path | None, checkpoint: Checkpoint, plan: QuantPlan) -> Calibration | None:
    """The calibration for ``checkpoint`` (checked to be of this model), or None when none is needed."""
    static = [t.name for t in plan.tensors if t.scheme is not None and t.scheme.activations == "static"]
    if path is None:
        if static:
            raise QuantkitError(
                "static activations need calibration statistics: run `quantkit calibrate MODEL --out DIR` "
                "and pass --calibration DIR (or use --activations dynamic)"
            )
        return None
    calibration = load_calibration(path)
    check_model(calibration, checkpoint)
    return calibration


def _write_input_scale(item: TensorPlan, weight: torch.Tensor, calib: Calibration, plan: QuantPlan,
                       writer: ShardedWriter, record: TensorRecord) -> None:
    """The static INT8 ``input_scale`` of one quantized linear, from its calibrated range."""
    assert item.scheme is not None
    amax, tokens, fallback = calib.input_amax(plan.arch, item.name, item.scheme.activation_range,
                                              item.scheme.percentile)
    scale = static_input_scale(amax, storage_dtype(weight))
    writer.add(f"{item.module}.input_scale", scale)
    record.bytes_after += scale.numel() * scale.element_size()
    record.input_amax, record.input_tokens, record.input_fallback = amax, tokens, fallback


def _needs_hessian(scheme: SchemeConfig) -> bool:
    return SCHEMES.get(scheme.method).needs_hessian


def _gptq_data(items: dict[str, TensorPlan], data: CalibrationSettings | None,
               calib: Calibration | None) -> CalibrationSettings | None:
    """The calibration windows GPTQ runs on: ``data``, else the calibration's, else the bundled text's."""
    if not items:
        return None
    if data is not None:
        return data
    return settings_of(calib) if calib is not None else CalibrationSettings()


def _encoder(output_format: str, plan: QuantPlan) -> Callable[[str, IntQuantized], dict[str, torch.Tensor]]:
    """The tensor encoder of ``output_format``, after checking that every scheme can be written in it."""
    if output_format == "compressed-tensors":
        return compressed_tensors.encode
    if output_format != "gptq-v1":
        raise QuantkitError(f"--format must be compressed-tensors or gptq-v1, got {output_format!r}")
    for item in plan.tensors:
        if item.scheme is None or not SCHEMES.get(item.scheme.method).integer:
            continue
        if item.scheme.method != "gptq" or item.scheme.activations != "none":
            raise QuantkitError(f"--format gptq-v1 holds GPTQ weights only; {item.name} is {item.scheme.describe()}")
        gptq_v1.check_shape(item.name, item.shape, item.scheme.bits)
    return gptq_v1.encode


def _gptq_layers(
    checkpoint: Checkpoint, items: dict[str, TensorPlan], data: CalibrationSettings, scale_dtype: torch.dtype | None,
    max_memory: int | None, show_progress: bool, console: Console | None,
) -> Iterator[LayerResult]:
    """GPTQ on every weight in ``items``, one decoder layer at a time (progress per layer, step shown)."""
    pipeline = LayerPipeline(checkpoint, torch.float32, data.device)
    windows = windows_for(checkpoint, data)
    states = pipeline.capture(windows.input_ids, data.batch_size)
    schemes = {name: item.scheme for name, item in items.items() if item.scheme is not None}
    steps = pipeline.num_layers + (1 if any(i.role.value == "lm_head" for i in items.values()) else 0)
    with StepProgress("GPTQ layers", steps, show_progress, console) as progress:
        yield from progress.track(gptq_layers(
            pipeline, states, schemes, all_experts=data.all_experts, min_expert_tokens=data.min_expert_tokens,
            scale_dtype=scale_dtype, max_memory=max_memory, on_step=progress.step,
        ))


def _write_tensor(item: TensorPlan, weight: torch.Tensor, writer: ShardedWriter,
                  encode: Callable[[str, IntQuantized], dict[str, torch.Tensor]],
                  quantized: Quantized | None = None) -> TensorRecord:
    """Quantize (or copy) one weight into ``writer`` and describe what was done; ``quantized``: done already."""
    bytes_before = weight.numel() * item.dtype.itemsize
    scheme = item.scheme
    if scheme is None:
        writer.add(item.name, weight)
        return TensorRecord(item.name, item.role.value, "float", None, None, None, list(item.shape),
                            str(weight.dtype).removeprefix("torch."), weight.element_size() * 8.0,
                            bytes_before, bytes_before, None)
    if quantized is None:
        quantized = SCHEMES.get(scheme.method).quantize(weight, scheme)
    if isinstance(quantized, IntQuantized):  # noqa: SIM108  (mypy narrows the union only in a statement)
        tensors = encode(item.module, quantized)
    else:
        tensors = {item.name: quantized.tensor}
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    bytes_after = sum(t.numel() * t.element_size() for t in tensors.values())
    return TensorRecord(
        name=item.name,
        role=item.role.value,
        scheme=scheme.describe(),
        bits=scheme.bits if isinstance(quantized, IntQuantized) else None,
        group_size=scheme.group_size,
        granularity=scheme.granularity if isinstance(quantized, IntQuantized) else None,
        shape=list(item.shape),
        dtype=str(item.dtype).removeprefix("torch."),
        bits_per_weight=quantized.bits_per_weight,
        bytes_before=bytes_before,
        bytes_after=bytes_after,
        rel_error=relative_error(weight, quantized.dequantize()),
    )


def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """``||W - Q|| / ||W||`` in float64 (0 for an all-zero weight reproduced exactly)."""
    w = weight.to(torch.float64)
    norm = torch.linalg.vector_norm(w)
    diff = torch.linalg.vector_norm(w - approx.to(torch.float64))
    return float(diff / norm) if norm > 0 else float(diff)


def _check_finite(name: str, tensor: torch.Tensor, checkpoint: Checkpoint) -> None:
    if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
        file = checkpoint.tensors[name].file.name if name in checkpoint.tensors else "checkpoint"
        raise QuantkitError(f"{name} in {file} contains NaN or Inf values")


def _planned_bits(t: TensorPlan) -> float:
    dtype_bits = float(t.dtype.itemsize * 8)
    if t.scheme is None:
        return dtype_bits
    return estimate_bits_per_weight(t.scheme, t.shape, scale_bits=int(dtype_bits))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
