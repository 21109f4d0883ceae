"""Where a stage's Dask work runs: an existing cluster by address, or a LocalCluster of its own."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import dask
from distributed import Client, LocalCluster, as_completed
from pydantic import BaseModel, ConfigDict, Field

from pipelines.services import connect_scheduler


class ClusterConfig(BaseModel):
    """Dask cluster settings; `scheduler_address` (or Dask's own `scheduler-address` config,
    e.g. DASK_SCHEDULER_ADDRESS) moves the work onto an existing cluster."""

    model_config = ConfigDict(extra="forbid")

    scheduler_address: str | None = None
    n_workers: int = Field(default=2, ge=1)
    threads_per_worker: int = Field(default=1, ge=1)
    processes: bool = True
    memory_limit: str = "4GiB"
    #: Seconds to wait for the scheduler at `scheduler_address` before giving up with one line.
    connect_timeout_s: float = Field(default=10.0, gt=0)


@contextmanager
def dask_client(config: ClusterConfig | None = None) -> Iterator[Client]:
    """A Client for the configured cluster; a LocalCluster it starts is closed on exit.
    An address that does not answer within `connect_timeout_s` raises ServiceUnreachableError."""
    config = config or ClusterConfig()
    address = config.scheduler_address or dask.config.get("scheduler-address", None)
    if address:
        with connect_scheduler(address, config.connect_timeout_s) as client:
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


def map_bounded(
    client: Client | None,
    fn: Callable[..., Any],
    jobs: Iterable[tuple[Any, tuple]],
    max_in_flight: int,
) -> Iterator[tuple[Any, Any]]:
    """(key, fn(*args)) for every (key, args), in completion order: in-process without a client,
    else as Dask tasks with at most `max_in_flight` submitted at once (memory and the scheduler's
    task count stay bounded however many jobs there are, and results arrive as they finish)."""
    if client is None:
        for key, args in jobs:
            yield key, fn(*args)
        return
    jobs = iter(jobs)
    keys: dict[Any, Any] = {}
    queue = as_completed()
    for key, args in jobs:
        future = client.submit(fn, *args, pure=False)
        keys[future] = key
        queue.add(future)
        if queue.count() >= max_in_flight:
            break
    for future in queue:
        yield keys.pop(future), future.result()
        future.release()
        for key, args in jobs:
            nxt = client.submit(fn, *args, pure=False)
            keys[nxt] = key
            queue.add(nxt)
            break
