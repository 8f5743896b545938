#!/usr/bin/env python
"""Train the small DeepSeekMoE-style demo model that quantkit ships as its default model.

The script is self-contained (it does not import ``quantkit``) and deterministic for a
given seed and thread count.  It

1. trains a byte-level BPE tokenizer (``tokenizers``) on WikiText-2 text
   (``wiki.valid.raw`` + ``wiki.train.first1018lines.raw``; ``wiki.test.raw`` is never
   used for training) and wraps it as a transformers fast tokenizer;
2. builds a tiny ``DeepseekV3ForCausalLM`` (MLA attention, one dense layer, then MoE
   layers with 16 fine-grained routed experts, one shared expert, top-4 group-limited
   sigmoid routing);
3. trains it with a plain PyTorch loop (AdamW, warmup + cosine) and DeepSeek-V3's
   auxiliary-loss-free load balancing (a per-expert routing bias nudged after every
   step) plus a small complementary sequence-wise balance loss;
4. saves the model in bfloat16 (safetensors, ``save_pretrained``) together with the
   tokenizer, reloads both offline;
5. evaluates the reloaded model on ``wiki.test.raw`` with the GPTQ perplexity protocol
   (whole file tokenized once, non-overlapping 512-token windows, remainder dropped,
   ppl = exp(mean of the per-window mean cross-entropies)) and measures the per-expert
   token share of every MoE layer;
6. writes ``training_summary.json`` and a model card ``README.md`` next to the weights.

Run from the repository root::

    python scripts/train_demo_model.py

The model card (``README.md`` in ``--out``) and ``training_summary.json`` record the exact
command line that produced a given checkpoint.  Everything runs on CPU; ``--threads``
defaults to 1 and the defaults take about 30 minutes on one core.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import tokenizers
import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    PreTrainedTokenizerFast,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN_FILES = ("wiki.train.first1018lines.raw", "wiki.valid.raw")
TEST_FILE = "wiki.test.raw"
SPECIAL_TOKENS = ("<s>", "</s>", "<unk>", "<pad>")
BOS, EOS, UNK, PAD = SPECIAL_TOKENS
# Files this script writes into --out; only these are removed before a new save.
OUTPUT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "training_summary.json",
    "README.md",
)


# --------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse command-line arguments (all have defaults that reproduce the shipped model)."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
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


def resolve(path: Path) -> Path:
    """Resolve ``path`` relative to the repository root unless it is absolute."""
    return path if path.is_absolute() else (REPO_ROOT / path).resolve()


def display_path(path: Path) -> str:
    """A path relative to the repository root when possible (for logs and the model card)."""
    try:
        return os.path.relpath(path, REPO_ROOT)
    except ValueError:
        return str(path)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def read_text(path: Path) -> str:
    """Read a WikiText file exactly as stored (UTF-8, no newline translation)."""
    return path.read_bytes().decode("utf-8")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int, min_frequency: int, max_len: int) -> PreTrainedTokenizerFast:
    """Train a GPT-2 style byte-level BPE tokenizer and wrap it as a transformers fast tokenizer.

    No post-processor is attached, so encoding never inserts ``<s>``/``</s>``: a text is
    tokenized to exactly its BPE pieces (``add_special_tokens`` has no effect).
    """
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for text in texts for line in text.splitlines(keepends=True)]
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=max_len,
        clean_up_tokenization_spaces=False,
    )


def encode(tokenizer: Any, text: str) -> torch.Tensor:
    """Tokenize a whole text once (no special tokens) into a 1-D LongTensor."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------


def build_config(args: argparse.Namespace, tokenizer: PreTrainedTokenizerFast) -> DeepseekV3Config:
    return DeepseekV3Config(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.dense_intermediate_size,
        moe_intermediate_size=args.moe_intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_heads,
        n_shared_experts=args.n_shared_experts,
        n_routed_experts=args.n_routed_experts,
        routed_scaling_factor=args.routed_scaling_factor,
        kv_lora_rank=args.kv_lora_rank,
        q_lora_rank=args.q_lora_rank,
        qk_rope_head_dim=args.qk_rope_head_dim,
        v_head_dim=args.v_head_dim,
        qk_nope_head_dim=args.qk_nope_head_dim,
        n_group=args.n_group,
        topk_group=args.topk_group,
        num_experts_per_tok=args.experts_per_tok,
        first_k_dense_replace=args.first_k_dense,
        norm_topk_prob=True,
        hidden_act="silu",
        max_position_embeddings=args.max_position_embeddings,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rope_interleave=True,
        attention_bias=False,
        attention_dropout=0.0,
        num_mtp_layers=0,
    )


def moe_gates(model: Any) -> list[tuple[int, Any]]:
    """(layer index, ``DeepseekV3TopkRouter``) for every MoE layer."""
    out: list[tuple[int, Any]] = []
    for i, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and hasattr(gate, "e_score_correction_bias"):
            out.append((i, gate))
    return out


@dataclass
class RouterTap:
    """Forward hooks on the routers that keep the latest (scores, top-k indices) per MoE layer.

    ``DeepseekV3TopkRouter.forward`` returns ``(router_logits, topk_weights, topk_indices)``;
    the selection uses ``sigmoid(logits) + e_score_correction_bias`` (group-limited), the
    mixing weights use the un-biased sigmoid scores, normalised over the top-k and
    multiplied by ``routed_scaling_factor``.
    """

    layers: list[int]
    logits: dict[int, torch.Tensor] = field(default_factory=dict)
    indices: dict[int, torch.Tensor] = field(default_factory=dict)
    handles: list[Any] = field(default_factory=list)

    @classmethod
    def attach(cls, model: torch.nn.Module) -> RouterTap:
        gates = moe_gates(model)
        tap = cls(layers=[i for i, _ in gates])
        for i, gate in gates:
            tap.handles.append(gate.register_forward_hook(tap._hook(i)))
        return tap

    def _hook(self, layer: int) -> Any:
        def hook(_module: torch.nn.Module, _inp: Any, out: tuple[torch.Tensor, ...]) -> None:
            self.logits[layer] = out[0]
            self.indices[layer] = out[2]

        return hook

    def counts(self, num_experts: int) -> dict[int, torch.Tensor]:
        return {i: torch.bincount(self.indices[i].reshape(-1), minlength=num_experts) for i in self.layers}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def sequence_balance_loss(tap: RouterTap, batch: int, top_k: int, num_experts: int) -> torch.Tensor:
    """DeepSeek-V3 complementary sequence-wise balance loss, averaged over MoE layers and sequences.

    L = sum_i f_i * P_i with f_i = E / (K T) * #{t : i in topk(t)} and P_i = mean_t s'_{i,t},
    s' being the sigmoid scores normalised to sum 1 per token.
    """
    losses = []
    for i in tap.layers:
        scores = tap.logits[i].float().sigmoid().view(batch, -1, num_experts)
        seq_len = scores.shape[1]
        probs = scores / scores.sum(-1, keepdim=True)
        sel = F.one_hot(tap.indices[i].view(batch, seq_len * top_k), num_experts).sum(1).float()
        f = sel * (num_experts / (top_k * seq_len))
        losses.append((f * probs.mean(1)).sum(-1).mean())
    return torch.stack(losses).mean()


@torch.no_grad()
def update_routing_bias(model: torch.nn.Module, counts: dict[int, torch.Tensor], rate: float) -> None:
    """Aux-loss-free balancing: push the selection bias of overloaded experts down, underloaded up."""
    for i, gate in moe_gates(model):
        load = counts[i].float()
        gate.e_score_correction_bias.add_(rate * torch.sign(load.mean() - load))


def param_breakdown(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts by role (tied lm_head counted once, inside embeddings)."""
    groups = {
        "embeddings": 0,
        "attention": 0,
        "router": 0,
        "routed_experts": 0,
        "shared_experts": 0,
        "dense_mlp": 0,
        "norms": 0,
    }
    for name, p in model.named_parameters():  # deduplicates tied parameters
        n = p.numel()
        if "embed_tokens" in name or name.startswith("lm_head"):
            groups["embeddings"] += n
        elif ".self_attn." in name:
            groups["attention"] += n
        elif ".mlp.experts." in name:
            groups["routed_experts"] += n
        elif ".mlp.shared_experts." in name:
            groups["shared_experts"] += n
        elif ".mlp.gate." in name:
            groups["router"] += n
        elif ".mlp." in name:
            groups["dense_mlp"] += n
        else:
            groups["norms"] += n
    groups["total"] = sum(groups.values())
    return groups


def active_params_per_token(cfg: DeepseekV3Config, breakdown: dict[str, int]) -> int:
    n_moe = cfg.num_hidden_layers - int(cfg.first_k_dense_replace or 0)
    per_expert = breakdown["routed_experts"] // max(1, n_moe * cfg.n_routed_experts)
    inactive = n_moe * (cfg.n_routed_experts - int(cfg.num_experts_per_tok or 0)) * per_expert
    return breakdown["total"] - inactive


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup then cosine decay to ``lr * min_lr_ratio``."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    cos = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return args.lr * (args.min_lr_ratio + (1.0 - args.min_lr_ratio) * cos)


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only; the routers get ``lr * router_lr_scale`` and no decay."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    router: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".mlp.gate." in name:
            router.append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay, "lr_scale": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
            {"params": router, "weight_decay": 0.0, "lr_scale": args.router_lr_scale},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )


def window_losses(
    model: torch.nn.Module,
    ids: torch.Tensor,
    seq_len: int,
    batch_size: int,
    tap: RouterTap | None = None,
    num_experts: int = 0,
) -> tuple[list[float], dict[int, torch.Tensor]]:
    """Mean next-token cross-entropy of every non-overlapping ``seq_len`` window (remainder dropped).

    Returns the per-window losses and, if ``tap`` is given, the per-expert routed-slot counts
    accumulated over all windows.
    """
    n = ids.numel() // seq_len
    windows = ids[: n * seq_len].view(n, seq_len)
    losses: list[float] = []
    counts: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for s in range(0, n, batch_size):
            x = windows[s : s + batch_size]
            logits = model(input_ids=x, use_cache=False).logits.float()
            ce = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none"
            ).view(x.shape[0], -1)
            losses.extend(ce.mean(1).tolist())
            if tap is not None:
                for i, c in tap.counts(num_experts).items():
                    counts[i] = counts.get(i, torch.zeros_like(c)) + c
    return losses, counts


def shares_from_counts(counts: dict[int, torch.Tensor]) -> dict[str, list[float]]:
    return {str(i): (c.double() / c.sum()).tolist() for i, c in sorted(counts.items())}


def train(
    model: DeepseekV3ForCausalLM, train_ids: torch.Tensor, heldout_ids: torch.Tensor, args: argparse.Namespace
) -> dict[str, Any]:
    cfg = model.config
    num_experts, top_k = int(cfg.n_routed_experts), int(cfg.num_experts_per_tok or 0)
    opt = make_optimizer(model, args)
    tap = RouterTap.attach(model)
    rng = np.random.default_rng(args.seed)
    span = args.seq_len + 1
    max_start = train_ids.numel() - span
    tokens_per_step = args.batch_size * args.seq_len
    cum_counts = {i: torch.zeros(num_experts, dtype=torch.long) for i in tap.layers}
    history: list[dict[str, float]] = []
    ema: float | None = None
    t0 = time.perf_counter()
    model.train()
    for step in range(args.steps):
        starts = rng.integers(0, max_start + 1, size=args.batch_size)
        batch = torch.stack([train_ids[s : s + span] for s in starts.tolist()])
        x, y = batch[:, :-1], batch[:, 1:]
        lr = lr_at(step, args)
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_scale"]

        logits = model(input_ids=x, use_cache=False).logits
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss = ce
        aux = torch.zeros(())
        if args.seq_aux_alpha > 0:
            aux = sequence_balance_loss(tap, args.batch_size, top_k, num_experts)
            loss = ce + args.seq_aux_alpha * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()

        counts = tap.counts(num_experts)
        if args.bias_update_rate > 0:
            gamma = args.bias_update_rate * (1.0 if step < args.warmup_steps else lr / args.lr)
            update_routing_bias(model, counts, gamma)
        for i, c in counts.items():
            cum_counts[i] += c

        ce_val = ce.item()
        ema = ce_val if ema is None else 0.95 * ema + 0.05 * ce_val
        last = step == args.steps - 1
        if step % args.log_every == 0 or last:
            elapsed = time.perf_counter() - t0
            shares = [c.float() / c.sum() for c in counts.values()]
            mn = min(s.min().item() for s in shares)
            mx = max(s.max().item() for s in shares)
            log(
                f"step {step:5d}/{args.steps} ce {ce_val:.4f} (ema {ema:.4f}) aux {aux.item():.4f} "
                f"lr {lr:.2e} gnorm {grad_norm.item():.2f} share[min {mn:.3f} max {mx:.3f}] "
                f"{(step + 1) * tokens_per_step / elapsed:.0f} tok/s {elapsed / (step + 1):.2f} s/step"
            )
        if (step + 1) % args.eval_every == 0 or last:
            model.eval()
            ho, _ = window_losses(model, heldout_ids, args.seq_len, 16)
            model.train()
            ho_loss = float(np.mean(ho))
            history.append(
                {"step": step + 1, "train_ce_ema": ema, "heldout_ce": ho_loss, "elapsed_s": time.perf_counter() - t0}
            )
            log(f"  eval step {step + 1}: heldout ce {ho_loss:.4f} (ppl {math.exp(ho_loss):.1f})")
    train_time = time.perf_counter() - t0
    tap.remove()
    model.eval()
    biases = {str(i): gate.e_score_correction_bias.tolist() for i, gate in moe_gates(model)}
    return {
        "train_time_s": train_time,
        "final_train_ce_ema": ema,
        "history": history,
        "train_token_share": shares_from_counts(cum_counts),
        "e_score_correction_bias": biases,
    }


# --------------------------------------------------------------------------------------
# Saving, reloading, evaluation
# --------------------------------------------------------------------------------------


def save(model: DeepseekV3ForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)
    biases = {i: gate.e_score_correction_bias.detach().clone() for i, gate in moe_gates(model)}
    model_any: Any = model  # transformers' typed ``to`` wrapper confuses mypy
    model_any.to(torch.bfloat16)
    # Like the official DeepSeek-V3 checkpoints (and transformers' _keep_in_fp32_modules_strict),
    # keep the routing-correction bias in float32: bf16 would round it and flip routing decisions.
    for i, gate in moe_gates(model):
        gate.e_score_correction_bias.data = biases[i]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for path in out.iterdir():  # safetensors may be written 0600; this ships as package data
        if path.name in OUTPUT_FILES:
            path.chmod(0o644)


def safetensors_inventory(path: Path) -> dict[str, Any]:
    dtypes: dict[str, int] = {}
    names: list[str] = []
    with safetensors.safe_open(str(path), framework="pt") as f:
        for k in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
            names.append(k)
            dt = str(f.get_slice(k).get_dtype())
            dtypes[dt] = dtypes.get(dt, 0) + 1
    return {"num_tensors": len(names), "dtypes": dtypes, "names": sorted(names)}


def sample_generation(model: Any, tokenizer: Any, prompt: str, new_tokens: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def summarize_shares(shares: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {
        layer: {"min": min(s), "max": max(s), "max_over_min": max(s) / max(min(s), 1e-12)}
        for layer, s in shares.items()
    }


# --------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------


def fmt_int(n: int) -> str:
    return f"{n:,}"


def write_model_card(out: Path, s: dict[str, Any]) -> None:
    c = s["config"]
    pb = s["parameters"]
    d = s["data"]
    t = s["training"]
    e = s.get("evaluation", {})
    moe_layers = c["num_hidden_layers"] - c["first_k_dense_replace"]
    lines: list[str] = []
    w = lines.append
    w("# quantkit demo model: a tiny DeepSeekMoE-style (DeepSeek-V3 architecture) causal LM")
    w("")
    w("This is quantkit's embedded default model: a few-million-parameter `DeepseekV3ForCausalLM`")
    w("(transformers `model_type: deepseek_v3`) trained from scratch on CPU in about half an hour,")
    w("so that quantization can be exercised end to end on a real, trained mixture-of-experts")
    w("model with the DeepSeek-V3 features that matter for a quantizer: multi-head latent attention")
    w("(MLA, low-rank q/kv projections), a dense first layer, fine-grained routed experts plus a")
    w("shared expert, sigmoid group-limited top-k routing with a float32 `e_score_correction_bias`,")
    w("`norm_topk_prob` and `routed_scaling_factor`, and tied input/output embeddings.")
    w("It is a test fixture, not a useful language model.")
    w("")
    w("## Architecture")
    w("")
    w(
        f"- {c['num_hidden_layers']} decoder layers, hidden size {c['hidden_size']}; layer 0 is dense "
        f"(SwiGLU MLP, intermediate size {c['intermediate_size']}); layers "
        f"{c['first_k_dense_replace']}..{c['num_hidden_layers'] - 1} are MoE ({moe_layers} MoE layers)."
    )
    w(
        f"- MoE: {c['n_routed_experts']} routed experts (SwiGLU, `moe_intermediate_size` "
        f"{c['moe_intermediate_size']}), {c['num_experts_per_tok']} active per token, "
        f"{c['n_shared_experts']} shared expert (intermediate "
        f"{c['moe_intermediate_size'] * c['n_shared_experts']}, always on)."
    )
    w(
        f"- Routing (transformers `DeepseekV3TopkRouter`): s = sigmoid(W_g h); experts are split into "
        f"`n_group` {c['n_group']} groups of {c['n_routed_experts'] // c['n_group']}; each group is scored by the sum "
        f"of its top-2 values of s + `e_score_correction_bias`, the best `topk_group` {c['topk_group']} groups are "
        f"kept and the top-{c['num_experts_per_tok']} experts are chosen among them by s + bias. The mixing weights "
        f"are the un-biased s of the chosen experts, normalised to sum 1 (`norm_topk_prob` "
        f"{c['norm_topk_prob']}) and multiplied by `routed_scaling_factor` {c['routed_scaling_factor']}; the shared "
        f"expert output is added with weight 1."
    )
    w(
        f"- Attention: MLA with {c['num_attention_heads']} heads, `q_lora_rank` {c['q_lora_rank']}, "
        f"`kv_lora_rank` {c['kv_lora_rank']}, `qk_nope_head_dim` {c['qk_nope_head_dim']}, "
        f"`qk_rope_head_dim` {c['qk_rope_head_dim']}, `v_head_dim` {c['v_head_dim']}, "
        f"RoPE theta {c['rope_parameters']['rope_theta']}, `rope_interleave` {c['rope_interleave']}."
    )
    w(
        f"- Vocabulary {c['vocab_size']}, `max_position_embeddings` {c['max_position_embeddings']}, "
        f"`tie_word_embeddings` {c['tie_word_embeddings']}, RMSNorm eps {c['rms_norm_eps']}, "
        f"`num_nextn_predict_layers` (MTP) {c.get('num_nextn_predict_layers', c.get('num_mtp_layers'))}. "
        f"Trained context: {t['seq_len']} tokens (the config allows {c['max_position_embeddings']}, but longer "
        "inputs were never seen in training)."
    )
    w("")
    w("### Parameters")
    w("")
    w("| part | parameters |")
    w("| --- | ---: |")
    for key, label in (
        ("embeddings", "embeddings (tied with `lm_head`, counted once)"),
        ("attention", "attention (MLA projections and their norms, all layers)"),
        ("routed_experts", f"routed experts ({moe_layers} layers x {c['n_routed_experts']})"),
        ("shared_experts", "shared experts"),
        ("router", "routers (`mlp.gate.weight`)"),
        ("dense_mlp", "dense MLP (layer 0)"),
        ("norms", "layer norms (input / post-attention / final)"),
    ):
        w(f"| {label} | {fmt_int(pb[key])} |")
    w(f"| **total** | **{fmt_int(pb['total'])}** |")
    w("")
    w(
        f"Active per token: {fmt_int(s['active_parameters_per_token'])}. The routers also hold "
        f"{moe_layers} x {c['n_routed_experts']} float32 `e_score_correction_bias` buffers (not parameters)."
    )
    w("")
    f = s["files"]
    w("### Files")
    w("")
    w(
        f"- `model.safetensors`: {fmt_int(f['model_safetensors_bytes'])} bytes, "
        f"{f['safetensors']['num_tensors']} tensors by dtype "
        f"{', '.join(f'{dt} {n}' for dt, n in sorted(f['safetensors']['dtypes'].items()))}: all weights are "
        "bfloat16, only the `e_score_correction_bias` buffers are float32. "
        f"SHA-256 `{f['model_safetensors_sha256']}`."
    )
    w(
        "- Experts are fused 3-D tensors in memory (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`) but "
        "transformers writes them per expert on disk, e.g. `model.layers.1.mlp.experts.0.gate_proj.weight`, "
        "`...up_proj.weight`, `...down_proj.weight`. The tied `lm_head.weight` is not stored."
    )
    w(
        "- `config.json`, `generation_config.json`, `tokenizer.json`, `tokenizer_config.json`, "
        "`training_summary.json` (all numbers on this card, machine-readable)."
    )
    w("")
    w("## Data")
    w("")
    w(
        "WikiText-2 raw (Merity et al., 2016, arXiv:1609.07843; Wikipedia text, CC BY-SA 3.0), read as UTF-8 "
        "bytes with no newline translation:"
    )
    w("")
    w("| file | role | bytes | tokens |")
    w("| --- | --- | ---: | ---: |")
    for name, info in d["files"].items():
        w(f"| `{name}` | {info['role']} | {fmt_int(info['bytes'])} | {fmt_int(info['tokens'])} |")
    w("")
    w(
        f"The training files are concatenated ({', '.join('`' + x + '`' for x in d['train_files'])}) into one "
        f"token stream of {fmt_int(d['train_stream_tokens'])} tokens; the last {d['heldout_frac']:.0%} "
        f"({fmt_int(d['heldout_tokens'])} tokens, the tail of `wiki.valid.raw`) is held out for validation and "
        f"the model trains on the first {fmt_int(d['train_tokens'])}. **`wiki.test.raw` was never used for "
        "training or for the tokenizer**; it is only used for the evaluation below."
    )
    w("")
    w("## Tokenizer")
    w("")
    tk = s["tokenizer"]
    w(
        f"Byte-level BPE (GPT-2 style pre-tokenization, no prefix space) trained with `tokenizers` "
        f"{s['versions']['tokenizers']} on the two training files (not on the test file): vocabulary "
        f"{tk['vocab_size']} including the special tokens {', '.join('`' + x + '`' for x in SPECIAL_TOKENS)} "
        f"(ids {tk['special_token_ids']}), `min_frequency` {tk['min_frequency']}. Saved with "
        "`PreTrainedTokenizerFast.save_pretrained` (in transformers 5 an alias of `TokenizersBackend`, the class "
        "named in `tokenizer_config.json`); `AutoTokenizer.from_pretrained` works offline. There is no post-processor: "
        "encoding never adds `<s>`/`</s>`, so `tokenizer(text)` gives the same ids with or without "
        "`add_special_tokens`. Byte-level BPE never produces `<unk>`."
    )
    w("")
    w("## Training")
    w("")
    w(
        f"- {t['steps']} steps of AdamW (betas 0.9/0.95, weight decay {t['weight_decay']} on matrices, "
        f"grad clip {t['grad_clip']}), batch {t['batch_size']} x seq len {t['seq_len']} = "
        f"{fmt_int(t['tokens_per_step'])} tokens/step, {fmt_int(t['tokens_seen'])} tokens in total "
        f"({t['epochs']:.2f} epochs); random windows drawn from the training stream."
    )
    w(
        f"- Learning rate {t['lr']} with {t['warmup_steps']} linear warmup steps, then cosine decay to "
        f"{t['lr'] * t['min_lr_ratio']:.1e}. float32 training, seed {t['seed']}, {t['threads']} CPU thread(s), "
        f"transformers experts implementation `{t['experts_implementation']}`."
    )
    w(
        f"- Load balancing as in DeepSeek-V3: auxiliary-loss-free bias update after every step "
        f"(`e_score_correction_bias += gamma * sign(mean_load - load)` per MoE layer, load = routed slots per "
        f"expert in the step's batch; gamma = {t['bias_update_rate']} during warmup, then scaled by lr / peak lr, "
        f"i.e. down to {t['bias_update_rate'] * t['min_lr_ratio']:.0e}; the bias is a buffer, not touched by the "
        f"optimizer) plus the complementary sequence-wise balance loss with alpha {t['seq_aux_alpha']}. "
        f"The router weights train with {t['router_lr_scale']} x the learning rate (this, the bias update "
        f"and the warmup keep the routing from collapsing onto a few experts early in training)."
    )
    w(
        f"- Wall time: training {t['train_time_s'] / 60:.1f} min; whole script {s['wall_time_s'] / 60:.1f} min "
        f"on {s['machine']}."
    )
    w(
        f"- Final losses (cross-entropy, nats/token): train {t['final_train_ce_ema']:.4f} (EMA over the last steps, "
        f"seq len {t['seq_len']}), train-subset eval {t['train_eval_ce']:.4f}, held-out {t['heldout_ce']:.4f} "
        f"(ppl {math.exp(t['heldout_ce']):.1f}), both as the mean over non-overlapping {t['seq_len']}-token windows."
    )
    w("")
    if t["history"]:
        w("| step | train CE (EMA) | held-out CE | held-out ppl | elapsed (min) |")
        w("| ---: | ---: | ---: | ---: | ---: |")
        for h in t["history"]:
            w(
                f"| {h['step']} | {h['train_ce_ema']:.3f} | {h['heldout_ce']:.3f} | {math.exp(h['heldout_ce']):.1f} "
                f"| {h['elapsed_s'] / 60:.1f} |"
            )
        w("")
    w("Per-expert share of the routed token-slots over the whole training run (min / max per MoE layer):")
    w(
        "; ".join(f"layer {layer}: {min(sh):.3f} / {max(sh):.3f}" for layer, sh in t["train_token_share"].items())
        + f" (uniform {1 / c['n_routed_experts']:.4f})."
    )
    w("")
    if e:
        w("## Evaluation: perplexity on `wiki.test.raw`")
        w("")
        w(
            f"GPTQ protocol: the whole file text tokenized once, split into {fmt_int(e['num_windows'])} "
            f"non-overlapping windows of {e['seq_len']} tokens ({fmt_int(e['tokens_used'])} of "
            f"{fmt_int(e['tokens_total'])} tokens; the remainder is dropped), ppl = exp(mean over windows of the "
            f"window's mean next-token cross-entropy). Model: the saved bfloat16 checkpoint reloaded with "
            f"`AutoModelForCausalLM.from_pretrained`, {e['compute']}."
        )
        w("")
        w(f"**wiki.test.raw perplexity: {e['ppl']:.2f}** (mean CE {e['mean_ce']:.4f}).")
        w("")
        if t["seq_len"] < e["seq_len"]:
            w(
                f"Note: the model was trained on {t['seq_len']}-token windows only, so positions "
                f"{t['seq_len']}..{e['seq_len'] - 1} of every evaluation window are beyond the trained context "
                "(RoPE extrapolation); the loss there is clearly higher than in the first half of the window."
            )
            w("")
        w("### Per-expert token share on wiki.test.raw")
        w("")
        w(
            f"Fraction of the routed token-slots ({c['num_experts_per_tok']} per token) each routed expert "
            f"receives, per MoE layer (uniform = {1 / c['n_routed_experts']:.4f})."
        )
        w("")
        header = "| layer | " + " | ".join(f"e{j}" for j in range(c["n_routed_experts"])) + " | min | max |"
        w(header)
        w("|" + " --- |" * (c["n_routed_experts"] + 3))
        for layer, shares in e["expert_token_share"].items():
            row = " | ".join(f"{x:.3f}" for x in shares)
            w(f"| {layer} | {row} | {min(shares):.3f} | {max(shares):.3f} |")
        w("")
    if s.get("sample_generation"):
        w("### Sample (greedy, for flavour only)")
        w("")
        w("```text")
        w(s["sample_generation"])
        w("```")
        w("")
    w("## Usage")
    w("")
    w("```python")
    w("from transformers import AutoModelForCausalLM, AutoTokenizer")
    w("")
    w('model = AutoModelForCausalLM.from_pretrained("quantkit/demo_model")  # bf16 weights, fp32 routing bias')
    w('tokenizer = AutoTokenizer.from_pretrained("quantkit/demo_model")')
    w("```")
    w("")
    w("## Reproduce")
    w("")
    w(
        "From the repository root (needs `../shared/data/wikitext-2-raw/`; CPU only, about "
        f"{s['wall_time_s'] / 60:.0f} minutes on one thread):"
    )
    w("")
    w("```bash")
    w(s["command"])
    w("```")
    w("")
    w(
        f"Versions: python {s['versions']['python']}, torch {s['versions']['torch']}, transformers "
        f"{s['versions']['transformers']}, tokenizers {s['versions']['tokenizers']}. The run is seeded and "
        "deterministic for a given thread count and library versions; other versions or thread counts can "
        "change the floating-point results slightly."
    )
    (out / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
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
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True)
    reloaded.set_experts_implementation(args.experts_implementation)
    reloaded.eval()
    tok2 = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert type(reloaded).__name__ == "DeepseekV3ForCausalLM", type(reloaded)
    assert len(tok2) == len(tokenizer)
    probe = train_texts[0][:2000]
    assert tok2(probe)["input_ids"] == tokenizer(probe)["input_ids"], "reloaded tokenizer differs"
    assert tok2.decode(tok2(probe)["input_ids"]) == probe, "tokenizer does not round-trip"
    log(f"reloaded offline: {type(reloaded).__name__}, {type(tok2).__name__} (vocab {len(tok2)})")

    # 5. evaluate on wiki.test.raw ------------------------------------------------------
    evaluation: dict[str, Any] = {}
    if not args.skip_test_eval:
        t = time.perf_counter()
        test_text = read_text(test_path)
        test_ids = encode(tok2, test_text)
        tap = RouterTap.attach(reloaded)
        losses, counts = window_losses(
            reloaded, test_ids, args.eval_seq_len, args.eval_batch_size, tap=tap, num_experts=config.n_routed_experts
        )
        tap.remove()
        mean_ce = float(np.mean(losses))
        shares = shares_from_counts(counts)
        evaluation = {
            "file": TEST_FILE,
            "protocol": "gptq: whole file tokenized once, non-overlapping windows, remainder dropped, "
            "ppl = exp(mean of per-window mean CE)",
            "seq_len": args.eval_seq_len,
            "tokens_total": int(test_ids.numel()),
            "num_windows": len(losses),
            "tokens_used": len(losses) * args.eval_seq_len,
            "mean_ce": mean_ce,
            "ppl": math.exp(mean_ce),
            "compute": "float32 compute (bf16 weights upcast at load)",
            "expert_token_share": shares,
            "expert_token_share_summary": summarize_shares(shares),
            "eval_time_s": time.perf_counter() - t,
        }
        log(
            f"wiki.test.raw: {len(losses)} windows x {args.eval_seq_len}, ppl {math.exp(mean_ce):.2f} "
            f"({evaluation['eval_time_s']:.0f}s)"
        )
        for layer, sm in evaluation["expert_token_share_summary"].items():
            log(f"  layer {layer}: share min {sm['min']:.4f} max {sm['max']:.4f}")
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
