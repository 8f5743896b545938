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

The steps live in the ``demo_model_training`` package next to this file (one module per step).
"""

from demo_model_training.pipeline import main

if __name__ == "__main__":
    raise SystemExit(main())
