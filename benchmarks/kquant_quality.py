"""k-quant presets on the demo model, with and without importance weights, against GPTQ.

Calibration (importance = mean x^2 per input channel, per expert): WikiText-2 *valid*, 128 windows
x 512 tokens. Evaluation: the first 200 windows of WikiText-2 *test* (gptq protocol, seq-len 512,
102,200 tokens scored) against the float model: perplexity, KL, top-1 agreement, and the model's
overall bits per weight (every tensor counted, embeddings included). GPTQ rows (int4 and int3,
g128, on the same calibration windows) give the comparison at similar sizes.

    python benchmarks/kquant_quality.py [--threads 1] [--max-windows 200] [--only NAME ...]

Rows are merged into the results file as they finish, so runs of disjoint ``--only`` sets (one per
core) fill one table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from quantkit.api import CalibrationSettings, QuantizeOptions, calibrate, quantize
from quantkit.eval.run import EvalSettings, run_perplexity
from quantkit.kquants.presets import PRESET_ORDER
from quantkit.model.checkpoint import DEMO_MODEL_DIR
from quantkit.recipe import get_preset

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-raw"
RESULTS = ROOT / "benchmarks" / "results" / "kquant_quality.json"
GPTQ: dict[str, dict[str, Any]] = {
    "gptq-w4-g128": {"method": "gptq", "bits": 4, "group_size": 128},
    "gptq-w3-g128-act": {"method": "gptq", "bits": 3, "group_size": 128, "act_order": True},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    parser.add_argument("--max-windows", type=int, default=200)
    parser.add_argument("--only", nargs="+", help="run only these rows (e.g. Q4_K_M Q4_K_M-imatrix gptq-w4-g128)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = CalibrationSettings(dataset=str(WIKI / "wiki.valid.raw"), num_samples=128, seq_len=512)
    settings = EvalSettings(dataset=str(WIKI / "wiki.test.raw"), protocol="gptq", seq_len=512, batch_size=4,
                            max_windows=args.max_windows)
    header = {"calibration": "wiki.valid.raw 128 x 512 (importance and GPTQ)",
              "evaluation": f"wiki.test.raw, gptq protocol, seq-len 512, first {args.max_windows} windows",
              "threads": args.threads}
    save_row(header, "float", {"ppl": run_perplexity(None, settings)["ppl"]})
    with tempfile.TemporaryDirectory() as tmp:
        calibration = Path(tmp) / "calib"
        calibrate(None, calibration, data, show_progress=False)
        runs: list[tuple[str, Any, Path | None]] = []
        for preset in [p.name for p in PRESET_ORDER if p.name != "Q8_0"]:
            runs += [(preset, get_preset(preset), None), (f"{preset}-imatrix", get_preset(preset), calibration)]
        runs += [(name, get_preset("int8").with_default(**config), calibration) for name, config in GPTQ.items()]
        for name, recipe, calib in runs:
            if args.only and name not in args.only:
                continue
            out = Path(tmp) / name
            started = time.perf_counter()
            report = quantize(None, recipe, out, options=QuantizeOptions(calibration=calib, show_progress=False))
            seconds = time.perf_counter() - started
            result = run_perplexity(out, settings, base=DEMO_MODEL_DIR)
            row = {"ppl": result["ppl"], "kl": result["kl"], "top1_agreement": result["top1_agreement"],
                   "bits_per_weight": report.bits_per_weight(), "quantize_seconds": seconds,
                   "tokens_scored": result["tokens_scored"]}
            save_row(header, name, row)
            print(name, row, flush=True)
    print(f"wrote {RESULTS}")


def save_row(header: dict[str, Any], name: str, row: dict[str, Any]) -> None:
    """Merge one result row into the results file (same settings only)."""
    saved = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results = saved.get("results", {}) if all(saved.get(k) == v for k, v in header.items()) else {}
    results[name] = row
    RESULTS.write_text(json.dumps({**header, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
