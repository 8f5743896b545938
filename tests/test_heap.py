"""What the process may still allocate: MemAvailable, lowered by a container's cgroup limit."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantkit import heap


def _fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, meminfo: str | None, limit: str | None,
          current: int = 0) -> None:
    info = tmp_path / "meminfo"
    if meminfo is not None:
        info.write_text(meminfo)
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    if limit is not None:
        (cgroup / "memory.max").write_text(limit + "\n")
        (cgroup / "memory.current").write_text(f"{current}\n")
    monkeypatch.setattr(heap, "MEMINFO", info)
    monkeypatch.setattr(heap, "CGROUP", cgroup)


MEMINFO = "MemTotal:       24683772 kB\nMemFree:        21203024 kB\nMemAvailable:   23260636 kB\n"


@pytest.mark.parametrize(("meminfo", "limit", "current", "expected"), [
    (MEMINFO, None, 0, 23260636 * 1024),
    (MEMINFO, "max", 5, 23260636 * 1024),
    (MEMINFO, str(8 << 30), 3 << 30, 5 << 30),  # a container's limit below the host's free memory
    (MEMINFO, str(1 << 30), 2 << 30, 0),  # over its limit already
    (None, str(8 << 30), 1 << 30, 7 << 30),
    ("MemTotal: 1 kB\n", None, 0, None),
    (None, None, 0, None),
])
def test_available(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, meminfo: str | None, limit: str | None,
                   current: int, expected: int | None) -> None:
    _fake(tmp_path, monkeypatch, meminfo, limit, current)
    assert heap.available() == expected


def test_gptq_budget_defaults_to_half_the_available_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from quantkit.gptq.budget import experts_per_chunk

    per_expert = 16 * 32 * 32 + 16 * 64 * 32
    monkeypatch.setattr(heap, "available", lambda: 10 * per_expert)
    assert experts_per_chunk(64, 32, None) == 5
    assert experts_per_chunk(64, 32, 2 * per_expert) == 2  # an explicit budget wins
    monkeypatch.setattr(heap, "available", lambda: None)
    assert experts_per_chunk(64, 32, None) >= 1 << 30
