"""Which MLflow runs this process is training in, so an interrupted command ends exactly its own
(light: MLflow's client only, no Lightning)."""

from __future__ import annotations

import os
import socket

from mlflow.tracking import MlflowClient

#: MLflow tag: the process (host:pid) a run is training in, so an interrupted command can end
#: exactly its own runs (`end_process_runs`).
PROCESS_TAG = "segflow.process"


def process_identity() -> str:
    """This process, as PROCESS_TAG records it."""
    return f"{socket.gethostname()}:{os.getpid()}"


def end_process_runs(tracking_uri: str, status: str = "KILLED") -> list[str]:
    """End the runs this process is training in that are still RUNNING (ids of those ended)."""
    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    runs = client.search_runs(
        experiments,
        f"attributes.status = 'RUNNING' and tags.`{PROCESS_TAG}` = '{process_identity()}'",
    )
    for run in runs:
        client.set_terminated(run.info.run_id, status)
    return [run.info.run_id for run in runs]
