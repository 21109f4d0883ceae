"""What a person watching an archive run sees while it runs: a bar over its slides and one per
slide over that slide's work (blocks, regions)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class RunProgress:
    """One bar over the archive's slides and one per slide over its blocks."""

    def __init__(self, progress: Progress | None, n_slides: int) -> None:
        self._progress = progress
        self._archive = (
            progress.add_task("slides", total=n_slides) if progress and n_slides > 1 else None
        )

    def slide(self, name: str, n_blocks: int, done: int) -> TaskID | None:
        if self._progress is None:
            return None
        return self._progress.add_task(name, total=n_blocks, completed=done)

    def advance(self, task: TaskID | None, steps: int = 1) -> None:
        if self._progress is not None and task is not None:
            self._progress.advance(task, steps)

    def slide_done(self, task: TaskID | None) -> None:
        """Hide a finished slide's bar."""
        if self._progress is not None and task is not None:
            self._progress.update(task, visible=False)

    def archive_advance(self) -> None:
        """One more slide handled, whatever its outcome."""
        if self._progress is not None and self._archive is not None:
            self._progress.advance(self._archive)


@contextmanager
def run_progress(
    enabled: bool, n_slides: int, console: Console | None = None
) -> Iterator[RunProgress]:
    """Live progress bars when `enabled` (rich renders them only on a terminal)."""
    if not enabled:
        yield RunProgress(None, n_slides)
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        yield RunProgress(progress, n_slides)
