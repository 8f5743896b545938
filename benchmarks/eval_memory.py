"""Peak memory and speed of ``eval perplexity`` on a 49k-vocabulary model: logits in chunks vs whole windows.

A SmolLM-135M-shaped Llama (hidden 576, 30 layers, vocabulary 49,152; random weights, float32, 0.54 GB)
is built from its config with stories260K's tokenizer. Each variant runs in its own process, on the
same windows of WikiText-2 test (gptq protocol, seq-len 512, batch 4), alternating, the fastest of each kept:

- ``chunked``: quantkit as it is (the head on LOGIT_CHUNK positions at a time);
- ``whole``: quantkit with the whole window's logits at once (what it did before);
- ``plain``: a hand-written transformers loop, ``model(w, labels=w).loss`` per window under ``no_grad``.

Writes benchmarks/results/eval_memory.json (quoted in docs/benchmarks.md).

    python benchmarks/eval_memory.py [--windows 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "eval_memory.json"
SHARED = ROOT.parent / "shared"
CONFIG = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
              num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=10000.0)

VARIANT = r"""
import json, math, resource, sys, time
import torch
torch.set_num_threads(int(sys.argv[4]))
from quantkit.eval import perplexity
from quantkit.eval.run import load_model
from quantkit.eval.windows import make_windows
from quantkit.model.tokenizer import load_tokenizer
from quantkit.text_sources import load_text

from pathlib import Path
variant, model_dir, n_windows = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
tokenizer = load_tokenizer(model_dir)
ids = torch.tensor(tokenizer(load_text(sys.argv[5]).text[:400_000], verbose=False)["input_ids"])
windows = make_windows(ids, "gptq", 512)[:n_windows]
model = load_model(model_dir, torch.float32, "cpu")
loaded_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
if variant == "whole":
    perplexity.LOGIT_CHUNK = 10**9
started = time.perf_counter()
if variant == "plain":
    with torch.no_grad():
        losses = [float(model(w.tokens[None], labels=w.tokens[None]).loss) for w in windows]
    ppl = math.exp(sum(losses) / len(losses))
else:
    ppl = perplexity.evaluate(model, windows, batch_size=4).model.ppl
seconds = time.perf_counter() - started
tokens = sum(w.n_scored for w in windows)
print(json.dumps({"variant": variant, "ppl": ppl, "seconds": seconds, "tokens_per_s": tokens / seconds,
                  "loaded_rss_mb": loaded_mb,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def build_model(directory: Path) -> float:
    """The 49k-vocabulary model with stories260K's tokenizer; its float32 size in MB."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model("llama", **CONFIG)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        source = SHARED / "models" / "stories260K" / name
        if source.is_file():
            shutil.copy2(source, directory / name)
    return sum(p.numel() * 4 for p in model.parameters()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--text", default=str(SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "smollm-shaped"
        model_mb = build_model(model_dir)
        runs = []
        for variant in ("chunked", "plain", "whole", "chunked", "plain"):  # alternated: the machine is shared
            out = subprocess.run([sys.executable, "-c", VARIANT, variant, str(model_dir), str(args.windows),
                                  str(args.threads), args.text], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{variant} failed:\n{out.stderr[-2000:]}")
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(runs[-1])
    best = {v: min((r for r in runs if r["variant"] == v), key=lambda r: r["seconds"]) for v in ("chunked", "whole",
                                                                                               "plain")}
    result = {"model": "llama, SmolLM-135M shape, random weights", "config": CONFIG, "model_float32_mb": model_mb,
              "windows": args.windows, "seq_len": 512, "batch_size": 4, "threads": args.threads, "best": best,
              "runs": runs}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
