"""Training of quantkit's demo MoE model (``quantkit/demo_model/``), run by ``scripts/train_demo_model.py``.

Modules, in pipeline order: ``arguments`` (the command line), ``common`` (paths, data files, logging,
seeding), ``tokenizer`` (byte-level BPE), ``architecture`` (the DeepSeek-V3 config, router taps, load
balancing, parameter counts), ``training`` (the training loop), ``checkpoint`` (save and offline reload),
``evaluation`` (windowed perplexity, expert shares, a greedy sample), ``model_card`` (the README.md) and
``pipeline`` (``main``: runs the steps and writes ``training_summary.json``).
"""
