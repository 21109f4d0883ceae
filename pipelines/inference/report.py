"""What a person watching the run sees: progress bars while it runs, a summary table at the end."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

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
from rich.table import Table


class SlideSummary(Protocol):
    """The fields of an inference result that the summary shows."""

    name: str
    status: str
    error: str | None
    shape: tuple[int, int] | None
    tissue_fraction: float | None
    seconds: float
    mpx_per_s: float | None
    class_fractions: list[float] | None


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


def summary_table(results: Sequence[SlideSummary]) -> Table:
    """Slide, size, tissue %, seconds, Mpx/s and class fractions per slide."""
    table = Table(title="segflow inference")
    for column in ("slide", "status", "size", "tissue %", "seconds", "Mpx/s", "classes %"):
        table.add_column(column, justify="left" if column in ("slide", "status") else "right")
    for r in results:
        size = f"{r.shape[0]} x {r.shape[1]}" if r.shape else "-"
        tissue = f"{100 * r.tissue_fraction:.1f}" if r.tissue_fraction is not None else "-"
        speed = f"{r.mpx_per_s:.2f}" if r.mpx_per_s is not None else "-"
        classes = (
            " / ".join(f"{100 * f:.1f}" for f in r.class_fractions) if r.class_fractions else "-"
        )
        table.add_row(r.name, r.status, size, tissue, f"{r.seconds:.1f}", speed, classes)
    return table


def print_summary(results: Sequence[SlideSummary], console: Console | None = None) -> None:
    """The table, then one line per slide that failed or was skipped, saying why."""
    console = console or Console()
    console.print(summary_table(results))
    for r in results:
        if r.error is not None:
            console.print(f"{r.name} {r.status}: {r.error}", markup=False, highlight=False)
