"""GPTQ's time: quantkit against the IST-DASLab reference on stories260K, side by side in one run, and the demo model.

Per seed, on one torch thread: quantkit's ``quantize`` (``--method gptq --bits 4 --group-size 48``, 128 windows
of 256 tokens from the first half of TinyStories ``tinystories_val.txt``, batches of 4) and the reference's
``llama_sequential --true-sequential`` on the same ``input_ids`` (:func:`gptq_vs_reference.reference_sequential`:
the reference's ``GPTQ``/``Quantizer`` driven on the CPU), both then scored on the first ``--eval-windows``
held-out 512-token windows (perplexity, KL against the float model). Times are CPU seconds
(``time.process_time``: the machine's other load does not count) and wall seconds of the quantization alone
(not loading the model or imports); each side first runs once untimed, so lazy imports and first calls count
for neither.

quantkit runs in a child process per checkout: this repository, and with ``--baseline ROOT`` another
checkout (e.g. one before a speed change) in the same run; the reference runs in this process. Every
quantkit output must be identical across checkouts (sha256 of its tensors) unless ``--allow-different``.

``--demo`` instead times the whole CLI ``quantkit quantize --method gptq`` on the bundled demo model with its
embedded default calibration, per checkout: the child process's CPU seconds (imports included) and wall.

    python benchmarks/gptq_speed.py --reference DIR [--baseline ROOT] [--seeds 0 1 2]
    python benchmarks/gptq_speed.py --demo [--baseline ROOT]
Results: ``results/gptq_speed.json``, with ``--demo`` ``results/gptq_speed_demo.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from gptq_vs_reference import (
    MODEL,
    REFERENCE_ENV,
    cpu_only_reference,
    eval_windows,
    import_reference,
    reference_commit,
    reference_sequential,
    scores,
    split_text,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "gptq_speed.json"
DEMO_RESULTS = ROOT / "benchmarks" / "results" / "gptq_speed_demo.json"
BITS, GROUP = 4, 48
CHILD = """
import hashlib, json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from quantkit.api import CalibrationSettings, QuantizeOptions, quantize
from quantkit.recipe import get_preset
model, calibration, out, num_samples, seq_len, batch, bits, group, *seeds = sys.argv[1:]
recipe = get_preset("int8").with_default(method="gptq", bits=int(bits), group_size=int(group))
def run(seed, folder):
    data = CalibrationSettings(dataset=calibration, num_samples=int(num_samples), seq_len=int(seq_len), seed=seed,
                               batch_size=int(batch))
    cpu, wall = time.process_time(), time.perf_counter()
    quantize(model, recipe, folder, options=QuantizeOptions(data=data, show_progress=False, overwrite=True))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.glob("*.safetensors")))).hexdigest()
    return {"seed": seed, "cpu_s": round(cpu, 3), "wall_s": round(wall, 3), "sha256": digest}
run(int(seeds[0]), Path(out) / "warmup")
print(json.dumps([run(int(seed), Path(out) / f"seed{seed}") for seed in seeds]))
"""


def quantkit_runs(root: Path, calibration: Path, out: Path, seeds: list[int], args: argparse.Namespace) -> list[Any]:
    """quantkit from the checkout at ``root``, timed per seed in a child process; outputs in ``out/seed<N>``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", CHILD, str(MODEL), str(calibration), str(out), str(args.num_samples),
                           str(args.seq_len), str(args.batch_size), str(BITS), str(GROUP), *map(str, seeds)],
                          env=env, check=True, capture_output=True, text=True)
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


def demo_run(root: Path, out: Path) -> dict[str, float]:
    """The CLI's ``quantize --method gptq`` on the demo model from ``root``: CPU seconds (imports included), wall."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "from quantkit.cli import app; app()", "quantize", "--method", "gptq",
                    "--out", str(out)], env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"cpu_s": round(cpu, 2), "wall_s": round(wall, 2)}


def mean(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.fmean(row[key] for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", default=os.environ.get(REFERENCE_ENV), help="IST-DASLab/gptq checkout")
    parser.add_argument("--baseline", type=Path, help="another quantkit checkout to time in the same run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4, help="quantkit's calibration batch")
    parser.add_argument("--eval-windows", type=int, default=128)
    parser.add_argument("--demo", action="store_true", help="time the CLI on the demo model instead")
    parser.add_argument("--allow-different", action="store_true", help="checkouts may give different outputs")
    parser.add_argument("--results", type=Path)
    args = parser.parse_args()
    checkouts = {"quantkit": ROOT, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    if args.demo:
        with tempfile.TemporaryDirectory() as tmp:
            demo = {name: demo_run(root, Path(tmp) / f"demo-{name}") for name, root in checkouts.items()}
        (args.results or DEMO_RESULTS).write_text(json.dumps({
            "command": "quantkit quantize --method gptq (the demo model, its default calibration), one thread",
            "baseline": str(args.baseline) if args.baseline else None, "load_average_at_end": os.getloadavg(),
            "runs": demo}, indent=1) + "\n")
        print(json.dumps(demo))
        return
    gptq, quant = import_reference(args.reference)
    torch.set_num_threads(1)
    from quantkit.api import CalibrationSettings
    from quantkit.calib.run import windows_for
    from quantkit.eval.run import load_model
    from quantkit.model.checkpoint import Checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        calibration, held_out = split_text(Path(tmp))
        runs = {name: quantkit_runs(root, calibration, Path(tmp) / name, args.seeds, args)
                for name, root in checkouts.items()}
        if args.baseline and not args.allow_different:
            for ours, theirs in zip(runs["quantkit"], runs["baseline"], strict=True):
                if ours["sha256"] != theirs["sha256"]:
                    sys.exit(f"seed {ours['seed']}: the checkouts' outputs differ")
        windows = eval_windows(held_out, args.eval_windows)
        float_model = load_model(MODEL, torch.float32, "cpu")
        checkpoint = Checkpoint.open(MODEL)
        for row in runs["quantkit"]:
            row.update(scores(load_model(Path(tmp) / "quantkit" / f"seed{row['seed']}", torch.float32, "cpu"),
                              float_model, windows))
        reference: list[dict[str, Any]] = []
        for i, seed in enumerate([args.seeds[0], *args.seeds]):  # the first: the untimed warm-up
            data = CalibrationSettings(dataset=str(calibration), num_samples=args.num_samples, seq_len=args.seq_len,
                                       seed=seed)
            model = copy.deepcopy(float_model)
            cpu, wall = time.process_time(), time.perf_counter()
            with cpu_only_reference():
                reference_sequential(model, windows_for(checkpoint, data).input_ids, BITS, GROUP, False, gptq, quant)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            if i:
                reference.append({"seed": seed, "cpu_s": round(cpu, 3), "wall_s": round(wall, 3),
                                  **scores(model, float_model, windows)})
    summary = {name: {"cpu_s": mean(rows, "cpu_s"), "wall_s": mean(rows, "wall_s")}
               for name, rows in {**runs, "reference": reference}.items()}
    for name in runs:
        summary[name]["cpu_ratio_to_reference"] = summary[name]["cpu_s"] / summary["reference"]["cpu_s"]
        summary[name]["wall_ratio_to_reference"] = summary[name]["wall_s"] / summary["reference"]["wall_s"]
    for name, rows in (("quantkit", runs["quantkit"]), ("reference", reference)):
        summary[name].update(ppl=mean(rows, "ppl"), kl=mean(rows, "kl"))
    record = {
        "model": "stories260K", "setting": f"w{BITS}-g{GROUP}, zero-point, act-order off, one torch thread",
        "calibration": f"tinystories_val.txt first half, {args.num_samples} x {args.seq_len} tokens per seed, "
        f"quantkit batches of {args.batch_size}, the reference one window per forward",
        "evaluation": f"tinystories_val.txt second half, gptq protocol, {len(windows)} windows of 512 tokens",
        "seeds": args.seeds, "reference": reference_commit(args.reference),
        "baseline": str(args.baseline) if args.baseline else None,
        "load_average_at_end": os.getloadavg(), "summary": summary,
        "runs": {**runs, "reference": reference},
    }
    (args.results or RESULTS).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record["summary"], indent=1))


if __name__ == "__main__":
    main()
