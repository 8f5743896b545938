"""Tokens/s of quantkit's perplexity evaluation against a plain transformers loop on the same windows.

The plain loop is what most scripts do: one window at a time, ``model(window, labels=window).loss``
under ``torch.no_grad()``. Both score identical tokens; the perplexities must agree.
Writes benchmarks/results/eval_speed.json (quoted in docs/benchmarks.md).

    python benchmarks/eval_speed.py [MODEL] [--text FILE] [--seq-len 512] [--windows 16]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from quantkit.eval.perplexity import evaluate
from quantkit.eval.run import load_model
from quantkit.eval.windows import make_windows
from quantkit.model.checkpoint import resolve_model_path
from quantkit.model.tokenizer import load_tokenizer
from quantkit.text_sources import load_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "eval_speed.json"


def plain_loop(model: torch.nn.Module, windows: list[torch.Tensor]) -> tuple[float, float]:
    """(ppl, seconds) the way a hand-written script computes it."""
    losses = []
    started = time.perf_counter()
    with torch.no_grad():
        for window in windows:
            losses.append(float(model(window[None], labels=window[None]).loss))
    return math.exp(sum(losses) / len(losses)), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--text", default=str(ROOT.parent / "shared/data/wikitext-2-raw/wiki.test.raw"))
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path)
    ids = torch.tensor(tokenizer(load_text(args.text).text, verbose=False)["input_ids"])
    windows = make_windows(ids, "gptq", args.seq_len)[: args.windows]
    model = load_model(path, torch.float32, "cpu")
    tokens = sum(w.n_scored for w in windows)
    evaluate(model, windows[:1])  # warm-up
    runs = []
    for _ in range(args.repeats):
        ours = evaluate(model, windows, batch_size=args.batch_size)
        plain_ppl, plain_s = plain_loop(model, [w.tokens for w in windows])
        runs.append({"quantkit_s": ours.seconds, "plain_s": plain_s,
                     "quantkit_ppl": ours.model.ppl, "plain_ppl": plain_ppl})
    best_ours = min(r["quantkit_s"] for r in runs)
    best_plain = min(r["plain_s"] for r in runs)
    result = {
        "model": str(path), "text": args.text, "seq_len": args.seq_len, "windows": len(windows),
        "tokens_scored": tokens, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
        "quantkit_tokens_per_s": tokens / best_ours, "plain_tokens_per_s": tokens / best_plain,
        "speedup": best_plain / best_ours, "runs": runs, "torch": torch.__version__,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"quantkit {result['quantkit_tokens_per_s']:.0f} tok/s, plain loop {result['plain_tokens_per_s']:.0f} "
          f"tok/s, speedup {result['speedup']:.2f}x; ppl {runs[-1]['quantkit_ppl']:.4f} vs {runs[-1]['plain_ppl']:.4f}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
