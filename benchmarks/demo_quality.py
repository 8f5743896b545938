"""Quality of absmax / zeropoint at 8 and 4 bits (g128) on the demo model, full WikiText-2 test.

gptq protocol, seq-len 512, every window; float baseline plus, per configuration: perplexity,
KL(float || quantized) and top-1 agreement. Writes benchmarks/results/demo_quality.json.

    python benchmarks/demo_quality.py
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from quantkit.api import QuantizeOptions, quantize
from quantkit.eval.run import EvalSettings, run_perplexity
from quantkit.model.checkpoint import DEMO_MODEL_DIR
from quantkit.recipe import get_preset

ROOT = Path(__file__).resolve().parents[1]
WIKI_TEST = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
RESULTS = ROOT / "benchmarks" / "results" / "demo_quality.json"
CONFIGS = {f"{m}-w{b}-g128": {"method": m, "bits": b, "group_size": 128}
           for m in ("absmax", "zeropoint") for b in (8, 4)}


def main() -> None:
    settings = EvalSettings(dataset=str(WIKI_TEST), protocol="gptq", seq_len=512, batch_size=4)
    float_result = run_perplexity(None, settings)
    rows = {"float": {"ppl": float_result["ppl"], "bits_per_weight": None}}
    print(f"float: ppl {float_result['ppl']:.3f} ({float_result['windows']} windows, "
          f"{float_result['tokens_scored']} tokens)")
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in CONFIGS.items():
            out = Path(tmp) / name
            report = quantize(None, get_preset("int8").with_default(**config), out,
                              options=QuantizeOptions(show_progress=False))
            result = run_perplexity(out, settings, base=DEMO_MODEL_DIR)
            rows[name] = {"ppl": result["ppl"], "kl": result["kl"], "top1_agreement": result["top1_agreement"],
                          "bits_per_weight_quantized": report.bits_per_weight(quantized_only=True),
                          "size_mb": report.bytes_after / 2**20}
            print(f"{name}: ppl {result['ppl']:.3f} KL {result['kl']:.5f} top-1 {result['top1_agreement']:.4f} "
                  f"({rows[name]['bits_per_weight_quantized']:.3f} bits/weight on quantized tensors)")
    RESULTS.write_text(json.dumps({"protocol": "gptq", "seq_len": 512, "windows": float_result["windows"],
                                   "tokens_scored": float_result["tokens_scored"], "results": rows},
                                  indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
