"""Progress bars with ETA on stderr for long loops (tensors, layers, GPTQ steps)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType
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
    with StepProgress(label, len(items), enabled, console) as progress:
        yield from progress.track(items)


class StepProgress:
    """A progress bar over ``total`` items (count, elapsed, ETA) whose line also names the current step."""

    def __init__(self, label: str, total: int, enabled: bool = True, console: Console | None = None) -> None:
        columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                   TimeRemainingColumn(), TextColumn("{task.fields[step]}"))
        self._progress = Progress(*columns, console=console or Console(stderr=True), transient=True,
                                  disable=not enabled)
        self._task = self._progress.add_task(label, total=total, step="")

    def __enter__(self) -> StepProgress:
        self._progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._progress.stop()

    def step(self, text: str) -> None:
        self._progress.update(self._task, step=text)

    def track(self, items: Iterable[T]) -> Iterator[T]:
        """Yield ``items``, advancing the bar after each."""
        for item in items:
            yield item
            self._progress.advance(self._task)
