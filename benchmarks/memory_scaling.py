"""Peak memory of ``quantize`` on a synthetic Qwen3-30B-A3B-shaped checkpoint against its size on disk.

The checkpoint (tests/synthetic_checkpoint.py: real config, random bf16 weights, one shard per layer)
is built under --workdir unless --model names one already built. Each method runs in its own process;
peak total, anonymous and file-backed RSS are sampled from /proc (tests/memory_probe.py).
Writes benchmarks/results/memory_scaling.json (quoted in docs/scaling.md).

    python benchmarks/memory_scaling.py --layers 2 [--experts 128] [--methods absmax kquant-Q4_K]
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
METHODS = {
    "absmax": ["--method", "absmax", "--bits", "4", "--group-size", "128"],
    "kquant-Q4_K": ["--method", "kquant", "--type", "Q4_K"],
    "gptq": ["--method", "gptq", "--bits", "4", "--group-size", "128", "--num-samples", "16", "--seq-len", "256"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="an already built synthetic checkpoint")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=["absmax"])
    parser.add_argument("--workdir", type=Path, default=None, help="where to build (default: a temporary directory)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.workdir))
    try:
        model = args.model or build(work / "model", "qwen3-30b-a3b", args.layers, args.experts, args.vocab)
        size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        runs = {}
        for method in args.methods:
            out = work / f"out-{method}"
            command = [sys.executable, "-c", "from quantkit.cli import app; app()", "quantize", str(model),
                       *METHODS[method], "--out", str(out)]
            runs[method] = measure(command, stdout=sys.stderr)
            print(method, runs[method], file=sys.stderr)
            shutil.rmtree(out, ignore_errors=True)
        config = json.loads((model / "config.json").read_text())
        result = {"checkpoint_bytes": size, "layers": config["num_hidden_layers"],
                  "experts": get_arch(config["model_type"]).num_experts(config), "hidden": config["hidden_size"],
                  "runs": runs}
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
