"""Peak memory of ``quantize`` on a synthetic Qwen3-30B-A3B-shaped checkpoint against its size on disk.

The checkpoint (tests/synthetic_checkpoint.py: real config, random bf16 weights, one shard per layer)
is built under --workdir unless --model names one already built. Each method runs in its own process;
peak total, anonymous and file-backed RSS are sampled from /proc (tests/memory_probe.py).
Writes benchmarks/results/memory_scaling.json (quoted in docs/scaling.md).

    python benchmarks/memory_scaling.py --layers 2 [--experts 128] [--methods absmax preset-Q4_K_M gptq calibrate]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quantkit.model.archs import get_arch  # noqa: E402
from tests.memory_probe import measure  # noqa: E402
from tests.synthetic_checkpoint import build  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "memory_scaling.json"
METHODS = {  # the command and its options, by run name
    "absmax": ["quantize", "--method", "absmax", "--bits", "4", "--group-size", "128"],
    "kquant-Q4_K": ["quantize", "--method", "kquant", "--type", "Q4_K"],
    "preset-Q4_K_M": ["quantize", "--preset", "Q4_K_M"],
    "gptq": ["quantize", "--method", "gptq", "--bits", "4", "--group-size", "128", "--num-samples", "16",
             "--seq-len", "256"],
    "calibrate": ["calibrate", "--num-samples", "16", "--seq-len", "256"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="an already built synthetic checkpoint")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=["absmax"])
    parser.add_argument("--workdir", type=Path, default=None, help="where to build (default: a temporary directory)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where to write the results")
    parser.add_argument("--extra", nargs="*", default=[], help="options added to every command, e.g. --max-memory=2GB")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.workdir))
    try:
        model = args.model or build(work / "model", "qwen3-30b-a3b", args.layers, args.experts, args.vocab)
        size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        config = json.loads((model / "config.json").read_text())
        result = {"checkpoint_bytes": size, "layers": config["num_hidden_layers"],
                  "experts": get_arch(config["model_type"]).num_experts(config), "hidden": config["hidden_size"],
                  "runs": {}}
        for method in args.methods:
            out = work / f"out-{method}"
            subcommand, *options = METHODS[method]
            command = [sys.executable, "-c", "from quantkit.cli import app; app()", subcommand, str(model),
                       *options, *args.extra, "--out", str(out)]
            run = measure(command, stdout=sys.stderr)
            run["command"] = " ".join(["quantkit", subcommand, "MODEL", *options, *args.extra])
            run["output_bytes"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
            result["runs"][method] = run
            print(method, run, file=sys.stderr)
            shutil.rmtree(out, ignore_errors=True)
            args.results.write_text(json.dumps(result, indent=2) + "\n")  # after each run: a long job may be cut
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
