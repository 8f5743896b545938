"""Calibration on the demo model: cost, expert coverage, selector speed, and W8A8 quality per selector.

1. ``quantkit calibrate`` on WikiText-2 *valid* (128 windows x 512 tokens), routed and
   ``--all-experts``, each in a fresh process (wall time, peak RSS from the artifact).
2. Tokens per routed expert, routed vs all-experts.
3. Selector speed: ms per histogram for every selector over the calibration's histograms.
4. Quality on WikiText-2 *test* (gptq protocol, seq-len 512, every window): float, W8A16
   (absmax int8 per channel), W8A8 static with each selector, W8A8 dynamic.

Writes benchmarks/results/calibration.json.

    python benchmarks/calibration.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from quantkit.api import QuantizeOptions, quantize
from quantkit.calib.artifact import load_calibration
from quantkit.eval.run import EvalSettings, run_perplexity
from quantkit.model.checkpoint import DEMO_MODEL_DIR
from quantkit.ranges.selectors import RANGE_SELECTORS
from quantkit.recipe import get_preset

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-raw"
RESULTS = ROOT / "benchmarks" / "results" / "calibration.json"
SAMPLES, SEQ_LEN = 128, 512


def run_calibrate(out: Path, all_experts: bool) -> dict[str, Any]:
    command = [sys.executable, "-m", "quantkit.cli", "calibrate", "--dataset", str(WIKI / "wiki.valid.raw"),
               "--num-samples", str(SAMPLES), "--seq-len", str(SEQ_LEN), "--out", str(out), "--json"]
    started = time.perf_counter()
    subprocess.run([*command, *(["--all-experts"] if all_experts else [])], check=True, capture_output=True)
    meta = json.loads((out / "calibration.json").read_text())
    return {"process_seconds": time.perf_counter() - started, "calibrate_seconds": meta["seconds"],
            "peak_rss_mb": meta["peak_rss_mb"], "tokens": meta["tokens"],
            "expert_tokens": meta["expert_tokens"], "expert_routed_tokens": meta["expert_routed_tokens"],
            "flagged_experts": len(meta["flagged_experts"])}


def selector_speed(calib_dir: Path) -> dict[str, Any]:
    hists = [h for s in load_calibration(calib_dir).stats.sites.values() for h in s.histograms if h.num_bins]
    speed = {}
    for name, select in RANGE_SELECTORS.items():
        started = time.perf_counter()
        for hist in hists:
            select(hist)
        speed[name] = 1000 * (time.perf_counter() - started) / len(hists)
    return {"histograms": len(hists), "mean_bins": sum(h.num_bins for h in hists) / len(hists),
            "ms_per_histogram": speed}


def main() -> None:
    results: dict[str, Any] = {"calibration": {"dataset": "wiki.valid.raw", "samples": SAMPLES, "seq_len": SEQ_LEN}}
    settings = EvalSettings(dataset=str(WIKI / "wiki.test.raw"), protocol="gptq", seq_len=SEQ_LEN, batch_size=4)
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "calib"
        results["routed"] = run_calibrate(calib, all_experts=False)
        results["all_experts"] = run_calibrate(Path(tmp) / "calib-all", all_experts=True)
        print(json.dumps({k: {m: v for m, v in r.items() if "tokens" not in m}
                          for k, r in results.items() if k != "calibration"}))
        results["selector_speed"] = selector_speed(calib)
        print(results["selector_speed"])
        float_result = run_perplexity(None, settings)
        quality = {"float": {"ppl": float_result["ppl"]}}
        configs: dict[str, dict[str, Any]] = {"W8A16": {}, "W8A8-dynamic": {"activations": "dynamic"}}
        configs |= {f"W8A8-static-{s}": {"activations": "static", "activation_range": s} for s in RANGE_SELECTORS}
        for name, changes in configs.items():
            out = Path(tmp) / name
            quantize(None, get_preset("int8").with_default(**changes), out,
                     options=QuantizeOptions(calibration=calib, show_progress=False))
            result = run_perplexity(out, settings, base=DEMO_MODEL_DIR)
            quality[name] = {"ppl": result["ppl"], "kl": result["kl"], "top1_agreement": result["top1_agreement"]}
            print(f"{name}: ppl {result['ppl']:.3f} KL {result['kl']:.5f} top-1 {result['top1_agreement']:.4f}")
        results["quality"] = {"protocol": "gptq", "seq_len": SEQ_LEN, "windows": float_result["windows"],
                              "tokens_scored": float_result["tokens_scored"], "results": quality}
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
