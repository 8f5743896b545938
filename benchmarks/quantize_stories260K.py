"""Reconstruction error per bit width, and time / peak memory, quantizing ../shared/models/stories260K.

Writes benchmarks/results/quantize_stories260K.json (quoted in docs/benchmarks.md). Each
timed run is a fresh ``quantkit quantize`` process, so peak RSS is that of one real CLI run.

    python benchmarks/quantize_stories260K.py
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT.parent / "shared" / "models" / "stories260K"
RESULTS = ROOT / "benchmarks" / "results" / "quantize_stories260K.json"


def run_cli(args: list[str], out: Path) -> tuple[dict, float, float]:
    """One CLI run under /usr/bin/time: (report, wall seconds, peak RSS MiB)."""
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "quantkit.cli", "quantize", str(MODEL),
               *args, "--out", str(out), "--json"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)[1])  # type: ignore[index]
    return json.loads(done.stdout), wall, peak_kb / 1024


def main() -> None:
    if not MODEL.is_dir():
        sys.exit(f"{MODEL} not found: this benchmark needs ../shared beside the repo")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("absmax", "zeropoint"):
            for granularity in ("channel", "tensor"):
                for bits in range(2, 9):
                    out = Path(tmp) / f"{method}-{granularity}-{bits}"
                    report, wall, peak = run_cli(
                        ["--method", method, "--bits", str(bits), "--granularity", granularity], out
                    )
                    quantized = [t for t in report["tensors"] if t["bits"] is not None]
                    errors = [t["rel_error"] for t in quantized]
                    numel = [t["shape"][0] * t["shape"][1] for t in quantized]
                    weighted = sum(e * n for e, n in zip(errors, numel, strict=True)) / sum(numel)
                    rows.append({
                        "method": method, "granularity": granularity, "bits": bits,
                        "mean_rel_error": sum(errors) / len(errors), "max_rel_error": max(errors),
                        "param_weighted_rel_error": weighted,
                        "bits_per_weight_quantized": report["totals"]["bits_per_weight_quantized"],
                        "bytes_before": report["totals"]["bytes_before"],
                        "bytes_after": report["totals"]["bytes_after"],
                        "quantize_wall_s": report["totals"]["wall_time_s"],
                        "process_wall_s": wall, "peak_rss_mib": peak,
                    })
                    print(f"{method:9s} {granularity:7s} int{bits}: mean rel err {rows[-1]['mean_rel_error']:.4f} "
                          f"max {rows[-1]['max_rel_error']:.4f}  {wall:.2f}s  {peak:.0f} MiB")
    report = {"model": "stories260K", "tensors_quantized": len(quantized), "runs": rows,
              "versions": report["versions"]}
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
