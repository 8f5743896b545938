"""GPTQ's forward passes per layer: one per site (before), merged stages (the default), --no-true-sequential.

Per model and setting, each mode quantizes once (same windows, same seed) and is scored against the
float model on held-out text: perplexity, KL(float || quantized), top-1 agreement; plus the quantize
wall and CPU time (one torch thread: CPU seconds stay comparable on a shared machine), the GPTQ
layers' wall seconds, and the passes over all calibration batches per layer (Hessian
passes plus the one for the layer's quantized outputs; the first-batch probes of merging are not
counted, their time is in the seconds). "per-site" is the merged code with ``merge_passes=False``: the
same results bit for bit (checked here on the saved weights), one pass per site as before issue 16.

- demo: the embedded DeepSeek-V3-style model (MLA with a q LoRA, shared expert, 16 routed experts);
  calibration WikiText-2 valid, 128 x 512 tokens; evaluation the first ``--eval-windows`` 512-token
  windows of WikiText-2 test (gptq protocol).
- stories260K (../shared/models, a dense Llama): calibration the first half of TinyStories
  ``tinystories_val.txt``, 128 x 256 tokens; evaluation the first windows of the second half.
- qwen3-small-moe: tests/synthetic_checkpoint.py's ``small-moe`` (Qwen3-MoE layout, hidden 1024, here 16
  experts of width 512, top-4, 2 layers, random bf16 weights), calibration 32 x 256 tokens of the same text.

    nice -n 10 python benchmarks/gptq_passes.py [--models demo stories260K] [--seeds 0 1] [--modes merged ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.synthetic_checkpoint

from quantkit.api import CalibrationSettings, QuantizeOptions, quantize
from quantkit.eval.perplexity import evaluate
from quantkit.eval.run import load_model
from quantkit.eval.windows import Window, make_windows
from quantkit.gptq import sequential
from quantkit.model.checkpoint import DEMO_MODEL_DIR
from quantkit.model.tokenizer import load_tokenizer
from quantkit.recipe import get_preset
from tests.synthetic_checkpoint import build

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
RESULTS = ROOT / "benchmarks" / "results" / "gptq_passes.json"
MODES = ("per-site", "merged", "no-true-sequential")
SETTINGS = {"demo": [(4, 128)], "stories260K": [(4, 32), (3, 32)], "qwen3-small-moe": [(4, 128)]}


def data_for(model: str, folder: Path) -> tuple[Path, Path, CalibrationSettings]:
    """(model directory, held-out text, calibration windows) for ``model``."""
    if model == "demo":
        wiki = SHARED / "data" / "wikitext-2-raw"
        return DEMO_MODEL_DIR, wiki / "wiki.test.raw", CalibrationSettings(
            dataset=str(wiki / "wiki.valid.raw"), num_samples=128, seq_len=512)
    text = (SHARED / "data" / "tinystories" / "tinystories_val.txt").read_text()
    cut = text.index("\n\n", len(text) // 2) + 2  # a story boundary near the middle
    (folder / "calibration.txt").write_text(text[:cut])
    (folder / "held_out.txt").write_text(text[cut:])
    if model == "qwen3-small-moe":  # random weights: time and passes; KL only says how far from float
        return build(folder / model, "small-moe", layers=2, experts=16), folder / "held_out.txt", \
            CalibrationSettings(dataset=str(folder / "calibration.txt"), num_samples=32, seq_len=256)
    return SHARED / "models" / "stories260K", folder / "held_out.txt", CalibrationSettings(
        dataset=str(folder / "calibration.txt"), num_samples=128, seq_len=256)


def eval_windows(model_dir: Path, held_out: Path, count: int) -> list[Window]:
    tokenizer = load_tokenizer(model_dir)
    ids = torch.tensor(tokenizer(held_out.read_text(), verbose=False)["input_ids"], dtype=torch.long)
    return make_windows(ids, "gptq", 512)[:count]


def run_mode(mode: str, model_dir: Path, bits: int, group: int, data: CalibrationSettings,
             out: Path) -> dict[str, Any]:
    """One quantize run in ``mode``: seconds and passes per layer."""
    layers: list[sequential.LayerResult] = []

    def recording(*args: Any, **kwargs: Any) -> Iterator[sequential.LayerResult]:
        for layer in sequential.gptq_layers(*args, **kwargs, merge_passes=mode != "per-site"):
            layers.append(layer)
            yield layer

    options = QuantizeOptions(data=data, show_progress=False, overwrite=True,
                              true_sequential=mode != "no-true-sequential")
    recipe = get_preset("int8").with_default(method="gptq", bits=bits, group_size=group)
    started, cpu = time.perf_counter(), time.process_time()
    with mock.patch("quantkit.api.gptq_layers", recording):
        quantize(model_dir, recipe, out, options=options)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    decoder = [layer for layer in layers if layer.stages]
    return {"quantize_seconds": round(seconds, 2), "quantize_cpu_seconds": round(cpu, 2),
            "gptq_seconds": round(sum(layer.seconds for layer in layers), 2),
            "passes_per_layer": [layer.passes for layer in decoder],
            "stages_per_layer": [len(layer.stages) for layer in decoder]}


def summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Means over seeds per model, bits and mode."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(f"{row['model']} w{row['bits']} g{row['group_size']} {row['mode']}", []).append(row)
    keys = ("quantize_cpu_seconds", "delta_ppl", "kl", "top1")
    return {name: {"runs": len(group), **{k: statistics.fmean(r[k] for r in group) for k in keys}}
            for name, group in groups.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="calibration window seeds")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    floats: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            model_dir, held_out, data = data_for(model, Path(tmp))
            windows = eval_windows(model_dir, held_out, args.eval_windows)
            float_model = load_model(model_dir, torch.float32, "cpu")
            floats[model] = evaluate(float_model, windows, batch_size=8).model.ppl
            for (bits, group), seed in itertools.product(SETTINGS[model], args.seeds):
                weights: dict[str, dict[str, torch.Tensor]] = {}
                for mode in args.modes:
                    out = Path(tmp) / mode
                    row = {"model": model, "bits": bits, "group_size": group, "seed": seed, "mode": mode,
                           **run_mode(mode, model_dir, bits, group, dataclasses.replace(data, seed=seed), out)}
                    quantized = load_model(out, torch.float32, "cpu")
                    weights[mode] = {k: v.clone() for k, v in quantized.state_dict().items()}
                    result = evaluate(quantized, windows, base=float_model, batch_size=8)
                    row.update(ppl=result.model.ppl, delta_ppl=result.model.ppl - floats[model], kl=result.kl,
                               top1=result.top1_agreement)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                if "per-site" in weights and "merged" in weights:
                    rows[-len(args.modes) + args.modes.index("merged")]["identical_to_per_site"] = all(
                        torch.equal(weights["per-site"][k], weights["merged"][k]) for k in weights["merged"])
    args.results.write_text(json.dumps({
        "threads": args.threads, "eval_windows": args.eval_windows, "float_ppl": floats, "seeds": args.seeds,
        "summary": summary(rows),
        "calibration": {"demo": "wiki.valid.raw, 128 x 512", "stories260K": "tinystories_val first half, 128 x 256"},
        "runs": rows,
    }, indent=2) + "\n")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
