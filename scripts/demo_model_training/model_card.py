"""The model card (``README.md`` next to the weights), written from the training summary."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .common import SPECIAL_TOKENS


def fmt_int(n: int) -> str:
    """An integer with thousands separators."""
    return f"{n:,}"


def write_model_card(out: Path, s: dict[str, Any]) -> None:
    """Write ``README.md`` into ``out`` from the training summary ``s``."""
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
