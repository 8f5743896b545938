"""Where the time of a whole ``quantkit quantize --method gptq`` on stories260K goes, in CPU seconds on one thread.

A fresh process imports what the run needs (torch, transformers and the model's modeling module, quantkit's
CLI and API) and times that; then it profiles the CLI command with ``cProfile`` on CPU time (so other load on
the machine does not count) and splits it into the phases below by the cumulative time of the functions
that do them. Calibration text: the first half of TinyStories ``tinystories_val.txt``, as
``gptq_vs_reference.py`` uses; 128 windows of 256 tokens, w4 g48, one torch thread. cProfile's own overhead
lands mostly in Python-heavy phases; the unprofiled run's CPU time is recorded beside it.
Results: ``results/gptq_profile.json``.

    python benchmarks/gptq_profile.py [--num-samples 128] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "stories260K"
TEXT = SHARED / "data" / "tinystories" / "tinystories_val.txt"
RESULTS = Path(__file__).parent / "results" / "gptq_profile.json"
# phase -> the functions (file suffix, name) whose cumulative time is that phase
PHASES: dict[str, list[tuple[str, str]]] = {
    "plan (config checks, the model's skeleton on the meta device)": [("quantkit/plan.py", "make_plan")],
    "calibration text: read, tokenize, draw windows": [("quantkit/calib/run.py", "windows_for")],
    "embeddings (capture the first layer's inputs)": [("quantkit/pipeline.py", "capture")],
    "load decoder layers": [("quantkit/pipeline.py", "load_layer")],
    "forward passes that feed Hessians": [("quantkit/gptq/sequential.py", "hessians")],
    "  of which Hessian accumulation (x^T x)": [("quantkit/gptq/hessian.py", "add")],
    "forward passes: site order and stage probe (first batch) + quantized layer outputs": [
        ("quantkit/gptq/sequential.py", "_first_batch"), ("quantkit/gptq/sequential.py", "_quantized_outputs")],
    "GPTQ solves": [("quantkit/gptq/sequential.py", "solve_linears")],
    "encode and write tensors": [("quantkit/api.py", "_write_tensor"), ("quantkit/formats/sharded.py", "finish")],
    "report (JSON and summary table)": [("quantkit/report/report.py", "write"),
                                        ("quantkit/report/report.py", "print_summary")],
}
CHILD = """
import time
start = time.process_time()
import torch, transformers
from transformers.models.llama import modeling_llama
import quantkit.api, quantkit.cli
imported = time.process_time() - start
import cProfile, json, pstats, sys
torch.set_num_threads(1)
profile = cProfile.Profile(time.process_time)
profile.enable()
try:
    quantkit.cli.app(sys.argv[2:], standalone_mode=False)
finally:
    profile.disable()
run = time.process_time() - start - imported
profile.dump_stats(sys.argv[1])
print(json.dumps({"imports": imported, "run": run}))
"""


def child(args: list[str], profile: Path | None, env: dict[str, str]) -> dict[str, float]:
    """CPU seconds of imports and of the run in a fresh process (profiled when ``profile`` is given)."""
    code = CHILD if profile else CHILD.replace("profile.enable()", "").replace("profile.dump_stats(sys.argv[1])", "")
    done = subprocess.run([sys.executable, "-c", code, str(profile or os.devnull), *args], env=env, check=True,
                          capture_output=True, text=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def phases(profile: Path) -> dict[str, float]:
    """Cumulative CPU seconds per phase, from the profile."""
    import pstats

    stats: dict[Any, Any] = pstats.Stats(str(profile)).stats  # type: ignore[attr-defined]
    cumulative = {(file, name): entry[3] for (file, _line, name), entry in stats.items()}
    return {phase: round(sum(t for (file, name), t in cumulative.items()
                             if any(file.endswith(suffix) and name == fn for suffix, fn in functions)), 3)
            for phase, functions in PHASES.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not MODEL.is_dir() or not TEXT.is_file():
        sys.exit(f"{MODEL} or {TEXT} not found: this benchmark needs ../shared beside the repo")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    with tempfile.TemporaryDirectory() as tmp:
        text = TEXT.read_text()
        calibration = Path(tmp) / "calibration.txt"
        calibration.write_text(text[:text.index("\n\n", len(text) // 2) + 2])
        command = ["quantize", str(MODEL), "--method", "gptq", "--bits", "4", "--group-size", "48", "--dataset",
                   str(calibration), "--num-samples", str(args.num_samples), "--seq-len", str(args.seq_len)]
        plain = child([*command, "--out", str(Path(tmp) / "plain")], None, env)
        profiled = child([*command, "--out", str(Path(tmp) / "profiled")], Path(tmp) / "run.prof", env)
        split = phases(Path(tmp) / "run.prof")
    top_level = sum(t for phase, t in split.items() if not phase.startswith(" "))
    record = {
        "command": " ".join(command).replace(str(calibration), "<first half of tinystories_val.txt>"),
        "cpu_seconds_unprofiled": {k: round(v, 3) for k, v in plain.items()},
        "cpu_seconds_profiled": {k: round(v, 3) for k, v in profiled.items()},
        "phases_profiled": {**split, "other": round(profiled["run"] - top_level, 3)},
        "max_rss_children_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
    }
    args.results.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
