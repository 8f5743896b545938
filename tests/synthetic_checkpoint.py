"""Synthetic checkpoints with real configs and random weights, written shard by shard (never committed).

Shapes come from the architecture's config; tensor names and per-expert layout from quantkit's own
architecture description (what real checkpoints hold on disk). Writing keeps one decoder layer in
memory, so a checkpoint larger than RAM can be built. Presets:

- ``qwen3-30b-a3b``: Qwen3-30B-A3B's layer (hidden 2048, 128 experts of width 768, top-8), bf16;
- ``deepseek-v3``: DeepSeek-V3's layer shape scaled in expert count (MLA, one shared expert, dense first layer).

``--fp8`` writes the official DeepSeek-V3 FP8 layout: every decoder linear (not the router) as
``float8_e4m3fn`` in 128x128 blocks with a float32 ``<name>_scale_inv`` (block amax / 448), and the fp8
``quantization_config`` in config.json.

    python -m tests.synthetic_checkpoint OUT --preset qwen3-30b-a3b --layers 2 [--experts 32] [--fp8]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from quantkit.model.archs import get_arch

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT.parent / "shared" / "models" / "stories260K"

PRESETS: dict[str, dict[str, Any]] = {
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_experts=128, num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        vocab_size=151936, max_position_embeddings=4096, rope_theta=1000000.0, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
    ),
    "small-moe": dict(  # the test suite's: Qwen3-MoE layout at 1/2 width, 32 experts of width 512
        model_type="qwen3_moe", hidden_size=1024, intermediate_size=2048, moe_intermediate_size=512,
        num_experts=32, num_experts_per_tok=4, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
        vocab_size=512, max_position_embeddings=1024, rope_theta=1000000.0, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
    ),
    "deepseek-v3": dict(
        model_type="deepseek_v3", hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
        first_k_dense_replace=1, num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, vocab_size=129280,
        max_position_embeddings=4096, tie_word_embeddings=False,
    ),
}
EXPERT_KEYS = {"qwen3_moe": "num_experts", "deepseek_v3": "n_routed_experts"}
FP8_BLOCK = (128, 128)
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
              "weight_block_size": list(FP8_BLOCK)}
FP8_MAX = 448.0  # the largest float8_e4m3fn


def build(out: Path, preset: str, layers: int, experts: int | None = None, vocab: int | None = None,
          seed: int = 0, dtype: torch.dtype = torch.bfloat16, fp8: bool = False) -> Path:
    """Write a checkpoint of ``layers`` decoder layers to ``out``: one shard per decoder layer plus one for the rest.

    With ``fp8`` the decoder linears are written in DeepSeek-V3's block-scaled FP8 layout (module docstring).
    """
    import transformers

    settings = dict(PRESETS[preset])
    model_type = settings.pop("model_type")
    settings["num_hidden_layers"] = layers
    if experts is not None:
        settings[EXPERT_KEYS[model_type]] = experts
        if model_type == "deepseek_v3":
            settings["n_group"] = settings["topk_group"] = 1
    if vocab is not None:
        settings["vocab_size"] = vocab
    transformers.logging.set_verbosity_error()
    config = transformers.AutoConfig.for_model(model_type, **settings)
    with contextlib.redirect_stderr(io.StringIO()), torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    arch = get_arch(model_type)
    shapes = arch.disk_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()})
    out.mkdir(parents=True, exist_ok=False)
    if fp8:
        config.quantization_config = FP8_CONFIG
    config.save_pretrained(out)
    groups: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, shape in shapes.items():
        match = re.search(r"\.layers\.(\d+)\.", name)
        groups.setdefault(f"layer{int(match.group(1)):03d}" if match else "rest", {})[name] = shape
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    files = sorted(groups)
    for i, group in enumerate(files):
        file = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for name, shape in groups[group].items():
            weight = _random(name, shape, generator, dtype)
            if fp8 and _is_fp8(name):
                tensors[name], tensors[f"{name}_scale_inv"] = to_fp8_blocks(weight)
            else:
                tensors[name] = weight
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if STORIES.exists():  # a small real tokenizer (ids beyond its vocabulary are never produced)
        for file in STORIES.iterdir():
            if file.name.startswith("tokenizer") or file.name == "special_tokens_map.json":
                shutil.copy2(file, out / file.name)
    return out


def _random(name: str, shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    if len(shape) == 1:  # norms near 1, biases near 0
        base = torch.ones(shape) if "norm" in name else torch.zeros(shape)
        return (base + 0.02 * torch.randn(shape, generator=generator)).to(dtype)
    std = shape[-1] ** -0.5
    return (std * torch.randn(shape, generator=generator)).to(dtype)


def _is_fp8(name: str) -> bool:
    """DeepSeek-V3's FP8 tensors: every linear of the decoder layers (attention, MLP, experts), not the router."""
    return name.startswith("model.layers.") and name.endswith(("_proj.weight", "_proj_with_mqa.weight"))


def to_fp8_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` ``[rows, cols]`` as float8_e4m3fn codes and float32 ``scale_inv`` per 128x128 block (amax / 448)."""
    rows, cols = weight.shape
    bm, bn = FP8_BLOCK
    padded = torch.zeros(-(-rows // bm) * bm, -(-cols // bn) * bn, dtype=torch.float32)
    padded[:rows, :cols] = weight
    blocks = padded.view(padded.shape[0] // bm, bm, padded.shape[1] // bn, bn)
    scale = blocks.abs().amax(dim=(1, 3)) / FP8_MAX
    scale[scale == 0] = 1.0
    codes = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(padded.shape)[:rows, :cols]
    return codes.contiguous(), scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="qwen3-30b-a3b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=None, help="routed experts per layer (default: real)")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the real model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fp8", action="store_true", help="DeepSeek-V3's block-scaled FP8 layout for the linears")
    args = parser.parse_args()
    path = build(args.out, args.preset, args.layers, args.experts, args.vocab, args.seed, fp8=args.fp8)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"wrote {path} ({size / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
