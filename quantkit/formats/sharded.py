"""Sharded safetensors output with the Hugging Face index layout.

The writer fills the temporary directory of :func:`quantkit.outputs.atomic_directory`, which renames it
into place only when everything succeeded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from quantkit.model.checkpoint import INDEX_FILE, SINGLE_FILE
from quantkit.outputs import save_safetensors


class ShardedWriter:
    """Buffers tensors and writes a new shard whenever ``max_shard_bytes`` would be exceeded."""

    def __init__(self, directory: Path, max_shard_bytes: int) -> None:
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[list[str]] = []
        self._names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name} written twice")
        self._names.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor.contiguous()
        self._buffer_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        if not self._buffer:
            return
        save_safetensors(self._buffer, self._shard_path(len(self._shards)), metadata={"format": "pt"})
        self._shards.append(list(self._buffer))
        self._buffer, self._buffer_bytes = {}, 0

    def _shard_path(self, i: int) -> Path:
        return self.directory / f".shard-{i:05d}.safetensors"

    def finish(self) -> list[str]:
        """Flush, give shards their final names, write the index; returns the shard file names."""
        self._flush()
        n = len(self._shards)
        if n == 1:
            os.replace(self._shard_path(0), self.directory / SINGLE_FILE)
            return [SINGLE_FILE]
        names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for i, (final, tensors) in enumerate(zip(names, self._shards, strict=False)):
            os.replace(self._shard_path(i), self.directory / final)
            weight_map.update(dict.fromkeys(tensors, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return names
