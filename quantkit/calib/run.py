"""``quantkit calibrate``: windows of text through the model one layer at a time, statistics to disk."""

from __future__ import annotations

import fnmatch
import resource
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from quantkit.calib.artifact import PLOTS_DIR, Calibration, save_calibration, starved_experts
from quantkit.calib.data import DEFAULT_SOURCE, calibration_windows
from quantkit.calib.imatrix import imatrix_entries, is_imatrix_gguf, write_imatrix_gguf
from quantkit.calib.observers import LayerTaps, SiteStats, Statistics
from quantkit.errors import QuantkitError
from quantkit.model.archs.base import QUANTIZABLE_ROLES
from quantkit.model.checkpoint import Checkpoint
from quantkit.model.finite import check_all_finite
from quantkit.model.tokenizer import check_token_ids, load_tokenizer
from quantkit.outputs import atomic_directory, atomic_file
from quantkit.pipeline import LayerPipeline
from quantkit.plan import make_plan
from quantkit.progress import track
from quantkit.ranges.selectors import RANGE_SELECTORS
from quantkit.recipe import get_preset
from quantkit.version import versions

DEFAULT_MIN_EXPERT_TOKENS = 16
DEFAULT_SEQ_LEN = 2048
WORST_PLOTS = 3  # sites plotted automatically: the most outlier-dominated ones


@dataclass(frozen=True)
class CalibrationSettings:
    dataset: str | None = None  # None: the bundled calibration_data/default
    num_samples: int = 128
    seq_len: int | None = None  # default: min(2048, the model's context)
    seed: int = 0
    batch_size: int = 4
    text_field: str = "text"
    split: str | None = None
    all_experts: bool = False
    min_expert_tokens: int = DEFAULT_MIN_EXPERT_TOKENS
    bins: int = 2048
    plot: tuple[str, ...] = ()  # site globs to plot besides the worst ones
    device: str = "cpu"
    trust_remote_code: bool = False  # run a tokenizer's own Python code from the model directory


def calibrate(
    model: str | Path | None,
    out: str | Path,
    settings: CalibrationSettings,
    *,
    imatrix_out: str | Path | None = None,
    overwrite: bool = False,
    command: list[str] | None = None,
    show_progress: bool = True,
    console: Console | None = None,
) -> Calibration:
    """Gather per-site (and per-expert) activation statistics of ``model`` into the directory ``out``."""
    started = time.perf_counter()
    if settings.min_expert_tokens < 0:
        raise QuantkitError(f"--min-expert-tokens must not be negative, got {settings.min_expert_tokens}")
    if settings.batch_size < 1:
        raise QuantkitError(f"--batch-size must be positive, got {settings.batch_size}")
    checkpoint = Checkpoint.open(model)
    if "quantization_config" in checkpoint.config:
        raise QuantkitError(f"{checkpoint.path} is already quantized; calibrate the float model")
    check_all_finite(checkpoint, show_progress, console)
    pipeline = LayerPipeline(checkpoint, torch.float32, settings.device)
    windows = windows_for(checkpoint, settings)
    seq_len = int(windows.input_ids.shape[1])
    stats = Statistics(num_bins=settings.bins)
    states = pipeline.capture(windows.input_ids, settings.batch_size)
    for index in track(range(pipeline.num_layers), "calibrating layers", show_progress, console):
        layer = pipeline.load_layer(index)
        taps = LayerTaps(stats.observe, pipeline.arch, stats.aliases, all_experts=settings.all_experts,
                         routing=stats.add_routed)
        with taps.attach(pipeline.layer_prefix(index), layer):
            states = pipeline.run_layer(layer, states, on_batch=taps.next_batch)
        pipeline.release(layer)
    head = pipeline.output_head_name()
    if head is not None and pipeline.arch.role(pipeline.arch.disk_name(f"{head}.weight")) in QUANTIZABLE_ROLES:
        for hidden in pipeline.final_norm(states):
            stats.observe(head, 1, 0, hidden.reshape(-1, hidden.shape[-1]))
    calibration = Calibration(stats, {
        "model": str(checkpoint.path),
        "model_type": checkpoint.model_type,
        "model_fingerprint": checkpoint.fingerprint(),
        "dataset": windows.source,
        "text_field": settings.text_field,
        "split": settings.split,
        "num_samples": settings.num_samples,
        "seq_len": seq_len,
        "seed": settings.seed,
        "tokens": int(windows.input_ids.numel()),
        "text_tokens": windows.text_tokens,
        "overlapping_windows": windows.overlapping,
        "all_experts": settings.all_experts,
        "min_expert_tokens": settings.min_expert_tokens,
        "bins": settings.bins,
        "expert_tokens": {n: s.tokens.tolist() for n, s in stats.sites.items() if s.num_experts > 1},
        "expert_routed_tokens": {n: s.routed.tolist() for n, s in stats.sites.items() if s.num_experts > 1},
        "flagged_experts": starved_experts(stats, settings.min_expert_tokens),
        "command": command or [],
    })
    reads: list[str | Path] = [checkpoint.path]
    if settings.dataset and Path(settings.dataset).exists():
        reads.append(settings.dataset)
    notes: list[str] = []
    with ExitStack() as outputs:  # both outputs are checked before either is written, and appear together
        tmp = outputs.enter_context(atomic_directory(out, overwrite, reads=reads, notes=notes))
        imatrix_tmp = None if imatrix_out is None else outputs.enter_context(
            atomic_file(imatrix_out, overwrite, is_previous=is_imatrix_gguf, reads=reads, notes=notes))
        calibration.metadata["plots"] = _plots(stats, settings.plot, tmp)
        calibration.metadata["seconds"] = round(time.perf_counter() - started, 3)
        calibration.metadata["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        calibration.metadata["versions"] = versions()
        calibration.metadata["notes"] = notes
        save_calibration(calibration, tmp)
        if imatrix_tmp is not None:
            export_imatrix(calibration, checkpoint, imatrix_tmp)
    return calibration


def windows_for(checkpoint: Checkpoint, settings: CalibrationSettings) -> Any:
    """The calibration windows ``settings`` describe, tokenized with ``checkpoint``'s tokenizer."""
    seq_len = _check_seq_len(settings.seq_len, checkpoint.config)
    tokenizer = load_tokenizer(checkpoint.path, trust_remote_code=settings.trust_remote_code)
    windows = calibration_windows(settings.dataset, tokenizer, settings.num_samples, seq_len, settings.seed,
                                  settings.text_field, settings.split)
    check_token_ids(windows.input_ids, checkpoint.config, checkpoint.path)
    return windows


def settings_of(calibration: Calibration, trust_remote_code: bool = False) -> CalibrationSettings:
    """The settings that reproduce ``calibration``'s windows (same data, samples, length, seed)."""
    meta = calibration.metadata
    dataset = meta["dataset"]
    return CalibrationSettings(
        dataset=None if dataset == DEFAULT_SOURCE else dataset, num_samples=int(meta["num_samples"]),
        seq_len=int(meta["seq_len"]), seed=int(meta["seed"]), text_field=meta.get("text_field", "text"),
        split=meta.get("split"), all_experts=bool(meta["all_experts"]),
        min_expert_tokens=int(meta["min_expert_tokens"]), trust_remote_code=trust_remote_code,
    )


def export_imatrix(calibration: Calibration, checkpoint: Checkpoint, path: Path) -> None:
    """Write the importance vectors (sum of x^2 and token counts) as a llama.cpp imatrix GGUF."""
    plan = make_plan(checkpoint, get_preset("int8"))
    per_weight: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for item in plan.tensors:
        if item.role not in QUANTIZABLE_ROLES or len(item.shape) != 2:
            continue
        site, expert = calibration.lookup(plan.arch, item.name)
        per_weight[item.name] = (site.sum_sq[expert : expert + 1].float(), site.tokens[expert : expert + 1])
    meta = calibration.metadata
    entries = imatrix_entries(checkpoint.model_type, plan.arch.num_layers(checkpoint.config), per_weight)
    write_imatrix_gguf(path, entries, [str(meta["dataset"])], int(meta["num_samples"]), int(meta["seq_len"]))


def selector_ranges(hist: Any, num_bits: int = 8) -> dict[str, float]:
    """The amax every registered selector picks for ``hist``."""
    return {name: float(select(hist, num_bits=num_bits)) for name, select in RANGE_SELECTORS.items()}


def _plots(stats: Statistics, patterns: tuple[str, ...], directory: Path) -> dict[str, str]:
    """Plot the chosen sites plus the ``WORST_PLOTS`` most outlier-dominated ones; site -> relative path."""
    from quantkit.calib.plots import plot_ranges  # deferred: matplotlib is slow to import and needed only here

    chosen = [n for n in stats.sites if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if patterns and not chosen:
        raise QuantkitError(f"--plot {', '.join(patterns)} matches no calibration site")
    ranked = sorted((s for s in stats.sites.values() if _busiest(s) is not None), key=_outlier_ratio, reverse=True)
    chosen += [s.name for s in ranked[:WORST_PLOTS] if s.name not in chosen]
    plots: dict[str, str] = {}
    for name in chosen:
        site = stats.sites[name]
        expert = _busiest(site)
        if expert is None:
            continue
        hist = site.histograms[expert]
        label = name if site.num_experts == 1 else f"{name} expert {expert}"
        relative = f"{PLOTS_DIR}/{label.replace(' ', '_')}.png"
        (directory / PLOTS_DIR).mkdir(exist_ok=True)
        plot_ranges(hist, selector_ranges(hist), f"{label} ({int(site.tokens[expert]):,} tokens)",
                    directory / relative)
        plots[name] = relative
    return plots


def _busiest(site: SiteStats) -> int | None:
    """The expert with the most tokens and a histogram, if any."""
    candidates = [e for e in range(site.num_experts) if site.histograms[e].num_bins]
    return max(candidates, key=lambda e: int(site.tokens[e])) if candidates else None


def _outlier_ratio(site: SiteStats) -> float:
    """max|x| over the 99.99th percentile of the busiest expert: large when a few outliers set the range."""
    expert = _busiest(site)
    assert expert is not None
    hist = site.histograms[expert]
    p = RANGE_SELECTORS.get("percentile")(hist)
    return hist.absmax / p if p > 0 else 0.0


def _check_seq_len(seq_len: int | None, config: dict[str, Any]) -> int:
    limit = config.get("max_position_embeddings")
    if seq_len is None:
        return min(DEFAULT_SEQ_LEN, limit) if limit else DEFAULT_SEQ_LEN
    if limit and seq_len > limit:
        raise QuantkitError(f"--seq-len {seq_len} exceeds the model's context ({limit} positions)")
    return seq_len


