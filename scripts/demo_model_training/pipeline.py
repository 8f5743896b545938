"""``main``: tokenizer, model, training, save + offline reload, evaluation, ``training_summary.json``, model card."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Any

import numpy as np
import tokenizers
import torch
import transformers
from transformers import DeepseekV3ForCausalLM

from .architecture import active_params_per_token, build_config, param_breakdown
from .arguments import parse_args
from .checkpoint import reload_offline, safetensors_inventory, save
from .common import (
    SPECIAL_TOKENS,
    TEST_FILE,
    TRAIN_FILES,
    display_path,
    log,
    read_text,
    resolve,
    seed_everything,
    sha256_file,
)
from .evaluation import evaluate_test_file, sample_generation, window_losses
from .model_card import write_model_card
from .tokenizer import encode, train_tokenizer
from .training import train


def main(argv: list[str] | None = None) -> int:
    """Run every step with the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    args = parse_args(argv)
    wall0 = time.perf_counter()
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)  # tokenizers' thread pool (read lazily)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if args.threads > 1 else "false"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    seed_everything(args.seed)

    data_dir = resolve(args.data_dir) / "wikitext-2-raw"
    out = resolve(args.out)
    train_paths = [data_dir / name for name in TRAIN_FILES]
    test_path = data_dir / TEST_FILE
    assert all(p.name != TEST_FILE for p in train_paths), "wiki.test.raw must never be trained on"
    for p in [*train_paths, test_path]:
        if not p.is_file():
            raise FileNotFoundError(p)

    # 1. tokenizer -------------------------------------------------------------------
    train_texts = [read_text(p) for p in train_paths]
    t = time.perf_counter()
    tokenizer = train_tokenizer(train_texts, args.vocab_size, args.min_frequency, args.max_position_embeddings)
    log(f"tokenizer: vocab {len(tokenizer)} trained in {time.perf_counter() - t:.1f}s")

    per_file_ids = [encode(tokenizer, text) for text in train_texts]
    stream = torch.cat(per_file_ids)
    n_heldout = int(stream.numel() * args.heldout_frac)
    train_ids, heldout_ids = stream[: stream.numel() - n_heldout], stream[stream.numel() - n_heldout :]
    log(f"data: train stream {stream.numel()} tokens -> train {train_ids.numel()}, heldout {heldout_ids.numel()}")

    # 2. model -------------------------------------------------------------------------
    config = build_config(args, tokenizer)
    seed_everything(args.seed)
    model = DeepseekV3ForCausalLM(config)
    model.set_experts_implementation(args.experts_implementation)
    model.float()
    breakdown = param_breakdown(model)
    log(f"model: {breakdown}")

    # 3. train -------------------------------------------------------------------------
    result = train(model, train_ids, heldout_ids, args)
    train_eval, _ = window_losses(model, train_ids[: heldout_ids.numel()], args.seq_len, 16)
    heldout, _ = window_losses(model, heldout_ids, args.seq_len, 16)

    # 4. save + reload -----------------------------------------------------------------
    save(model, tokenizer, out)
    del model
    weights = out / "model.safetensors"
    inventory = safetensors_inventory(weights)
    log(
        f"saved {display_path(out)}: {weights.stat().st_size} bytes, {inventory['num_tensors']} tensors, "
        f"dtypes {inventory['dtypes']}"
    )
    reloaded, tok2 = reload_offline(out, tokenizer, train_texts[0][:2000], args.experts_implementation)

    # 5. evaluate on wiki.test.raw ------------------------------------------------------
    evaluation: dict[str, Any] = {}
    if not args.skip_test_eval:
        evaluation = evaluate_test_file(
            reloaded, tok2, test_path, args.eval_seq_len, args.eval_batch_size, config.n_routed_experts
        )
    sample = sample_generation(reloaded, tok2, " = Robert Boulter = \n \n Robert Boulter is", 40)

    # 6. summary + model card ----------------------------------------------------------
    cfg_dict = json.loads((out / "config.json").read_text())
    token_counts = {
        TRAIN_FILES[0]: {"role": "train (tokenizer + model)", "tokens": int(per_file_ids[0].numel())},
        TRAIN_FILES[1]: {
            "role": "train (tokenizer + model); its tail is the held-out split",
            "tokens": int(per_file_ids[1].numel()),
        },
    }
    for name in TRAIN_FILES:
        token_counts[name]["bytes"] = (data_dir / name).stat().st_size
    if evaluation:
        token_counts[TEST_FILE] = {
            "role": "evaluation only, never trained on",
            "tokens": evaluation["tokens_total"],
            "bytes": test_path.stat().st_size,
        }
    tokens_per_step = args.batch_size * args.seq_len
    summary: dict[str, Any] = {
        "model_type": cfg_dict["model_type"],
        "architectures": cfg_dict.get("architectures"),
        "config": cfg_dict,
        "parameters": breakdown,
        "active_parameters_per_token": active_params_per_token(config, breakdown),
        "files": {
            "model_safetensors_bytes": weights.stat().st_size,
            "model_safetensors_sha256": sha256_file(weights),
            "safetensors": {k: v for k, v in inventory.items() if k != "names"},
            "example_tensor_names": [n for n in inventory["names"] if ".layers.1." in n],
        },
        "tokenizer": {
            "type": "byte-level BPE (tokenizers), PreTrainedTokenizerFast",
            "vocab_size": len(tokenizer),
            "min_frequency": args.min_frequency,
            "special_token_ids": {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS},
            "adds_special_tokens": False,
        },
        "data": {
            "data_dir": display_path(data_dir),
            "train_files": list(TRAIN_FILES),
            "test_file_used_for_training": False,
            "files": token_counts,
            "train_stream_tokens": int(stream.numel()),
            "train_tokens": int(train_ids.numel()),
            "heldout_tokens": int(heldout_ids.numel()),
            "heldout_frac": args.heldout_frac,
        },
        "training": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "tokens_per_step": tokens_per_step,
            "tokens_seen": tokens_per_step * args.steps,
            "epochs": tokens_per_step * args.steps / train_ids.numel(),
            "lr": args.lr,
            "min_lr_ratio": args.min_lr_ratio,
            "warmup_steps": args.warmup_steps,
            "weight_decay": args.weight_decay,
            "grad_clip": args.grad_clip,
            "bias_update_rate": args.bias_update_rate,
            "router_lr_scale": args.router_lr_scale,
            "seq_aux_alpha": args.seq_aux_alpha,
            "seed": args.seed,
            "threads": args.threads,
            "experts_implementation": args.experts_implementation,
            "train_time_s": result["train_time_s"],
            "final_train_ce_ema": result["final_train_ce_ema"],
            "train_eval_ce": float(np.mean(train_eval)),
            "heldout_ce": float(np.mean(heldout)),
            "history": result["history"],
            "train_token_share": result["train_token_share"],
            "e_score_correction_bias": result["e_score_correction_bias"],
        },
        "evaluation": evaluation,
        "sample_generation": sample,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "machine": f"{platform.machine()} CPU ({platform.processor() or platform.system()}), {args.threads} thread(s)",
        "command": "python scripts/train_demo_model.py"
        + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(argv if argv is not None else sys.argv[1:])),
    }
    summary["wall_time_s"] = time.perf_counter() - wall0
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    write_model_card(out, summary)
    log(f"done in {summary['wall_time_s'] / 60:.1f} min; wrote {display_path(out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
