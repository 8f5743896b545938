"""The Python API the CLI calls: :func:`quantize`, :func:`calibrate` and :func:`inspect` (quantkit.inspection)."""

from __future__ import annotations

import json
import resource
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from quantkit.calib.artifact import Calibration, check_model, load_calibration
from quantkit.calib.run import CalibrationSettings, calibrate, settings_of, windows_for
from quantkit.errors import QuantkitError
from quantkit.formats.output import DirectoryFormat, OutputFormat, TensorSink, WrittenWeights, resolve_output_format
from quantkit.gptq.sequential import LayerResult, gptq_layers
from quantkit.inspection import expert_coverage, inspect
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
    solves at once.
    """

    overwrite: bool = False  # replace ``out`` if it is a previous quantkit output (never anything else)
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    seed: int = 0  # seeds torch; recorded in the report
    calibration: str | Path | None = None
    data: CalibrationSettings | None = None
    output_format: str = "auto"
    max_memory: int | None = None
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
    )
    if calib is not None:
        report.calibration = {key: calib.metadata.get(key) for key in
                              ("dataset", "num_samples", "seq_len", "tokens", "all_experts", "min_expert_tokens")}
        report.calibration["path"] = str(options.calibration)
        report.calibration["flagged_experts"] = len(calib.starved())
    if plan.unexpected:
        report.notes.append(
            f"{len(plan.unexpected)} tensor(s) unknown to config.json copied unchanged, e.g. {plan.unexpected[0]}"
        )
    written = WrittenWeights()
    hessian_items = {t.name: t for t in plan.tensors if t.scheme is not None and _needs_hessian(t.scheme)}
    gptq_data = _gptq_data(hessian_items, options.data, calib)
    reads = [checkpoint.path, *([options.calibration] if options.calibration is not None else [])]
    if not isinstance(fmt, DirectoryFormat):
        return _quantize_to_file(fmt, plan, calib, out, options, reads, report, started)

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

    if gptq_data is not None:
        check_all_finite(checkpoint, options.show_progress, options.console)
    with atomic_directory(out, options.overwrite, reads=reads, notes=report.notes) as tmp:
        writer = fmt.open(tmp, options.max_shard_bytes)
        if gptq_data is not None:
            layers = _gptq_layers(checkpoint, hessian_items, gptq_data, fmt.scale_dtype, options.max_memory,
                                  options.show_progress, options.console)
            for layer in layers:
                report.gptq_layers.append({"layer": layer.index, "seconds": round(layer.seconds, 3),
                                           "weights": len(layer.weights)})
                for result in layer.weights:
                    item = hessian_items[result.name]
                    record = _write_tensor(item, result.original, writer, fmt, result.quantized)
                    record.gptq = {"loss": result.loss, "damp": result.damp, "retries": result.retries,
                                   "tokens": result.tokens, "fallback": result.fallback}
                    finish(item, result.original, record)
            report.gptq = {"samples": gptq_data.num_samples, "seq_len": gptq_data.seq_len,
                           "dataset": gptq_data.dataset or "bundled default", "all_experts": gptq_data.all_experts,
                           "min_expert_tokens": gptq_data.min_expert_tokens}
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
        writer.finish()
        config = dict(checkpoint.config)
        fmt.finish(tmp, config, written)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for file in checkpoint.other_files():
            shutil.copy2(file, tmp / file.name)
        _finish_report(report, started)
        report.write(tmp)
    return report


def _quantize_to_file(fmt: OutputFormat, plan: QuantPlan, calib: Calibration | None, out: Path,
                      options: QuantizeOptions, reads: list[Any], report: QuantReport, started: float) -> QuantReport:
    """Write the plan as one file at ``out`` (atomically) and its report beside it: a GGUF file for llama.cpp.

    The single-file path still walks the checkpoint by GGUF tensor (experts merged) on its own; making it
    consume the plan's per-tensor walk like the directory formats is issue 14's next step.
    """
    assert fmt.name == "gguf", f"no single-file writer for {fmt.name}"
    import gguf
    import numpy as np

    from quantkit.formats import gguf_export

    checkpoint = plan.checkpoint
    items = {t.name: t for t in plan.tensors}
    sources = gguf_export.gguf_sources(checkpoint)

    def tensors() -> Iterator[tuple[str, gguf.GGMLQuantizationType, np.ndarray]]:
        for source in track(sources, "quantizing", options.show_progress, options.console):
            data = gguf_export.load_source(checkpoint, source)
            check_finite(source.name, torch.from_numpy(data), checkpoint)
            members = [items[name] for name in source.hf_names if name in items]
            scheme = members[0].scheme if members else None
            role = members[0].role.value if members else "other"
            bytes_before = sum(_numel(m.shape) * m.dtype.itemsize for m in members)
            if not isinstance(scheme, KquantConfig):
                ggml_type = gguf.GGMLQuantizationType.F16 if scheme is not None else gguf.GGMLQuantizationType.F32
                stored = data.astype(np.float16 if scheme is not None else np.float32)
                error = relative_error(torch.from_numpy(data), torch.from_numpy(stored.astype(np.float32)))
                report.tensors.append(TensorRecord(
                    source.name, role, scheme.describe() if scheme else "float", None, None, None, list(data.shape),
                    ggml_type.name, stored.itemsize * 8.0, bytes_before, stored.nbytes, error))
                yield source.name, ggml_type, stored
                continue
            assert scheme.ggml_type is not None
            rows = torch.from_numpy(data.reshape(len(members), -1, data.shape[-1]))  # one slice per expert
            quantized: list[BlockQuantized] = []
            tokens = []
            for member, expert_rows in zip(members, rows, strict=True):
                importance, n_tokens = _importance(member, calib, plan)
                blocks = SCHEMES.get("kquant").quantize(expert_rows, scheme, importance)
                assert isinstance(blocks, BlockQuantized)
                quantized.append(blocks)
                tokens.append(n_tokens)
            packed = np.stack([q.data for q in quantized]).reshape(*data.shape[:-1], -1)
            record = TensorRecord(
                source.name, role, scheme.describe(), _code_bits(quantized[0]), None, None, list(data.shape),
                scheme.ggml_type, packed.nbytes * 8 / data.size, bytes_before, packed.nbytes,
                relative_error(rows, torch.stack([q.dequantize() for q in quantized])),
                type_rule=plan.type_rules.get(members[0].name),
                importance_tokens=None if tokens[0] is None else min(t or 0 for t in tokens),
            )
            report.tensors.append(record)
            yield source.name, gguf.GGMLQuantizationType[scheme.ggml_type], packed

    preset = plan.recipe.default.kquant_preset if isinstance(plan.recipe.default, KquantConfig) else None
    file_type = gguf.LlamaFileType[f"MOSTLY_{preset}"] if preset else gguf.LlamaFileType.GUESSED
    with atomic_file(out, options.overwrite, is_previous=_is_quantkit_gguf, reads=reads, notes=report.notes) as tmp:
        gguf_export.write_gguf(tmp, checkpoint, tensors(), file_type=int(file_type))
        _finish_report(report, started)
        with atomic_file(gguf_report_path(out), True, is_previous=lambda _: True, reads=reads) as report_tmp:
            report_tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def gguf_report_path(gguf_file: Path) -> Path:
    """Where the report of a GGUF output lies: ``NAME.quantkit_report.json`` beside ``NAME.gguf``."""
    return gguf_file.with_name(gguf_file.stem + ".quantkit_report.json")


def _is_quantkit_gguf(path: Path) -> bool:
    """A GGUF file quantkit wrote: GGUF magic, and its report beside it."""
    with path.open("rb") as handle:
        magic = handle.read(4)
    return magic == b"GGUF" and gguf_report_path(path).is_file()


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
               calib: Calibration | None) -> CalibrationSettings | None:
    """The calibration windows GPTQ runs on: ``data``, else the calibration's, else the bundled text's."""
    if not items:
        return None
    if data is not None:
        return data
    return settings_of(calib) if calib is not None else CalibrationSettings()


def _gptq_layers(
    checkpoint: Checkpoint, items: dict[str, TensorPlan], data: CalibrationSettings, scale_dtype: torch.dtype | None,
    max_memory: int | None, show_progress: bool, console: Console | None,
) -> Iterator[LayerResult]:
    """GPTQ on every weight in ``items``, one decoder layer at a time (progress per layer, step shown)."""
    pipeline = LayerPipeline(checkpoint, torch.float32, data.device)
    windows = windows_for(checkpoint, data)
    states = pipeline.capture(windows.input_ids, data.batch_size)
    schemes = {name: item.scheme for name, item in items.items() if isinstance(item.scheme, GptqConfig)}
    steps = pipeline.num_layers + (1 if any(i.role.value == "lm_head" for i in items.values()) else 0)
    with StepProgress("GPTQ layers", steps, show_progress, console) as progress:
        yield from progress.track(gptq_layers(
            pipeline, states, schemes, all_experts=data.all_experts, min_expert_tokens=data.min_expert_tokens,
            scale_dtype=scale_dtype, max_memory=max_memory, on_step=progress.step,
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
        quantized = SCHEMES.get(scheme.method).quantize(weight, scheme, importance)
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
        rel_error=relative_error(weight, quantized.dequantize()),
    )


def _code_bits(quantized: Quantized) -> int | None:
    """The integer bits of a block type's codes (4 for Q4_K); None for float casts."""
    if isinstance(quantized, BlockQuantized):
        from quantkit.kquants import BLOCK_FORMATS

        return BLOCK_FORMATS.get(quantized.ggml_type).code_bits
    return None


def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """``||W - Q|| / ||W||`` in float64 (0 for an all-zero weight reproduced exactly)."""
    w = weight.to(torch.float64)
    norm = torch.linalg.vector_norm(w)
    diff = torch.linalg.vector_norm(w - approx.to(torch.float64))
    return float(diff / norm) if norm > 0 else float(diff)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
