"""Progress of a flow run as its tasks finish, for whoever is watching (the command line's bars).

Flows report through the reporter installed in a context variable; with none installed (a
deployment run, a test) reporting does nothing. Flow parameters cannot carry a callback, and a
context variable reaches the flow body, which runs in the caller's thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol

from flows.outcomes import StageOutcome


class Reporter(Protocol):
    def stage_started(self, stage: str, total: int) -> None: ...

    def task_finished(self, outcome: StageOutcome) -> None: ...


_reporter: ContextVar[Reporter | None] = ContextVar("segflow_reporter", default=None)


@contextmanager
def reporting(reporter: Reporter) -> Iterator[None]:
    """Send the progress of flows run inside the block to `reporter`."""
    token = _reporter.set(reporter)
    try:
        yield
    finally:
        _reporter.reset(token)


def stage_started(stage: str, total: int) -> None:
    if (reporter := _reporter.get()) is not None:
        reporter.stage_started(stage, total)


def task_finished(outcome: StageOutcome) -> None:
    if (reporter := _reporter.get()) is not None:
        reporter.task_finished(outcome)
