"""Training's process-wide side effects, put back when it returns.

Lightning's MLFlowLogger and `mlflow.pytorch.log_model` (which has no client form) point
MLflow's fluent API at the run's tracking URI with `mlflow.set_tracking_uri`, which also
writes MLFLOW_TRACKING_URI into the environment; `pl.seed_everything` exports its seed for
DataLoader workers. Left in place, a second training in the same process with another workdir
would log to the first one's store, and the caller's environment would have changed behind
its back.

A workdir on object storage adds one more: Lightning reaches checkpoints through fsspec
(`lightning_fabric.utilities.cloud_io.get_filesystem(path)`) with no storage options:
`ModelCheckpoint.setup` builds its filesystem that way (to list, test and write its folder),
as do `TorchCheckpointIO` and the checkpoint connector. A CheckpointIO plugin would pass our
endpoint and credentials to the saves and loads but not to ModelCheckpoint's own filesystem,
and a local folder mirrored to the bucket would be a second copy of every checkpoint to keep
in step. fsspec's per-protocol defaults (`fsspec.config.conf`, which every filesystem made
without those arguments takes) reach all of them; `checkpoints_reach` sets them for the
workdir's protocol and takes them back after. They are defaults: an `ObjectUrl`'s own
settings win, but one that leaves a setting unset (the endpoint of AWS itself) would take the
workdir's, so `pipelines.train.run_training` trains with such a workdir in a child process of
its own, where nothing else runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import fsspec.config
import mlflow

# MLflow's own setting, read from its private global because the public getter cannot tell
# "never set" (None) from the default it falls back to.
from mlflow.tracking._tracking_service import utils as tracking_service_utils

from pipelines.location import ObjectUrl, Where

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


@contextmanager
def checkpoints_reach(workdir: Where) -> Iterator[None]:
    """Within the block, fsspec filesystems of `workdir`'s protocol made without arguments
    (Lightning's) reach it with its storage settings (module docstring); a local workdir
    changes nothing."""
    if not isinstance(workdir, ObjectUrl):
        yield
        return
    protocol = workdir.protocol
    saved = fsspec.config.conf.get(protocol)
    fsspec.config.conf[protocol] = workdir.storage.storage_options(protocol)
    try:
        yield
    finally:
        if saved is None:
            fsspec.config.conf.pop(protocol, None)
        else:
            fsspec.config.conf[protocol] = saved
