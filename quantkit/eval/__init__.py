"""Evaluation: perplexity under published protocols, divergence from a base model, regression gate."""
