"""The summary table a person sees at the end of an inference run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from rich.console import Console
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
    seams: dict[str, int] | None


def summary_table(results: Sequence[SlideSummary]) -> Table:
    """Slide, size, tissue %, seconds, Mpx/s and class fractions per slide."""
    table = Table(title="segflow inference")
    columns = ("slide", "status", "size", "tissue %", "seconds", "Mpx/s", "classes %", "objects")
    for column in columns:
        table.add_column(column, justify="left" if column in ("slide", "status") else "right")
    for r in results:
        size = f"{r.shape[0]} x {r.shape[1]}" if r.shape else "-"
        tissue = f"{100 * r.tissue_fraction:.1f}" if r.tissue_fraction is not None else "-"
        speed = f"{r.mpx_per_s:.2f}" if r.mpx_per_s is not None else "-"
        classes = (
            " / ".join(f"{100 * f:.1f}" for f in r.class_fractions) if r.class_fractions else "-"
        )
        objects = seam_line(r.seams) if r.seams else "-"
        table.add_row(r.name, r.status, size, tissue, f"{r.seconds:.1f}", speed, classes, objects)
    return table


def seam_line(seams: dict[str, int]) -> str:
    """The seam report in a line: "1204 objects, 31 across chunk borders (33 pieces merged),
    largest 812 px, 0 ending on a border"."""
    return (
        f"{seams['n_components']} objects, {seams['crossing']} across chunk borders "
        f"({seams['merged_pieces']} pieces merged), largest {seams['largest']} px, "
        f"{seams['ending_at_faces']} ending on a border"
    )


def print_summary(results: Sequence[SlideSummary], console: Console | None = None) -> None:
    """The table, then one line per slide that failed or was skipped, saying why."""
    console = console or Console()
    console.print(summary_table(results))
    for r in results:
        if r.error is not None:
            console.print(f"{r.name} {r.status}: {r.error}", markup=False, highlight=False)
