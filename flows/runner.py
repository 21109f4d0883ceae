"""Run one flow from the command line: Prefect settings for the workdir, quiet logs, live bars,
and the run's summary back whether or not some slides failed."""

from __future__ import annotations

import atexit
import os
import sys
from dataclasses import dataclass
from uuid import UUID

from prefect import Flow
from rich.console import Console

from flows import progress
from flows.console import quiet_console, quiet_logging, stage_bars
from flows.outcomes import RunSummary, SlideFailures
from flows.runtime import Runtime, prefect_session


@dataclass(frozen=True)
class FlowOutcome:
    summary: RunSummary
    flow_run_id: UUID | None


def run_flow(flow: Flow, runtime: Runtime, verbose: bool = False, **parameters) -> FlowOutcome:
    """Call `flow(runtime=runtime, **parameters)`; a run that failed because of some slides
    returns its summary, any other failure raises."""
    with (
        prefect_session(runtime, os.environ),
        quiet_logging(verbose),
        stage_bars(Console(file=sys.stderr)) as bars,
        progress.reporting(bars),
    ):
        state = flow(runtime=runtime, return_state=True, **parameters)
    if not verbose:
        # Prefect stops its temporary server at exit and says so; registered after it, this
        # runs first and keeps that line off the terminal too.
        atexit.unregister(quiet_console)
        atexit.register(quiet_console)
    result = state.result(raise_on_failure=False)
    if isinstance(result, SlideFailures):
        result = result.summary
    elif isinstance(result, BaseException):
        raise result
    return FlowOutcome(result, state.state_details.flow_run_id)
