"""The command line of ``scripts/train_demo_model.py``: every default reproduces the shipped model."""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = "Train the small DeepSeekMoE-style demo model that quantkit ships as its default model."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse command-line arguments (all have defaults that reproduce the shipped model)."""
    p = argparse.ArgumentParser(
        description=DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("paths")
    g.add_argument(
        "--data-dir",
        type=Path,
        default=Path("../shared/data"),
        help="directory holding wikitext-2-raw/ (relative paths are resolved from the repo root)",
    )
    g.add_argument(
        "--out",
        type=Path,
        default=Path("quantkit/demo_model"),
        help="output directory (relative paths are resolved from the repo root)",
    )

    g = p.add_argument_group("tokenizer")
    g.add_argument("--vocab-size", type=int, default=4096)
    g.add_argument("--min-frequency", type=int, default=2)

    g = p.add_argument_group("model")
    g.add_argument("--hidden-size", type=int, default=256)
    g.add_argument("--num-layers", type=int, default=4)
    g.add_argument("--num-heads", type=int, default=4)
    g.add_argument(
        "--dense-intermediate-size",
        type=int,
        default=512,
        help="intermediate size of the dense MLP in the first (non-MoE) layer",
    )
    g.add_argument("--moe-intermediate-size", type=int, default=128)
    g.add_argument("--n-routed-experts", type=int, default=16)
    g.add_argument("--n-shared-experts", type=int, default=1)
    g.add_argument("--experts-per-tok", type=int, default=4)
    g.add_argument("--n-group", type=int, default=4)
    g.add_argument("--topk-group", type=int, default=2)
    g.add_argument("--first-k-dense", type=int, default=1)
    g.add_argument("--routed-scaling-factor", type=float, default=2.5)
    g.add_argument("--q-lora-rank", type=int, default=128)
    g.add_argument("--kv-lora-rank", type=int, default=128)
    g.add_argument("--qk-nope-head-dim", type=int, default=32)
    g.add_argument("--qk-rope-head-dim", type=int, default=16)
    g.add_argument("--v-head-dim", type=int, default=32)
    g.add_argument("--max-position-embeddings", type=int, default=2048)

    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=800)
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--seq-len", type=int, default=512)
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr = lr * ratio")
    g.add_argument("--warmup-steps", type=int, default=40)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument(
        "--router-lr-scale",
        type=float,
        default=0.1,
        help="learning-rate multiplier for the router weights (mlp.gate.weight)",
    )
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument(
        "--bias-update-rate",
        type=float,
        default=1e-2,
        help="gamma of the aux-loss-free balancing, bias += gamma * sign(mean_load - load); "
        "constant during warmup, then scaled like the learning rate (cosine decay)",
    )
    g.add_argument(
        "--seq-aux-alpha",
        type=float,
        default=1e-3,
        help="weight of the complementary sequence-wise balance loss (0 disables it)",
    )
    g.add_argument(
        "--heldout-frac",
        type=float,
        default=0.03,
        help="fraction at the end of the training token stream held out for validation",
    )
    g.add_argument("--eval-every", type=int, default=100)
    g.add_argument("--log-every", type=int, default=25)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--threads", type=int, default=1, help="torch (and tokenizers) CPU threads")
    g.add_argument(
        "--experts-implementation",
        default="grouped_mm",
        choices=("eager", "grouped_mm", "batched_mm"),
        help="transformers experts kernel used while training/evaluating (not saved)",
    )

    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-seq-len", type=int, default=512)
    g.add_argument("--eval-batch-size", type=int, default=8)
    g.add_argument("--skip-test-eval", action="store_true", help="skip the wiki.test.raw evaluation")
    return p.parse_args(argv)
