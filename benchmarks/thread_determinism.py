"""Which outputs a different torch thread count changes: the same commands at 1, 2 and again 1 thread(s).

For the demo model and ``../shared/models/stories260K`` it runs, in this process, at
``torch.set_num_threads(N)``: ``calibrate``; ``quantize`` with static INT8 activations from that calibration
under each range method (percentile, mse, kl); RTN with MSE and percentile weight clipping; GPTQ (w4, groups
of 32); ``--preset Q4_K_M`` without and with the calibration's importance; ``eval perplexity`` of the GPTQ
output against the float model, and of the float model alone. Every file is hashed (safetensors tensor by
tensor, JSON outputs without ``quantkit.report.volatile``'s fields), and the runs at each thread count are
compared with the first 1-thread run: a second 1-thread run separates a thread-count effect from run-to-run
noise. Results: ``results/thread_determinism*.json`` (one file per invocation), quoted in docs/determinism.md.

    python benchmarks/thread_determinism.py [--models demo stories260K] [--threads 1 2 1] [--steps ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from typer.testing import CliRunner

from quantkit.cli import app
from quantkit.model.checkpoint import DEMO_MODEL_DIR

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_determinism import differences, snapshot  # the test's hashing, not a copy

SHARED = Path(__file__).resolve().parents[2] / "shared"
RESULTS = Path(__file__).parent / "results" / "thread_determinism.json"
MODELS = {
    "demo": (DEMO_MODEL_DIR, SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw", ()),
    "stories260K": (SHARED / "models" / "stories260K", SHARED / "data" / "tinystories" / "tinystories_val.txt",
                    ("--dataset", str(SHARED / "data" / "tinystories" / "tinystories_val.txt"))),
}
WINDOWS = ("--num-samples", "32", "--seq-len", "128")


def commands(model: Path, text: Path, calibration_text: tuple[str, ...], root: Path) -> dict[str, list[str]]:
    """Step name -> CLI arguments, in the order they run (later steps read earlier outputs)."""
    calib = str(root / "calib")
    steps = {"calibrate": ["calibrate", str(model), *calibration_text, *WINDOWS, "--out", calib]}
    for method in ("percentile", "mse", "kl"):
        steps[f"w8a8-static-{method}"] = ["quantize", str(model), "--method", "absmax", "--bits", "8",
                                          "--activations", "static", "--range-method", method,
                                          "--calibration", calib, "--out", str(root / f"w8a8-{method}")]
    steps["zeropoint-w3-g32-mse"] = ["quantize", str(model), "--method", "zeropoint", "--bits", "3", "--group-size",
                                     "32", "--weight-clip", "mse", "--out", str(root / "zeropoint-mse")]
    steps["absmax-w8-percentile"] = ["quantize", str(model), "--method", "absmax", "--bits", "8", "--weight-clip",
                                     "percentile", "--out", str(root / "absmax-percentile")]
    steps["gptq-w4-g32"] = ["quantize", str(model), "--method", "gptq", "--bits", "4", "--group-size", "32",
                            *calibration_text, *WINDOWS, "--out", str(root / "gptq")]
    steps["preset-Q4_K_M"] = ["quantize", str(model), "--preset", "Q4_K_M", "--out", str(root / "q4km")]
    steps["preset-Q4_K_M-importance"] = ["quantize", str(model), "--preset", "Q4_K_M", "--calibration", calib,
                                         "--out", str(root / "q4km-importance")]
    steps["eval-gptq"] = ["eval", "perplexity", str(root / "gptq"), "--base", str(model), "--tokenizer", str(model),
                          "--dataset", str(text), "--seq-len", "256", "--max-windows", "16",
                          "--save", str(root / "eval" / "results.json")]
    steps["eval-float"] = ["eval", "perplexity", str(model), "--dataset", str(text), "--seq-len", "256",
                           "--max-windows", "16", "--save", str(root / "eval-float" / "results.json")]
    return steps


def run_all(name: str, threads: int, root: Path, only: list[str] | None) -> dict[str, Any]:
    """The steps of ``name`` at ``threads`` threads (``only`` these, if given): step -> its outputs' snapshot."""
    model, text, calibration_text = MODELS[name]
    torch.set_num_threads(threads)
    for folder in ("eval", "eval-float"):
        (root / folder).mkdir(parents=True)
    outputs: dict[str, Any] = {}
    for step, args in commands(model, text, calibration_text, root).items():
        if only and step not in only:
            continue
        result = CliRunner().invoke(app, args)
        if result.exit_code != 0:
            raise SystemExit(f"{name} {step} at {threads} thread(s) failed: {result.output[-2000:]}")
        written = Path(args[args.index("--save" if step.startswith("eval") else "--out") + 1])
        outputs[step] = snapshot(written if written.is_dir() else written.parent)
        print(f"{name} threads={threads} {step} done", flush=True)
    return outputs


def compare(first: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Per step: identical, or the files (and tensors) that differ; the eval's numbers side by side."""
    table: dict[str, Any] = {}
    for step in first:
        changed = differences(first[step], other[step])
        table[step] = {"identical": not changed, "differs": changed[:40], "differing": len(changed)}
    for step, key in ((s, k) for s in ("eval-gptq", "eval-float") if s in first for k in ("ppl", "kl")):
        table[step][key] = [run[step]["results.json"][key] for run in (first, other)]
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2, 1])
    parser.add_argument("--steps", nargs="+", help="only these steps (default: all)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    record: dict[str, Any] = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                              "platform": platform.platform(), "threads": args.threads, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            runs = [run_all(name, threads, Path(tmp) / f"{name}-{i}-t{threads}", args.steps)
                    for i, threads in enumerate(args.threads)]
            record["models"][name] = {f"run {i}: {threads} vs {args.threads[0]} thread(s)": compare(runs[0], run)
                                      for i, (threads, run) in enumerate(zip(args.threads, runs, strict=True)) if i}
    args.results.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record["models"], indent=1))


if __name__ == "__main__":
    main()
