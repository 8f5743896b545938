"""The calibration artifact: a versioned directory that ``quantkit quantize --calibration`` reuses.

::

    calib/
      calibration.json          metadata: version, model fingerprint, dataset, samples, seed,
                                sites, aliases, per-expert token counts, flagged experts, plots
      statistics.safetensors    per site S (E experts; E = 1 for a plain linear):
                                  S.sum_sq [E, in] f32   sum of x^2 per input channel
                                  S.tokens [E] i64       tokens observed (all of them with --all-experts)
                                  S.routed [E] i64       tokens the router sent to each expert
                                  S.values [E] i64       values seen (tokens x in)
                                  S.min, S.max [E] f64   signed extremes (+-inf when unseen)
                                  S.hist.e.counts i64, S.hist.e.edges f32   |x| histogram of expert e
      plots/*.png               activation histograms with the selectors' ranges

Written atomically; reading it checks the version, and :func:`check_model` refuses a
checkpoint whose fingerprint differs from the calibrated one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from quantkit.calib import imatrix
from quantkit.calib.observers import SiteStats, Statistics
from quantkit.errors import QuantkitError
from quantkit.jsonfile import read_json_object
from quantkit.model.archs.base import ArchSpec
from quantkit.model.checkpoint import Checkpoint
from quantkit.outputs import CALIBRATION_FILE, save_safetensors
from quantkit.ranges.histogram import AbsHistogram
from quantkit.ranges.selectors import RANGE_SELECTORS

CALIBRATION_VERSION = 1
METADATA_FILE = CALIBRATION_FILE
STATS_FILE = "statistics.safetensors"
PLOTS_DIR = "plots"


@dataclass
class Calibration:
    """Statistics of one model on one calibration set, plus how they were gathered."""

    stats: Statistics
    metadata: dict[str, Any] = field(default_factory=dict)
    _ranges: dict[tuple[str, int, str, float, int], float] = field(default_factory=dict, repr=False)

    @property
    def min_expert_tokens(self) -> int:
        return int(self.metadata.get("min_expert_tokens", 0))

    def lookup(self, arch: ArchSpec, disk_weight: str) -> tuple[SiteStats, int]:
        """The statistics of the input of on-disk weight ``disk_weight`` and its expert index."""
        site, expert = arch.input_site(disk_weight)
        try:
            return self.stats.site(site), expert
        except KeyError:
            raise QuantkitError(f"the calibration has no statistics for {disk_weight} (site {site})") from None

    def input_amax(self, arch: ArchSpec, disk_weight: str, selector: str, percentile: float,
                   num_bits: int = 8) -> tuple[float, int, str | None]:
        """Static clipping range of the input of ``disk_weight``: (amax, its tokens, fallback note or None).

        Fallback for routed experts observed on fewer than ``min_expert_tokens`` tokens: the
        largest range the selector picks among the well-covered experts of the same layer and
        projection (never clipping a starved expert harder than its best-observed siblings).
        """
        site, expert = self.lookup(arch, disk_weight)
        tokens = int(site.tokens[expert])
        if site.num_experts == 1 or tokens >= self.min_expert_tokens:
            return self._select(site, expert, selector, percentile, num_bits), tokens, None
        covered = [e for e in range(site.num_experts) if int(site.tokens[e]) >= self.min_expert_tokens]
        if not covered:
            raise QuantkitError(
                f"no expert of {site.name} saw {self.min_expert_tokens} calibration tokens; calibrate with "
                "--all-experts or more samples"
            )
        amax = max(self._select(site, e, selector, percentile, num_bits) for e in covered)
        note = (f"expert {expert} saw {tokens} tokens (< {self.min_expert_tokens}): largest {selector} range of "
                f"{len(covered)} covered experts")
        return amax, tokens, note

    def _select(self, site: SiteStats, expert: int, selector: str, percentile: float, num_bits: int) -> float:
        key = (site.name, expert, selector, percentile, num_bits)
        if key not in self._ranges:
            hist = site.histograms[expert]
            if hist.count == 0:
                raise QuantkitError(f"{hist.name} saw no calibration data")
            options: dict[str, Any] = {"num_bits": num_bits}
            if selector == "percentile":
                options["percentile"] = percentile
            select = RANGE_SELECTORS.get(selector)
            self._ranges[key] = float(select(hist, **options)) if hist.num_bins else 0.0  # no bins: all zeros
        return self._ranges[key]

    def importance(self, arch: ArchSpec, disk_weight: str) -> tuple[torch.Tensor, int]:
        """llama-quantize's importance of ``disk_weight``'s input channels (float32 ``[in]``) and its tokens.

        The mean of x^2 per input channel over the tokens the weight saw; all ones (uniform, as
        llama.cpp does) for an expert that saw none.
        """
        site, expert = self.lookup(arch, disk_weight)
        tokens = site.tokens[expert : expert + 1]
        return imatrix.importance(site.sum_sq[expert : expert + 1], tokens)[0], int(tokens[0])

    def starved(self) -> list[dict[str, Any]]:
        """Experts whose statistics rest on fewer than ``min_expert_tokens`` tokens."""
        return starved_experts(self.stats, self.min_expert_tokens)


def starved_experts(stats: Statistics, min_tokens: int) -> list[dict[str, Any]]:
    """``{"site", "expert", "tokens", "routed"}`` for every expert observed on fewer than ``min_tokens`` tokens."""
    return [
        {"site": name, "expert": e, "tokens": int(site.tokens[e]), "routed": int(site.routed[e])}
        for name, site in stats.sites.items() if site.num_experts > 1
        for e in range(site.num_experts) if int(site.tokens[e]) < min_tokens
    ]


def save_calibration(calibration: Calibration, directory: Path) -> None:
    """Write ``calibration`` into ``directory`` (which must exist and be empty of our files)."""
    tensors: dict[str, torch.Tensor] = {}
    sites: dict[str, dict[str, int]] = {}
    for name, site in calibration.stats.sites.items():
        sites[name] = {"experts": site.num_experts, "in_features": site.in_features, "bins": site.num_bins}
        tensors[f"{name}.sum_sq"] = site.sum_sq.to(torch.float32)
        tensors[f"{name}.tokens"] = site.tokens.clone()
        tensors[f"{name}.routed"] = site.routed.clone()
        tensors[f"{name}.values"] = torch.tensor([h.count for h in site.histograms], dtype=torch.int64)
        tensors[f"{name}.min"] = torch.tensor([h.min for h in site.histograms], dtype=torch.float64)
        tensors[f"{name}.max"] = torch.tensor([h.max for h in site.histograms], dtype=torch.float64)
        for e, hist in enumerate(site.histograms):
            if hist.num_bins:
                tensors[f"{name}.hist.{e}.counts"] = hist.counts.cpu()
                tensors[f"{name}.hist.{e}.edges"] = hist.edges.cpu()
    save_safetensors({k: v.contiguous() for k, v in tensors.items()}, directory / STATS_FILE,
                     metadata={"format": "quantkit-calibration", "version": str(CALIBRATION_VERSION)})
    metadata = {
        "quantkit_calibration_version": CALIBRATION_VERSION,
        **calibration.metadata,
        "sites": sites,
        "aliases": calibration.stats.aliases,
    }
    (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")


def load_calibration(directory: str | Path) -> Calibration:
    """Read a calibration directory written by ``quantkit calibrate``; one-line errors otherwise."""
    directory = Path(directory).expanduser()
    meta_file, stats_file = directory / METADATA_FILE, directory / STATS_FILE
    if not meta_file.is_file() or not stats_file.is_file():
        raise QuantkitError(f"{directory} is not a calibration directory (no {METADATA_FILE}/{STATS_FILE})")
    metadata = read_json_object(meta_file)
    version = metadata.get("quantkit_calibration_version")
    if version != CALIBRATION_VERSION:
        raise QuantkitError(
            f"{directory} has calibration version {version!r}; this quantkit reads version {CALIBRATION_VERSION}"
            " (run `quantkit calibrate` again)"
        )
    try:
        tensors = load_file(str(stats_file))
    except (SafetensorError, OSError) as exc:
        raise QuantkitError(f"corrupt {stats_file}: {exc}") from None
    stats = Statistics(aliases=dict(metadata.get("aliases", {})))
    try:
        for name, info in metadata["sites"].items():
            stats.sites[name] = _read_site(name, info, tensors)
    except KeyError as missing:
        raise QuantkitError(f"{stats_file} lacks {missing}; the calibration is incomplete") from None
    return Calibration(stats, {k: v for k, v in metadata.items() if k not in ("sites", "aliases")})


def check_model(calibration: Calibration, checkpoint: Checkpoint) -> None:
    """Refuse statistics gathered on another model."""
    expected = calibration.metadata.get("model_fingerprint")
    if expected != checkpoint.fingerprint():
        raise QuantkitError(
            f"the calibration was made for another model ({calibration.metadata.get('model')}); "
            f"run `quantkit calibrate` on {checkpoint.path}"
        )


def _read_site(name: str, info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> SiteStats:
    experts, bins = int(info["experts"]), int(info["bins"])
    histograms = []
    for e in range(experts):
        hist = AbsHistogram(bins, name=name if experts == 1 else f"{name}[{e}]")
        hist.count = int(tensors[f"{name}.values"][e])
        hist.min, hist.max = float(tensors[f"{name}.min"][e]), float(tensors[f"{name}.max"][e])
        if f"{name}.hist.{e}.counts" in tensors:
            hist.counts, hist.edges = tensors[f"{name}.hist.{e}.counts"], tensors[f"{name}.hist.{e}.edges"]
        elif not math.isinf(hist.min) and (hist.min != 0 or hist.max != 0):
            raise KeyError(f"{name}.hist.{e}.counts")
        histograms.append(hist)
    return SiteStats(
        name, int(info["in_features"]), experts, bins, histograms,
        tensors[f"{name}.sum_sq"].to(torch.float64), tensors[f"{name}.tokens"], tensors[f"{name}.routed"],
    )
