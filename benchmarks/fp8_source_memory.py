"""Peak memory of ``quantize`` on an FP8 checkpoint vs its BF16 twin: the FP8 source is never held whole in bf16.

A DeepSeek-V3-shaped model (hidden 1024, 6 layers, 16 routed experts of 512, kv_a_proj rows 288 so its
last row block is partial; random weights) is written twice: in DeepSeek's FP8 layout (float8_e4m3fn
decoder linears in 128x128 blocks with float32 ``_scale_inv``, the rest bf16) and as its BF16 conversion.
Each ``quantkit quantize`` runs in its own process (absmax int4 g128 to compressed-tensors, and Q8_0 to
GGUF); the peak RSS is the report's ``peak_rss_mb`` (ru_maxrss). The outputs of both sources are also
compared byte for byte.

Writes benchmarks/results/fp8_source_memory.json (quoted in docs/benchmarks.md).

    python benchmarks/fp8_source_memory.py [--experts 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "fp8_source_memory.json"
BLOCK = (128, 128)
SHARD_BYTES = 256 * 2**20
RUNS = {
    "absmax-w4-g128": ("--method", "absmax", "--bits", "4", "--group-size", "128"),
    "gguf-Q8_0": ("--method", "kquant", "--type", "Q8_0", "--format", "gguf"),
}


def config(experts: int) -> dict[str, object]:
    return dict(model_type="deepseek_v3", hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
                num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8, vocab_size=8192,
                n_routed_experts=experts, num_experts_per_tok=4, n_shared_experts=1, first_k_dense_replace=1,
                n_group=4, topk_group=2, kv_lora_rank=256, q_lora_rank=None, qk_rope_head_dim=32,
                qk_nope_head_dim=64, v_head_dim=64, max_position_embeddings=512, tie_word_embeddings=False)


def disk_shapes(cfg: dict[str, object]) -> dict[str, tuple[int, ...]]:
    import transformers

    from quantkit.model.archs import get_arch

    model_config = transformers.AutoConfig.for_model(**cfg)
    with torch.device("meta"), contextlib.redirect_stderr(io.StringIO()):
        model = transformers.AutoModelForCausalLM.from_config(model_config)
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    return get_arch("deepseek_v3").disk_shapes(shapes)


def to_fp8_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """amax / 448 per 128x128 block (partial at the edges), as DeepSeek's checkpoints are made."""
    rows, cols = weight.shape
    r, c = math.ceil(rows / BLOCK[0]), math.ceil(cols / BLOCK[1])
    padded = torch.zeros(r * BLOCK[0], c * BLOCK[1])
    padded[:rows, :cols] = weight
    blocks = padded.reshape(r, BLOCK[0], c, BLOCK[1])
    scale = blocks.abs().amax(dim=(1, 3)) / 448
    codes = (blocks / scale[:, None, :, None]).reshape(r * BLOCK[0], c * BLOCK[1])[:rows, :cols]
    return codes.to(torch.float8_e4m3fn).contiguous(), scale


def write_pair(root: Path, experts: int) -> tuple[Path, Path]:
    cfg = config(experts)
    fp8_dir, bf16_dir = root / "fp8" / "model", root / "bf16" / "model"
    shards: dict[Path, list[dict[str, torch.Tensor]]] = {fp8_dir: [{}], bf16_dir: [{}]}
    torch.manual_seed(0)
    for name, shape in sorted(disk_shapes(cfg).items()):
        tensor = torch.randn(shape) * 0.05 if len(shape) == 2 else torch.ones(shape)
        if name.startswith("model.layers.") and name.endswith(("_proj.weight", "_proj_with_mqa.weight")):
            codes, scale = to_fp8_blocks(tensor)
            per_element = scale.repeat_interleave(BLOCK[0], 0)[:shape[0]].repeat_interleave(BLOCK[1], 1)
            _add(shards[fp8_dir], {name: codes, f"{name}_scale_inv": scale}, fp8_dir)
            _add(shards[bf16_dir], {name: (codes.float() * per_element[:, :shape[1]]).to(torch.bfloat16)}, bf16_dir)
        else:
            _add(shards[fp8_dir], {name: tensor.to(torch.bfloat16)}, fp8_dir)
            _add(shards[bf16_dir], {name: tensor.to(torch.bfloat16)}, bf16_dir)
    for directory in (fp8_dir, bf16_dir):
        _add(shards[directory], {}, directory, flush=True)
        quant = {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": list(BLOCK)}} if directory == fp8_dir else {}
        (directory / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "bfloat16", **quant}))
    return fp8_dir, bf16_dir


def _add(pending: list[dict[str, torch.Tensor]], tensors: dict[str, torch.Tensor], directory: Path,
         flush: bool = False) -> None:
    """Collect tensors into shards of about SHARD_BYTES (written as they fill), then the index."""
    pending[-1].update(tensors)
    if flush or sum(t.nbytes for t in pending[-1].values()) >= SHARD_BYTES:
        directory.mkdir(parents=True, exist_ok=True)
        if pending[-1]:
            save_file(pending[-1], str(directory / f"model-{len(pending):05d}.safetensors"), metadata={"format": "pt"})
            pending[-1] = {name: torch.empty(0) for name in pending[-1]}  # keep the names for the index
            pending.append({})
    if flush:
        weight_map = {n: f"model-{i + 1:05d}.safetensors" for i, shard in enumerate(pending) for n in shard}
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def quantize(model: Path, args: tuple[str, ...], out: Path, threads: int) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", "from quantkit.cli import app; app()", "quantize", str(model), *args,
               "--out", str(out), "--json"]
    subprocess.run(command, check=True, env=env, capture_output=True)
    report_file = out.with_name(out.stem + ".quantkit_report.json") if out.suffix == ".gguf" else \
        out / "quantkit_report.json"
    report = json.loads(report_file.read_text())["totals"]
    files = [out] if out.is_file() else sorted(p for p in out.iterdir() if p.name != "quantkit_report.json")
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()
    return {"peak_rss_mb": round(report["peak_rss_mb"]), "seconds": round(report["wall_time_s"], 1),
            "sha256": digest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        fp8_dir, bf16_dir = write_pair(Path(tmp), args.experts)
        sizes = {kind: sum(p.stat().st_size for p in d.glob("*.safetensors")) / 2**20
                 for kind, d in (("fp8", fp8_dir), ("bf16", bf16_dir))}
        results: dict[str, dict[str, object]] = {}
        for run, run_args in RUNS.items():
            suffix = ".gguf" if "gguf" in run else ""
            rows = {kind: quantize(d, run_args, Path(tmp) / f"{run}-{kind}{suffix}", args.threads)
                    for kind, d in (("fp8", fp8_dir), ("bf16", bf16_dir))}
            results[run] = {**rows, "identical": rows["fp8"]["sha256"] == rows["bf16"]["sha256"]}
            print(run, results[run], flush=True)
    RESULTS.write_text(json.dumps({
        "model": {**config(args.experts), "checkpoint_mb": {k: round(v) for k, v in sizes.items()}},
        "threads": args.threads, "torch": torch.__version__, "runs": results,
    }, indent=1) + "\n")


if __name__ == "__main__":
    main()
