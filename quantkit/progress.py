"""Progress bars with ETA on stderr for long loops (tensors, layers)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")


def track(items: Sequence[T], label: str, enabled: bool = True, console: Console | None = None) -> Iterator[T]:
    """Yield ``items`` while a transient progress bar (count, elapsed, ETA) runs."""
    if not enabled:
        yield from items
        return
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
               TimeRemainingColumn())
    with Progress(*columns, console=console or Console(stderr=True), transient=True) as progress:
        yield from progress.track(items, total=len(items))
