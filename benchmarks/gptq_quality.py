"""GPTQ vs round-to-nearest on the demo model at 4 and 3 bits (g128), with and without act-order.

Calibration: WikiText-2 *valid*, 128 windows x 512 tokens. Evaluation: all of WikiText-2 *test*
(gptq protocol, seq-len 512) against the float model. Reported per configuration: perplexity, KL,
top-1, GPTQ time per layer, peak RSS; and issue 5's bar, GPTQ's perplexity increase over float as a
fraction of RTN's (zeropoint, same bits and group size), plus the same ratio for KL.

    python benchmarks/gptq_quality.py [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from quantkit.api import CalibrationSettings, QuantizeOptions, quantize
from quantkit.eval.run import EvalSettings, run_perplexity
from quantkit.model.checkpoint import DEMO_MODEL_DIR
from quantkit.recipe import get_preset

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-raw"
RESULTS = ROOT / "benchmarks" / "results" / "gptq_quality.json"
CONFIGS: dict[str, dict[str, Any]] = {
    f"{name}-w{bits}-g128": {"method": method, "bits": bits, "group_size": 128, **extra}
    for bits in (4, 3)
    for name, method, extra in (("rtn", "zeropoint", {}), ("gptq", "gptq", {}),
                                ("gptq-act", "gptq", {"act_order": True}))
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = CalibrationSettings(dataset=str(WIKI / "wiki.valid.raw"), num_samples=128, seq_len=512)
    settings = EvalSettings(dataset=str(WIKI / "wiki.test.raw"), protocol="gptq", seq_len=512, batch_size=4)
    float_ppl = run_perplexity(None, settings)["ppl"]
    rows: dict[str, dict[str, Any]] = {"float": {"ppl": float_ppl}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in CONFIGS.items():
            out = Path(tmp) / name
            started = time.perf_counter()
            report = quantize(None, get_preset("int8").with_default(**config), out,
                              options=QuantizeOptions(data=data, show_progress=False))
            seconds = time.perf_counter() - started
            result = run_perplexity(out, settings, base=DEMO_MODEL_DIR)
            rows[name] = {"ppl": result["ppl"], "kl": result["kl"], "top1_agreement": result["top1_agreement"],
                          "quantize_seconds": seconds, "peak_rss_mb": report.peak_rss_mb,
                          "gptq_layer_seconds": [layer["seconds"] for layer in report.gptq_layers]}
            print(name, {k: v for k, v in rows[name].items() if k != "gptq_layer_seconds"}, flush=True)
    for bits in (4, 3):
        rtn = rows[f"rtn-w{bits}-g128"]
        for variant in ("gptq", "gptq-act"):
            row = rows[f"{variant}-w{bits}-g128"]
            row["ppl_increase_vs_rtn"] = (row["ppl"] - float_ppl) / (rtn["ppl"] - float_ppl)
            row["kl_vs_rtn"] = row["kl"] / rtn["kl"]
    RESULTS.write_text(json.dumps({"calibration": "wiki.valid.raw 128 x 512", "evaluation": "wiki.test.raw, gptq "
                                   "protocol, seq-len 512, all windows", "threads": args.threads, "results": rows},
                                  indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
