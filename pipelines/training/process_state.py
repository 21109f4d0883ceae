"""Training's process-wide side effects, put back when it returns.

Lightning's MLFlowLogger and `mlflow.pytorch.log_model` (which has no client form) point
MLflow's fluent API at the run's tracking URI with `mlflow.set_tracking_uri`, which also
writes MLFLOW_TRACKING_URI into the environment; `pl.seed_everything` exports its seed for
DataLoader workers. Left in place, a second training in the same process with another workdir
would log to the first one's store, and the caller's environment would have changed behind
its back.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import mlflow

# MLflow's own setting, read from its private global because the public getter cannot tell
# "never set" (None) from the default it falls back to.
from mlflow.tracking._tracking_service import utils as tracking_service_utils

#: Environment variables training sets for itself and its worker processes.
VARIABLES = (
    "MLFLOW_TRACKING_URI",
    "PL_GLOBAL_SEED",
    "PL_SEED_WORKERS",
    "_MLFLOW_TELEMETRY_SESSION_ID",
)


@contextmanager
def process_state_kept() -> Iterator[None]:
    """MLflow's tracking URI and `VARIABLES` as they were before the block, after it."""
    tracking_uri = tracking_service_utils._tracking_uri
    saved = {name: os.environ.get(name) for name in VARIABLES}
    try:
        yield
    finally:
        mlflow.set_tracking_uri(tracking_uri)  # None unsets it (and its variable)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
