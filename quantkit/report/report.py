"""``quantkit_report.json`` and the rich summary table printed after a run."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from quantkit.outputs import REPORT_FILE
from quantkit.version import versions

REPORT_VERSION = 1


@dataclass
class TensorRecord:
    name: str
    role: str
    scheme: str  # "float" when copied unchanged
    bits: int | None
    group_size: int | None
    granularity: str | None
    shape: list[int]
    dtype: str
    bits_per_weight: float
    bytes_before: int
    bytes_after: int
    rel_error: float | None  # ||W - Q|| / ||W||
    input_amax: float | None = None  # static INT8 activations: the calibrated clipping range
    input_tokens: int | None = None  # calibration tokens behind it (this expert's, for routed experts)
    input_fallback: str | None = None  # why the range is not this tensor's own (starved expert)
    gptq: dict[str, Any] | None = None  # GPTQ: loss, damp, retries, tokens, fallback
    type_rule: str | None = None  # kquant: the preset rule (or fallback) that chose the block type
    importance_tokens: int | None = None  # kquant with --calibration: tokens behind the importance (0: uniform)
    partial_group: int | None = None  # group size not dividing the row: the last group's width (absent otherwise)

    def to_dict(self) -> dict[str, Any]:
        """The record as the report writes it; ``partial_group`` only where a row ends in a shorter group."""
        record = asdict(self)
        if record["partial_group"] is None:
            del record["partial_group"]
        return record


@dataclass
class QuantReport:
    model: str
    model_type: str
    recipe: dict[str, Any]
    command: list[str]
    seed: int
    tensors: list[TensorRecord] = field(default_factory=list)
    wall_time_s: float = 0.0
    peak_rss_mb: float | None = None
    output: str | None = None
    notes: list[str] = field(default_factory=list)
    calibration: dict[str, Any] | None = None  # the calibration used: path, dataset, tokens, flagged experts
    gptq: dict[str, Any] | None = None  # GPTQ's calibration windows and MoE options
    gptq_layers: list[dict[str, Any]] = field(default_factory=list)  # per decoder layer: seconds, weights
    clients: list[dict[str, Any]] = field(default_factory=list)  # per engine: engine, loads, why (from the format)

    @property
    def bytes_before(self) -> int:
        return sum(t.bytes_before for t in self.tensors)

    @property
    def bytes_after(self) -> int:
        return sum(t.bytes_after for t in self.tensors)

    def bits_per_weight(self, quantized_only: bool = False) -> float:
        """Average storage bits per weight (all tensors, or only the quantized ones)."""
        chosen = [t for t in self.tensors if t.bits is not None or not quantized_only]
        numel = sum(_numel(t.shape) for t in chosen)
        return 8 * sum(t.bytes_after for t in chosen) / numel if numel else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "quantkit_report_version": REPORT_VERSION,
            "model": self.model,
            "model_type": self.model_type,
            "output": self.output,
            "command": self.command,
            "seed": self.seed,
            "versions": versions(),
            "recipe": self.recipe,
            "totals": {
                "tensors": len(self.tensors),
                "quantized_tensors": sum(t.bits is not None for t in self.tensors),
                "bytes_before": self.bytes_before,
                "bytes_after": self.bytes_after,
                "compression": self.bytes_before / self.bytes_after if self.bytes_after else None,
                "bits_per_weight": self.bits_per_weight(),
                "bits_per_weight_quantized": self.bits_per_weight(quantized_only=True),
                "wall_time_s": self.wall_time_s,
                "peak_rss_mb": self.peak_rss_mb,
            },
            "by_role": self.by_role(),
            "notes": self.notes,
            "clients": self.clients,
            "calibration": self.calibration,
            "gptq": self.gptq,
            "gptq_layers": self.gptq_layers,
            "tensors": [t.to_dict() for t in self.tensors],
        }

    def by_role(self) -> dict[str, dict[str, Any]]:
        groups: dict[tuple[str, str], list[TensorRecord]] = defaultdict(list)
        for t in self.tensors:
            groups[(t.role, t.scheme)].append(t)
        out: dict[str, dict[str, Any]] = {}
        for (role, scheme), records in sorted(groups.items()):
            errors = [r.rel_error for r in records if r.rel_error is not None]
            numel = sum(_numel(r.shape) for r in records)
            out[f"{role} / {scheme}"] = {
                "tensors": len(records),
                "params": numel,
                "bits_per_weight": 8 * sum(r.bytes_after for r in records) / numel if numel else 0.0,
                "mean_rel_error": sum(errors) / len(errors) if errors else None,
                "max_rel_error": max(errors) if errors else None,
            }
        return out

    def write(self, directory: Path) -> Path:
        path = directory / REPORT_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def print_summary(self, console: Console) -> None:
        table = Table(title=f"quantkit: {self.model_type} → {self.output}", show_lines=False)
        for column in ("role / scheme", "tensors", "params", "bits/weight", "mean ‖W−Q‖/‖W‖", "max"):
            table.add_column(column, justify="left" if column == "role / scheme" else "right")
        for key, row in self.by_role().items():
            table.add_row(
                key,
                str(row["tensors"]),
                f"{row['params']:,}",
                f"{row['bits_per_weight']:.3f}",
                _fmt(row["mean_rel_error"]),
                _fmt(row["max_rel_error"]),
            )
        console.print(table)
        console.print(
            f"size {self.bytes_before / 2**20:.2f} MiB → {self.bytes_after / 2**20:.2f} MiB "
            f"({self.bytes_before / max(self.bytes_after, 1):.2f}x), "
            f"{self.bits_per_weight():.3f} bits/weight overall, "
            f"{self.bits_per_weight(quantized_only=True):.3f} on quantized tensors; "
            f"{self.wall_time_s:.1f} s"
        )
        if self.clients:
            console.print(f"clients: {client_summary(self.clients)}")
        for note in self.notes:
            console.print(f"note: {note}")


def client_summary(clients: list[dict[str, Any]]) -> str:
    """One line: the engines that load the output, those that do not, those not run."""
    verdicts = {True: "loads", False: "fails", None: "not run"}
    parts = []
    for verdict, label in verdicts.items():
        engines = [c["engine"] for c in clients if c["loads"] is verdict]
        if engines:
            parts.append(f"{label}: {', '.join(engines)}")
    return "; ".join(parts) + " (see clients in the report)"


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"
