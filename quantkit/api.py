"""The Python API the CLI calls: :func:`quantize`, :func:`calibrate` and :func:`inspect` (quantkit.inspection)."""

from __future__ import annotations

import json
import math
import resource
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from quantkit import heap
from quantkit.calib.artifact import Calibration, check_model, load_calibration
from quantkit.calib.run import CalibrationSettings, calibrate, settings_of, windows_for
from quantkit.errors import QuantkitError
from quantkit.formats.output import (
    DirectoryFormat,
    FileFormat,
    FileTensor,
    StoredTensor,
    TensorSink,
    WrittenWeights,
    resolve_output_format,
)
from quantkit.gptq.sequential import GptqWeight, LayerResult, gptq_layers
from quantkit.inspection import expert_coverage, inspect
from quantkit.kquants import BLOCK_FORMATS
from quantkit.model.archs.base import LINEAR_ROLES, Role
from quantkit.model.checkpoint import Checkpoint
from quantkit.model.finite import check_all_finite, check_finite
from quantkit.outputs import atomic_directory, atomic_file
from quantkit.pipeline import LayerPipeline
from quantkit.plan import QuantPlan, TensorPlan, make_plan
from quantkit.progress import StepProgress, track
from quantkit.recipe import Recipe
from quantkit.report.report import QuantReport, TensorRecord
from quantkit.schemes import (
    SCHEMES,
    BlockQuantized,
    GptqConfig,
    IntConfig,
    KquantConfig,
    Quantized,
    SchemeConfig,
)
from quantkit.schemes.activations import static_input_scale
from quantkit.schemes.base import storage_dtype
from quantkit.schemes.rows import quantize_rows, relative_error
from quantkit.schemes.ternary import post_training_warning

__all__ = ["CalibrationSettings", "QuantizeOptions", "calibrate", "expert_coverage", "inspect", "quantize"]
DEFAULT_MAX_SHARD_BYTES = 2 * 10**9  # the CLI's --max-shard-size 2GB


@dataclass(frozen=True)
class QuantizeOptions:
    """How :func:`quantize` runs; the recipe says what it does to each tensor.

    ``calibration`` is a directory from ``quantkit calibrate`` on the same model: static activation scales and
    k-quant importance come from it, and GPTQ runs on its windows unless ``data`` describes others (without
    either, on the bundled calibration text). ``output_format`` names a registered format
    (``quantkit.formats.output.OUTPUT_FORMATS``): ``compressed-tensors`` (pack-quantized), ``gptq-v1`` (GPTQ
    only), ``ggml`` (k-quant blocks in safetensors) or ``gguf`` (one llama.cpp file at ``out``); ``auto`` picks
    ``ggml`` for k-quants, else ``compressed-tensors``. ``max_memory`` (bytes) bounds how many experts GPTQ
    solves at once; None: half the memory available when a layer's experts are solved.
    ``true_sequential=False`` takes each layer's GPTQ Hessians in one pass over its float weights instead
    of after its earlier weights are quantized (fewer passes, usually a little worse).
    """

    overwrite: bool = False  # replace ``out`` if it is a previous quantkit output (never anything else)
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    seed: int = 0  # seeds torch and the GPTQ windows quantize samples itself; recorded in the report
    calibration: str | Path | None = None
    data: CalibrationSettings | None = None
    output_format: str = "auto"
    max_memory: int | None = None
    true_sequential: bool = True
    command: list[str] | None = None  # recorded in the report
    show_progress: bool = True
    console: Console | None = None


def quantize(model: str | Path | None, recipe: Recipe, out: str | Path, *,
             options: QuantizeOptions | None = None) -> QuantReport:
    """Quantize ``model`` with ``recipe`` into ``out``, atomically; ``options`` say how (:class:`QuantizeOptions`)."""
    options = options or QuantizeOptions()
    started = time.perf_counter()
    out = Path(out)
    torch.manual_seed(options.seed)
    checkpoint = Checkpoint.open(model)
    plan = make_plan(checkpoint, recipe)
    fmt = resolve_output_format(options.output_format, plan)
    calib = _load_calibration(options.calibration, checkpoint, plan)
    report = QuantReport(
        model=str(checkpoint.path),
        model_type=checkpoint.model_type,
        recipe=recipe.to_dict(),
        command=options.command or [],
        seed=options.seed,
        output=str(out),
        clients=[note.to_dict() for note in fmt.clients(plan)],
    )
    if calib is not None:
        report.calibration = {key: calib.metadata.get(key) for key in
                              ("dataset", "num_samples", "seq_len", "tokens", "all_experts", "min_expert_tokens")}
        report.calibration["path"] = str(options.calibration)
        report.calibration["flagged_experts"] = len(calib.starved())
    if checkpoint.fp8 is not None:
        report.notes.append(f"source weights: {checkpoint.fp8.describe()}, as DeepSeek's fp8_cast_bf16.py converts "
                            "them; its fp8 quantization_config is not written")
    if plan.unexpected:
        report.notes.append(
            f"{len(plan.unexpected)} tensor(s) unknown to config.json copied unchanged, e.g. {plan.unexpected[0]}"
        )
    reads = [checkpoint.path, *([options.calibration] if options.calibration is not None else [])]
    if isinstance(fmt, FileFormat):
        return _write_file(fmt, plan, calib, out, options, reads, report, started)
    assert isinstance(fmt, DirectoryFormat)
    return _write_directory(fmt, plan, calib, out, options, reads, report, started)


def _write_directory(fmt: DirectoryFormat, plan: QuantPlan, calib: Calibration | None, out: Path,
                     options: QuantizeOptions, reads: list[Any], report: QuantReport, started: float) -> QuantReport:
    """Write the plan as a checkpoint directory at ``out`` (atomically): GPTQ's weights layer by layer, then every
    other tensor source by source, config.json, the tokenizer files and the report."""
    checkpoint = plan.checkpoint
    written = WrittenWeights(true_sequential=options.true_sequential)
    hessian_items = {t.name: t for t in plan.tensors if t.scheme is not None and _needs_hessian(t.scheme)}
    gptq_data = _gptq_data(hessian_items, options.data, calib, options.seed)

    def finish(item: TensorPlan, weight: torch.Tensor, record: TensorRecord) -> None:
        if isinstance(item.scheme, IntConfig) and item.scheme.activations == "static":
            assert calib is not None
            _write_input_scale(item, item.scheme, weight, calib, plan, writer, record)
        report.tensors.append(record)
        if isinstance(item.scheme, KquantConfig):
            assert item.scheme.ggml_type is not None
            written.blocks[item.module] = (item.scheme.ggml_type, (item.shape[0], item.shape[1]))
        elif isinstance(item.scheme, IntConfig):
            written.integer[item.module] = item.scheme
        elif item.name.endswith(".weight") and item.role in LINEAR_ROLES:
            written.float_linears.append(item.module)

    def write_gptq(weights: list[GptqWeight]) -> None:
        for result in weights:
            item = hessian_items[result.name]
            record = _write_tensor(item, result.original, writer, fmt, result.quantized)
            record.gptq = {"loss": result.loss, "damp": result.damp, "retries": result.retries,
                           "tokens": result.tokens, "fallback": result.fallback}
            finish(item, result.original, record)

    if gptq_data is not None:
        check_all_finite(checkpoint, options.show_progress, options.console)
    with atomic_directory(out, options.overwrite, reads=reads, notes=report.notes) as tmp:
        writer = fmt.open(tmp, options.max_shard_bytes)
        if gptq_data is not None:
            layers = _gptq_layers(checkpoint, hessian_items, gptq_data, fmt.scale_dtype, options)
            for layer in layers:
                report.gptq_layers.append({"layer": layer.index, "seconds": round(layer.seconds, 3),
                                           "weights": len(layer.weights),
                                           **({"experts_per_chunk": layer.experts_per_chunk}
                                              if layer.experts_per_chunk else {})})
                write_gptq(layer.weights)
                layer.weights.clear()  # its originals and codes go now, not after the next layer is solved
            report.gptq = {"samples": gptq_data.num_samples, "seq_len": gptq_data.seq_len, "seed": gptq_data.seed,
                           "dataset": gptq_data.dataset or "bundled default", "all_experts": gptq_data.all_experts,
                           "min_expert_tokens": gptq_data.min_expert_tokens}
            if not options.true_sequential:  # absent when on, as reports before the option had it
                report.gptq["true_sequential"] = False
        for source in track(plan.sources, "quantizing", options.show_progress, options.console):
            if all(item.name in hessian_items for item in source.outputs):
                continue
            tensor = checkpoint.get(source.source)
            views = plan.arch.per_expert_view(source.source, tensor)
            for item in source.outputs:
                if item.name in hessian_items:
                    continue
                weight = views[item.name]
                check_finite(item.name, weight, checkpoint)
                importance, tokens = _importance(item, calib, plan)
                record = _write_tensor(item, weight, writer, fmt, importance=importance)
                record.type_rule, record.importance_tokens = plan.type_rules.get(item.name), tokens
                finish(item, weight, record)
            del tensor, views
            heap.trim()
        writer.finish()
        config = dict(checkpoint.config)
        fmt.finish(tmp, config, written)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for file in checkpoint.other_files():
            shutil.copy2(file, tmp / file.name)
        _finish_report(report, started)
        report.write(tmp)
    return report


def _write_file(fmt: FileFormat, plan: QuantPlan, calib: Calibration | None, out: Path, options: QuantizeOptions,
                reads: list[Any], report: QuantReport, started: float) -> QuantReport:
    """Write the plan as one file at ``out`` (atomically) through the format's layout, and the report beside it."""
    layout = fmt.layout(plan)
    tokens: dict[str, int | None] = {}  # calibration tokens behind each item's importance

    def quantize(item: TensorPlan, weight: torch.Tensor) -> Quantized:
        importance, tokens[item.name] = _importance(item, calib, plan)
        assert item.scheme is not None
        return quantize_rows(SCHEMES.get(item.scheme.method), weight, item.scheme, importance)

    def stored() -> Iterator[StoredTensor]:
        for tensor in track(layout.tensors, "quantizing", options.show_progress, options.console):
            data = layout.load(tensor)
            check_finite(tensor.name, data, plan.checkpoint)
            result = layout.store(tensor, data, quantize)
            report.tensors.append(_file_record(tensor, data, result, plan, tokens))
            yield result
            heap.trim()

    with atomic_file(out, options.overwrite, is_previous=fmt.is_previous, reads=reads, notes=report.notes) as tmp:
        layout.write(tmp, stored())
        _finish_report(report, started)
        with atomic_file(fmt.report_path(out), True, is_previous=lambda _: True, reads=reads) as report_tmp:
            report_tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def _file_record(tensor: FileTensor, data: torch.Tensor, stored: StoredTensor, plan: QuantPlan,
                 tokens: dict[str, int | None]) -> TensorRecord:
    """What was done to one tensor of a single-file output (its items merged, e.g. a layer's experts)."""
    items = tensor.items
    scheme = items[0].scheme if items else None
    nbytes = stored.data.nbytes
    record = TensorRecord(
        tensor.name, items[0].role.value if items else "other", scheme.describe() if scheme else "float",
        _code_bits(stored.quantized[0]) if stored.quantized else None, None, None, list(data.shape),
        stored.type_name, nbytes * 8 / data.numel(), sum(math.prod(i.shape) * i.dtype.itemsize for i in items),
        nbytes, relative_error(data, data if stored.values is None else stored.values),
    )
    if stored.quantized:
        record.type_rule = plan.type_rules.get(tensor.name) or plan.type_rules.get(items[0].name)
        counts = [tokens[item.name] for item in items]
        record.importance_tokens = None if counts[0] is None else min(t or 0 for t in counts)
    return record


def _finish_report(report: QuantReport, started: float) -> None:
    """Notes on the fallbacks the per-tensor records hold, wall time and peak memory."""
    fallbacks = sum(1 for t in report.tensors if t.input_fallback)
    if fallbacks:
        report.notes.append(f"{fallbacks} starved expert weight(s) use a fallback input range (see input_fallback)")
    uniform = sum(1 for t in report.tensors if t.importance_tokens == 0)
    if uniform:
        report.notes.append(f"{uniform} k-quant weight(s) of experts without calibration tokens used uniform "
                            "importance (importance_tokens 0), as llama.cpp does")
    row_fallbacks = sum(1 for t in report.tensors if t.type_rule and t.type_rule.startswith("fallback"))
    if row_fallbacks:
        report.notes.append(f"{row_fallbacks} k-quant weight(s) fell back to another type: rows not divisible by "
                            "the block size (see type_rule)")
    warning = post_training_warning([(t.scheme, t.rel_error) for t in report.tensors])
    if warning:
        report.notes.append(warning)
    partial = sum(1 for t in report.tensors if t.partial_group)
    if partial:
        report.notes.append(
            f"{partial} weight(s) end each row in a shorter group (see partial_group): groups are columns "
            "[k*g, (k+1)*g), so scales have ceil(in/g) columns. quantkit's loader reads them; "
            "compressed-tensors' own decompressor (0.20) and transformers through it refuse a group size that "
            "does not divide the row, GPTQ v1 readers use g_idx = column // g"
        )
    report.wall_time_s = time.perf_counter() - started
    report.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _importance(item: TensorPlan, calib: Calibration | None, plan: QuantPlan) -> tuple[torch.Tensor | None, int | None]:
    """A k-quant weight's importance from the calibration (and its tokens), or (None, None) without one.

    Embeddings see token ids, not activations: like llama.cpp, they are quantized without importance.
    """
    if calib is None or not isinstance(item.scheme, KquantConfig) or item.role == Role.EMBEDDING:
        return None, None
    return calib.importance(plan.arch, item.name)


def _load_calibration(path: str | Path | None, checkpoint: Checkpoint, plan: QuantPlan) -> Calibration | None:
    """The calibration for ``checkpoint`` (checked to be of this model), or None when none is needed."""
    static = [t.name for t in plan.tensors if isinstance(t.scheme, IntConfig) and t.scheme.activations == "static"]
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


def _write_input_scale(item: TensorPlan, scheme: IntConfig, weight: torch.Tensor, calib: Calibration,
                       plan: QuantPlan, writer: TensorSink, record: TensorRecord) -> None:
    """The static INT8 ``input_scale`` of one quantized linear, from its calibrated range."""
    amax, tokens, fallback = calib.input_amax(plan.arch, item.name, scheme.activation_range, scheme.percentile)
    scale = static_input_scale(amax, storage_dtype(weight))
    writer.add(f"{item.module}.input_scale", scale)
    record.bytes_after += scale.numel() * scale.element_size()
    record.input_amax, record.input_tokens, record.input_fallback = amax, tokens, fallback


def _needs_hessian(scheme: SchemeConfig) -> bool:
    return SCHEMES.get(scheme.method).needs_hessian


def _gptq_data(items: dict[str, TensorPlan], data: CalibrationSettings | None,
               calib: Calibration | None, seed: int) -> CalibrationSettings | None:
    """The calibration windows GPTQ runs on: ``data``, else the calibration's, else the bundled text's
    (drawn with ``seed``)."""
    if not items:
        return None
    if data is not None:
        return data
    return settings_of(calib) if calib is not None else CalibrationSettings(seed=seed)


def _gptq_layers(
    checkpoint: Checkpoint, items: dict[str, TensorPlan], data: CalibrationSettings, scale_dtype: torch.dtype | None,
    options: QuantizeOptions,
) -> Iterator[LayerResult]:
    """GPTQ on every weight in ``items``, one decoder layer at a time (progress per layer, step shown)."""
    pipeline = LayerPipeline(checkpoint, torch.float32, data.device)
    windows = windows_for(checkpoint, data)
    states = pipeline.capture(windows.input_ids, data.batch_size)
    schemes = {name: item.scheme for name, item in items.items() if isinstance(item.scheme, GptqConfig)}
    steps = pipeline.num_layers + (1 if any(i.role.value == "lm_head" for i in items.values()) else 0)
    with StepProgress("GPTQ layers", steps, options.show_progress, options.console) as progress:
        yield from progress.track(gptq_layers(
            pipeline, states, schemes, all_experts=data.all_experts, min_expert_tokens=data.min_expert_tokens,
            scale_dtype=scale_dtype, max_memory=options.max_memory, true_sequential=options.true_sequential,
            on_step=progress.step,
        ))


def _write_tensor(item: TensorPlan, weight: torch.Tensor, writer: TensorSink, fmt: DirectoryFormat,
                  quantized: Quantized | None = None, importance: torch.Tensor | None = None) -> TensorRecord:
    """Quantize (or copy) one weight into ``writer`` and describe what was done; ``quantized``: done already."""
    bytes_before = weight.numel() * item.dtype.itemsize
    scheme = item.scheme
    if scheme is None:
        writer.add(item.name, weight)
        return TensorRecord(item.name, item.role.value, "float", None, None, None, list(item.shape),
                            str(weight.dtype).removeprefix("torch."), weight.element_size() * 8.0,
                            bytes_before, bytes_before, None)
    if quantized is None:
        quantized = quantize_rows(SCHEMES.get(scheme.method), weight, scheme, importance)
    tensors = fmt.tensors(item.module, item.name, quantized)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    bytes_after = sum(t.numel() * t.element_size() for t in tensors.values())
    return TensorRecord(
        name=item.name,
        role=item.role.value,
        scheme=quantized.config.describe(),
        bits=scheme.bits if isinstance(scheme, IntConfig) else _code_bits(quantized),
        group_size=scheme.group_size if isinstance(scheme, IntConfig) else None,
        granularity=scheme.granularity if isinstance(scheme, IntConfig) else None,
        shape=list(item.shape),
        dtype=str(item.dtype).removeprefix("torch."),
        bits_per_weight=quantized.bits_per_weight,
        bytes_before=bytes_before,
        bytes_after=bytes_after,
        rel_error=relative_error(weight, quantized),
        partial_group=scheme.partial_group(item.shape[-1]) if isinstance(scheme, IntConfig) else None,
    )


def _code_bits(quantized: Quantized) -> int | None:
    """The integer bits of a block type's codes (4 for Q4_K); None for float casts."""
    if isinstance(quantized, BlockQuantized):
        return BLOCK_FORMATS.get(quantized.ggml_type).code_bits
    return None
