"""Checkpoints on disk and the architectures that say where things live in them."""
