"""Encode throughput per ggml type on a 4096 x 4096 float32 matrix: quantkit vs ggml's C reference.

quantkit's encoders are numpy (one thread); ggml's are ``ggml_quantize_chunk`` of libggml-base
called once over the whole matrix through ctypes (one thread), built by
``python -m tests.ggml_reference build`` (skipped when absent). Both encode the same gaussian
matrix, with and without an importance vector; outputs are compared byte for byte on the way.

    python benchmarks/kquant_speed.py [--size 4096] [--repeats 3] [--types Q4_1 Q5_1]

With ``--types`` only those rows are measured and merged into the results file.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.ggml_reference

from quantkit.kquants import encode  # noqa: E402
from tests.ggml_reference import SDIST_VERSION, reference  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "kquant_speed.json"
TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1")


def best_seconds(run: Any, repeats: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - started)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--types", nargs="+", choices=TYPES, help="measure only these and merge them in")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    matrix = (rng.standard_normal((args.size, args.size)) * 0.02).astype(np.float32)
    importance = rng.lognormal(0, 1.5, args.size).astype(np.float32)
    ref = reference()
    rows: dict[str, dict[str, Any]] = {}
    if args.types and RESULTS.is_file():
        rows = json.loads(RESULTS.read_text())["results"]
    n = matrix.size
    for type_name in args.types or TYPES:
        for label, weights in (("ref", None), ("imatrix", importance)):
            ours_s, ours = best_seconds(lambda t=type_name, w=weights: encode(t, matrix, w), args.repeats)
            row: dict[str, Any] = {"quantkit_weights_per_s": n / ours_s, "quantkit_seconds": ours_s}
            if ref is not None:
                c_s, theirs = best_seconds(lambda t=type_name, w=weights: ref.quantize(t, matrix, w), args.repeats)
                row.update(c_weights_per_s=n / c_s, c_seconds=c_s, ratio_c_faster=ours_s / c_s,
                           bytes_equal=bool(np.array_equal(ours, theirs)))
            rows[f"{type_name}/{label}"] = row
            print(type_name, label, {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()},
                  flush=True)
    RESULTS.write_text(json.dumps({
        "matrix": f"{args.size}x{args.size} float32, gaussian sigma 0.02; importance lognormal(0, 1.5)",
        "threads": 1, "repeats": args.repeats, "machine": platform.processor() or platform.machine(),
        "numpy": np.__version__, "results": rows,
        "c_reference": f"libggml-base, llama-cpp-python {SDIST_VERSION} sdist" if ref else None}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
