"""What the command line shows: a progress bar per stage while a flow runs, a table at the end."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from flows.outcomes import STAGES, RunSummary, StageOutcome, TrainedModel

#: Loggers with handlers of their own: the root (Prefect's console handler), MLflow's and
#: distributed's (a lost scheduler's reconnect logs tracebacks over the one-line error).
QUIET_LOGGERS = ("", "mlflow", "distributed", "distributed.client")
ARTIFACT_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
#: Stages whose library shows its own progress bar.
OWN_PROGRESS = frozenset({"train"})
STATUS_STYLE = {"written": "green", "skipped": "cyan", "cached": "blue"}


class StageBars:
    """A flows.progress.Reporter drawing one rich bar per stage."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._bars: dict[str, TaskID] = {}
        self._failed: dict[str, int] = {}

    def stage_started(self, stage: str, total: int) -> None:
        self._bars[stage] = self._progress.add_task(stage, total=total, failed="")
        if stage in OWN_PROGRESS:
            # Lightning draws its own live bar (steps, loss) on a terminal; two live displays
            # would overwrite each other, so ours pauses while it trains.
            self._progress.stop()

    def task_finished(self, outcome: StageOutcome) -> None:
        bar = self._bars.get(outcome.stage)
        if bar is None:
            return
        if outcome.stage in OWN_PROGRESS:
            self._progress.start()
        if outcome.failed:
            self._failed[outcome.stage] = self._failed.get(outcome.stage, 0) + 1
        failed = self._failed.get(outcome.stage)
        self._progress.update(bar, advance=1, failed=f"[red]{failed} failed" if failed else "")


@contextmanager
def stage_bars(console: Console) -> Iterator[StageBars]:
    """Live bars on `console` (rich draws them only on a terminal) for the block's duration."""
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description:<8}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[failed]}"),
        console=console,
    )
    with progress:
        yield StageBars(progress)


def summary_table(summary: RunSummary) -> Table:
    """One row per slide, one column per stage it went through."""
    stages = [s for s in STAGES if s != "train" and summary.of(s)]
    table = Table(title=summary.headline(), title_justify="left")
    table.add_column("slide")
    for stage in stages:
        table.add_column(stage)
    table.add_column("seconds", justify="right")
    table.add_column("problem", overflow="fold")
    rows: dict[str, dict[str, StageOutcome]] = {}
    for outcome in summary.outcomes:
        if outcome.stage in stages:
            rows.setdefault(outcome.slide, {})[outcome.stage] = outcome
    for slide, row in rows.items():
        cells = [_cell(row.get(stage)) for stage in stages]
        seconds = f"{sum(o.seconds for o in row.values()):.1f}"
        problems = "; ".join(o.detail for o in row.values() if o.failed and o.detail)
        table.add_row(slide, *cells, seconds, problems)
    return table


def print_report(console: Console, summary: RunSummary, tracking_uri: str | None) -> None:
    """What a command prints at its end: the slide table (the headline alone when no slide
    went through), then what training registered in `tracking_uri`, if it did (a run with no
    MLflow store, None, trains nothing)."""
    table = summary_table(summary)
    console.print(table if table.row_count else Text(summary.headline()))
    if summary.trained is not None and tracking_uri is not None:
        for line in trained_lines(summary.trained, tracking_uri):
            # Unwrapped, so that ids and links copy whole; Text, so no name reads as markup.
            console.print(Text(line), soft_wrap=True)


def trained_lines(model: TrainedModel, tracking_uri: str) -> list[str]:
    """The registered version, its aliases, its MLflow run (a link on an http(s) server) and
    its metrics, a line each."""
    verdict = "became champion" if model.champion else "did not beat the champion"
    aliases = ", ".join(model.aliases) or "none"
    run = f"MLflow run: {model.run_id}"
    link = mlflow_run_link(tracking_uri, model.experiment_id, model.run_id)
    lines = [
        f"model:      {model.name} version {model.version} ({verdict}; aliases moved: {aliases})",
        run + (f"  {link}" if link else ""),
    ]
    metrics = shown_metrics(model.metrics)
    if metrics:
        lines.append("metrics:    " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return lines


def shown_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The run's scores, the best validation IoU first; learning rates left out (the
    monitor logs one per optimizer as `lr-<name>`)."""
    scores = {k: v for k, v in sorted(metrics.items()) if not k.startswith("lr-")}
    best = {k: scores.pop(k) for k in ("best_val_iou",) if k in scores}
    return best | scores


def mlflow_run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI of an http(s) tracking server, without credentials;
    None for other stores (a SQLite file has no UI until `mlflow ui` serves it)."""
    parts = urlsplit(tracking_uri)
    if parts.scheme not in ("http", "https") or not experiment_id or not run_id:
        return None
    host = parts.netloc.rpartition("@")[2]  # user:password@ stays out of what is printed
    base = urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def _cell(outcome: StageOutcome | None) -> str:
    if outcome is None:
        return "–"
    if outcome.failed:
        return "[bold red]failed"
    return f"[{STATUS_STYLE.get(outcome.status, 'white')}]{outcome.status}"


@contextmanager
def quiet_logging(verbose: bool) -> Iterator[None]:
    """Keep library logs and warnings (Prefect's per-task lines, tifffile, distributed) off the
    terminal unless `verbose`: the bars and the table say what happened, and Prefect's API
    keeps the full logs of every run. Everything is put back as it was afterwards."""
    capturing = logging._warnings_showwarning is not None  # captureWarnings has no getter
    logging.captureWarnings(True)
    handlers = [h for name in QUIET_LOGGERS for h in logging.getLogger(name).handlers]
    levels = {handler: handler.level for handler in handlers}
    bar = os.environ.get(ARTIFACT_BAR)
    if not verbose:
        for handler in handlers:
            handler.setLevel(logging.CRITICAL)
        # MLflow draws a tqdm bar per artifact download, across the live bars.
        os.environ[ARTIFACT_BAR] = "false"
    try:
        yield
    finally:
        for handler, level in levels.items():
            handler.setLevel(level)
        if bar is None:
            os.environ.pop(ARTIFACT_BAR, None)
        else:
            os.environ[ARTIFACT_BAR] = bar
        logging.captureWarnings(capturing)
