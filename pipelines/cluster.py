"""Where a stage's Dask work runs: an existing cluster by address, or a LocalCluster of its own."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dask
from distributed import Client, LocalCluster
from pydantic import BaseModel, Field


class ClusterConfig(BaseModel):
    """Dask cluster settings; `scheduler_address` (or Dask's own `scheduler-address` config,
    e.g. DASK_SCHEDULER_ADDRESS) moves the work onto an existing cluster."""

    scheduler_address: str | None = None
    n_workers: int = Field(default=2, ge=1)
    threads_per_worker: int = Field(default=1, ge=1)
    processes: bool = True
    memory_limit: str = "4GiB"


@contextmanager
def dask_client(config: ClusterConfig | None = None) -> Iterator[Client]:
    """A Client for the configured cluster; a LocalCluster it starts is closed on exit."""
    config = config or ClusterConfig()
    address = config.scheduler_address or dask.config.get("scheduler-address", None)
    if address:
        with Client(address) as client:
            yield client
        return
    with (
        LocalCluster(
            n_workers=config.n_workers,
            threads_per_worker=config.threads_per_worker,
            processes=config.processes,
            memory_limit=config.memory_limit,
            dashboard_address=":0",  # a free port: many clusters may run side by side
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client
