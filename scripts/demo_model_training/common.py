"""Paths, data-file names and small helpers (logging, seeding, file reading and hashing) shared by the modules."""

from __future__ import annotations

import hashlib
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
TRAIN_FILES = ("wiki.train.first1018lines.raw", "wiki.valid.raw")
TEST_FILE = "wiki.test.raw"
SPECIAL_TOKENS = ("<s>", "</s>", "<unk>", "<pad>")
BOS, EOS, UNK, PAD = SPECIAL_TOKENS
# Files the script writes into --out; only these are removed before a new save.
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
    """Print ``msg`` with a wall-clock time stamp."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's random generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def read_text(path: Path) -> str:
    """Read a WikiText file exactly as stored (UTF-8, no newline translation)."""
    return path.read_bytes().decode("utf-8")


def sha256_file(path: Path) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
