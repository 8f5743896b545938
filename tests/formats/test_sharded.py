"""The sharded writer: shards spilled to disk as tensors arrive are byte for byte what safetensors writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantkit.formats.sharded import ShardedWriter
from quantkit.model.checkpoint import INDEX_FILE, SINGLE_FILE


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    big = torch.randn(64, 48, generator=g)
    return {
        "a.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "b.packed": torch.randint(-2**31, 2**31 - 1, (3, 11), generator=g, dtype=torch.int32),
        "c.mask": torch.rand(9, generator=g) > 0.5,
        "d.codes": torch.randint(0, 255, (13,), generator=g, dtype=torch.uint8),
        "e.empty": torch.empty(0, 4),
        "f.scale": torch.randn(3, generator=g, dtype=torch.float64),
        "g.half": torch.randn(5, 3, generator=g).half(),
        "h.view": big[10:12],  # a view of a larger tensor: only its own bytes are written
        "i.fp8": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),
        "j.strided": big.t()[:3],  # not contiguous
    }


def test_one_shard_equals_safetensors_save_file(tmp_path: Path) -> None:
    writer = ShardedWriter(tmp_path, max_shard_bytes=1 << 30)
    for name, tensor in tensors().items():
        writer.add(name, tensor)
    assert writer.finish() == [SINGLE_FILE]
    reference = tmp_path / "reference.safetensors"
    save_file({k: v.contiguous() for k, v in tensors().items()}, str(reference), metadata={"format": "pt"})
    assert (tmp_path / SINGLE_FILE).read_bytes() == reference.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([SINGLE_FILE, "reference.safetensors"])  # no spill left


@pytest.mark.parametrize("max_bytes", [1, 100, 400])
def test_shards_split_at_the_limit_and_index_every_tensor(tmp_path: Path, max_bytes: int) -> None:
    writer = ShardedWriter(tmp_path, max_shard_bytes=max_bytes)
    expected = tensors()
    for name, tensor in expected.items():
        writer.add(name, tensor)
    names = writer.finish()
    assert len(names) > 1
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(expected)
    loaded: dict[str, torch.Tensor] = {}
    for name in names:
        shard = load_file(str(tmp_path / name))
        assert sum(t.numel() * t.element_size() for t in shard.values()) <= max_bytes or len(shard) == 1
        loaded.update(shard)
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name].view(torch.uint8) if tensor.numel() else loaded[name],
                           tensor.contiguous().view(torch.uint8) if tensor.numel() else tensor)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())


def test_a_name_written_twice_is_refused(tmp_path: Path) -> None:
    writer = ShardedWriter(tmp_path, max_shard_bytes=1 << 20)
    writer.add("x", torch.zeros(2))
    with pytest.raises(ValueError, match="written twice"):
        writer.add("x", torch.zeros(2))
