"""Run one flow from the command line: Prefect settings for the workdir, quiet logs, live bars,
and the run's summary back whether or not some slides failed."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from uuid import UUID

import prefect.settings
from prefect import Flow, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import FlowRun
from prefect.states import Cancelled, State
from rich.console import Console

from flows import progress
from flows.console import quiet_logging, stage_bars
from flows.interrupt import on_interrupt
from flows.outcomes import RunSummary, SlideFailures
from flows.runtime import prefect_session
from pipelines.runtime import Runtime
from pipelines.training.process_runs import end_process_runs


@dataclass(frozen=True)
class FlowOutcome:
    summary: RunSummary
    flow_run_id: UUID | None


def run_flow(flow: Flow, runtime: Runtime, verbose: bool = False, **parameters) -> FlowOutcome:
    """Call `flow(runtime=runtime, **parameters)`; a run that failed because of some slides
    returns its summary, any other failure raises. Interrupted (flows.interrupt), the flow run
    ends Cancelled and the MLflow runs it trains in end KILLED."""
    flow_runs: list[UUID] = []

    def running(flow: Flow, flow_run: FlowRun, state: State) -> None:
        flow_runs.append(flow_run.id)

    def end_training(reason: str) -> None:
        store = runtime.tracking_store  # None: a workdir on object storage, no store at all
        embedded = runtime.tracking_uri is None and isinstance(runtime.workdir, Path)
        if store is None or (embedded and not (runtime.workdir / "mlflow.db").exists()):
            return  # nothing tracked yet; creating the embedded store takes seconds
        end_process_runs(store)

    with (
        quiet_logging(verbose),  # first: starting the temporary server logs a line
        prefect_session(runtime) as api_url,
        on_interrupt(partial(cancel_flow_runs, api_url, flow_runs)),
        on_interrupt(end_training),
        stage_bars(Console(file=sys.stderr)) as bars,
        progress.reporting(bars),
    ):
        recorded = flow.with_options(on_running=[*flow.on_running_hooks, running])
        state = recorded(runtime=runtime, return_state=True, **parameters)
    result = state.result(raise_on_failure=False)
    if isinstance(result, SlideFailures):
        result = result.summary
    elif isinstance(result, BaseException):
        raise result
    return FlowOutcome(result, state.state_details.flow_run_id)


def cancel_flow_runs(api_url: str, flow_runs: list[UUID], reason: str) -> None:
    """Force `flow_runs` and their unfinished task runs into Cancelled, saying why."""
    with (
        prefect.settings.temporary_settings({prefect.settings.PREFECT_API_URL: api_url}),
        get_client(sync_client=True) as client,
    ):
        for flow_run in flow_runs:
            tasks = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run]))
            )
            for task in tasks:
                if task.state is None or not task.state.is_final():
                    client.set_task_run_state(task.id, Cancelled(message=reason), force=True)
            client.set_flow_run_state(flow_run, Cancelled(message=reason), force=True)
