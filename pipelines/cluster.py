"""Where a stage's Dask work runs: an existing cluster by address, or a LocalCluster of its own."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from contextlib import contextmanager
from typing import Any

import dask
from distributed import Client, LocalCluster, as_completed, wait
from distributed.comm import CommClosedError
from pydantic import BaseModel, ConfigDict, Field

from pipelines.redaction import redact_uri
from pipelines.services import ServiceUnreachableError, connect_scheduler


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


class SchedulerLostError(ServiceUnreachableError):
    """The Dask scheduler went away mid-run: its work is gone and nothing later can reach it."""


#: How long a closed connection may go before the client notices its scheduler is gone.
NOTICE_S = 5.0


def _lost(client: Client) -> bool:
    # "connecting": the connection dropped and the client tries to reconnect (for its connect
    # timeout); Dask has cancelled every future already, so the run's work is gone either way.
    return client.status in ("connecting", "closing", "closed")


def _closed_comm(error: BaseException | None) -> bool:
    """Whether `error` or one of its causes is a closed Dask connection."""
    while error is not None:
        if isinstance(error, CommClosedError):
            return True
        error = error.__cause__ or error.__context__
    return False


def _noticed_lost(client: Client, error: Exception) -> bool:
    """Whether `error` came from losing the scheduler. A call on the connection can fail with
    CommClosedError a moment before the client itself notices (its status still "running"),
    so such an error waits up to NOTICE_S for it; any other error is judged at once."""
    deadline = time.monotonic() + (NOTICE_S if _closed_comm(error) else 0.0)
    while not _lost(client) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _lost(client)


@contextmanager
def scheduler_kept(client: Client | None) -> Iterator[None]:
    """Run a block of Dask work on `client`; whatever fails because its scheduler went away
    (cancelled futures, a KeyError from an emptied `scheduler_info`) raises SchedulerLostError
    instead, one line naming the scheduler. A client that has lost it already fails at once:
    a submit would wait out the reconnect and then be cancelled."""
    if client is None:
        yield
        return
    # Read now: a closed client forgets its scheduler's address.
    address = redact_uri(client.scheduler.address) if client.scheduler is not None else "?"
    lost = SchedulerLostError(
        f"lost the Dask scheduler at {address} (the connection dropped; Dask cancelled the "
        "work running there)"
    )
    if _lost(client):
        raise lost
    try:
        yield
    except SchedulerLostError:
        raise
    except Exception as exc:
        if _noticed_lost(client, exc):
            raise lost from exc
        raise


def default_in_flight(client: Client | None) -> int:
    """Tasks to keep submitted at once: two per worker thread (one running, one queued so no
    thread idles between tasks), or two per core without a cluster."""
    threads = sum(client.nthreads().values()) if client is not None else os.cpu_count() or 1
    return 2 * threads


def map_bounded(
    client: Client | None,
    fn: Callable[..., Any],
    jobs: Iterable[tuple[Any, tuple]],
    max_in_flight: int,
) -> Iterator[tuple[Any, Any]]:
    """(key, fn(*args)) for every (key, args), in completion order: as Dask tasks on `client`,
    else on up to `max_in_flight` local threads. At most `max_in_flight` calls are submitted at
    once, so memory and the scheduler's task count stay bounded however many jobs there are.

    This is every stage's one way of running its Dask work. When a call fails (or the caller
    stops early), no more are submitted and the calls still running are waited for before the
    error propagates: a running Dask task cannot be cancelled, and a stage that then removes
    its temporary output must not have late writes land in it.
    """
    if client is None:
        yield from _map_threads(fn, jobs, max_in_flight)
        return
    jobs = iter(jobs)
    keys: dict[Any, Any] = {}
    queue = as_completed()

    def submit_next() -> None:
        for key, args in jobs:
            future = client.submit(fn, *args, pure=False)
            keys[future] = key
            queue.add(future)
            return

    for _ in range(max_in_flight):
        submit_next()
    try:
        for future in queue:
            yield keys.pop(future), future.result()
            future.release()
            submit_next()
    finally:
        _settle(client, list(keys))


def _settle(client: Client, futures: list) -> None:
    """Wait for futures still running, whatever their outcome (not when the scheduler is gone:
    Dask has cancelled them, and waiting would only wait out the reconnect)."""
    if futures and not _lost(client):
        wait(futures)


def _map_threads(
    fn: Callable[..., Any], jobs: Iterable[tuple[Any, tuple]], max_in_flight: int
) -> Iterator[tuple[Any, Any]]:
    # Leaving the pool's block waits for the calls still running, as `_settle` does.
    with ThreadPoolExecutor(max_workers=max_in_flight) as pool:
        jobs = iter(jobs)
        pending: dict[Future, Any] = {}

        def submit_next() -> None:
            for key, args in jobs:
                pending[pool.submit(fn, *args)] = key
                return

        for _ in range(max_in_flight):
            submit_next()
        while pending:
            done, _ = futures_wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                key = pending.pop(future)
                yield key, future.result()
                submit_next()
