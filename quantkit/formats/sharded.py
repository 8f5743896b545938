"""Sharded safetensors output with the Hugging Face index layout.

The writer fills the temporary directory of :func:`quantkit.outputs.atomic_directory`, which renames it
into place only when everything succeeded. Tensors are not held in memory until their shard is full:
each one is appended to a spill file as it arrives, and a full shard is written from that file mapped
into memory (page cache, which the kernel can drop), so the output never costs more than one tensor of
anonymous memory however large ``max_shard_bytes`` is. The shard's bytes are ``safetensors``' own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from quantkit.model.checkpoint import INDEX_FILE, SINGLE_FILE
from quantkit.outputs import save_safetensors

_ALIGN = 16  # spill offsets are aligned so that every dtype can view its bytes in place


class ShardedWriter:
    """Collects tensors into shards of at most ``max_shard_bytes`` (one tensor may exceed it)."""

    def __init__(self, directory: Path, max_shard_bytes: int) -> None:
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self._entries: dict[str, tuple[int, torch.dtype, tuple[int, ...]]] = {}  # name -> spill offset, dtype, shape
        self._buffer_bytes = 0
        self._shards: list[list[str]] = []
        self._names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name} written twice")
        self._names.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self._entries and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        data = tensor.detach().to("cpu").contiguous()
        with open(self._spill_path(), "ab") as spill:  # not kept open: a failed run must leave no open file
            padding = -spill.tell() % _ALIGN
            spill.write(bytes(padding))
            self._entries[name] = (spill.tell(), data.dtype, tuple(data.shape))
            if nbytes:
                spill.write(data.reshape(-1).view(torch.uint8).numpy().data)
        self._buffer_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        if not self._entries:
            return
        spill = self._spill_path()
        size = spill.stat().st_size
        raw = torch.from_file(str(spill), shared=False, size=size, dtype=torch.uint8) if size else torch.empty(0)
        tensors: dict[str, torch.Tensor] = {}
        try:
            for name, (offset, dtype, shape) in self._entries.items():
                nbytes = torch.Size(shape).numel() * dtype.itemsize
                tensors[name] = raw[offset:offset + nbytes].view(dtype).reshape(shape)
            save_safetensors(tensors, self._shard_path(len(self._shards)), metadata={"format": "pt"})
        finally:  # unmap the spill file even when the write fails (a full disk must leave nothing in use)
            tensors.clear()
            del raw
        spill.unlink()
        self._shards.append(list(self._entries))
        self._entries, self._buffer_bytes = {}, 0

    def _spill_path(self) -> Path:
        return self.directory / f".shard-{len(self._shards):05d}.spill"

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
