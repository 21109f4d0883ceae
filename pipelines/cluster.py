"""Where a stage's Dask work runs: an existing cluster by address, or a cluster of its own.

`ClusterConfig.kind` says which cluster a stage starts when there is no address to join:

- `local` (the default): a LocalCluster of `n_workers` on this host; with `gpus` set, one
  worker process per GPU instead, each with CUDA_VISIBLE_DEVICES pinned to its own device, so
  every worker's `cuda` is a different GPU (without pinning, every worker picks device 0).
- `slurm`, `pbs`, `lsf`: `jobqueue.jobs` batch jobs submitted through dask-jobqueue (the
  `segflow[hpc]` extra), each running `jobqueue.processes` workers on `jobqueue.cores` cores
  and `jobqueue.memory`. The scheduler runs in this process (on the login node): the compute
  nodes must reach it, and see the same files (paths and this Python).
- `jobqueue-local`: the same dask-jobqueue machinery with each "job" run as a local process
  (queue, account and walltime are ignored): try a batch configuration out on one host.

An address (`scheduler_address`, or Dask's own `scheduler-address` config such as
DASK_SCHEDULER_ADDRESS) always wins: the work joins that cluster, whatever `kind` says.

GPUs on many hosts: start one worker per GPU on each host and point the stages at the
scheduler, e.g. `dask scheduler` on one host, then on every GPU host, per device i,
`CUDA_VISIBLE_DEVICES=i dask worker tcp://SCHEDULER:8786 --nworkers 1 --nthreads 2
--name $(hostname)-gpu-i` (or `dask cuda worker tcp://SCHEDULER:8786` from dask-cuda, which
does the same), and `--scheduler-address tcp://SCHEDULER:8786` (or `cluster.scheduler_address`)
for the run. Under SLURM, one GPU per job does the pinning: `kind: slurm`, `jobqueue:
{processes: 1, job_extra_directives: ["--gres=gpu:1"], jobs: N}`. `worker_device` (run it
with `client.run(worker_device)`) names each worker's device to check the layout.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

import dask
from distributed import Client, LocalCluster, Nanny, Scheduler, SpecCluster, as_completed, wait
from distributed.comm import CommClosedError
from distributed.deploy import Cluster
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipelines.redaction import redact_uri
from pipelines.services import ServiceUnreachableError, connect_scheduler

if TYPE_CHECKING:
    from dask_jobqueue import JobQueueCluster

ClusterKind = Literal["local", "slurm", "pbs", "lsf", "jobqueue-local"]

#: The kinds whose workers dask-jobqueue starts as batch jobs.
JOBQUEUE_KINDS = ("slurm", "pbs", "lsf", "jobqueue-local")


class JobQueueConfig(BaseModel):
    """One batch job's resources and how many jobs to run: each job starts `processes` Dask
    workers sharing its `cores` and `memory`. Example, SLURM with one GPU per job (YAML):

        cluster:
          kind: slurm
          jobqueue: {queue: gpu, account: lab, cores: 8, memory: 64GiB, walltime: "04:00:00",
                     job_extra_directives: ["--gres=gpu:1"], jobs: 4}

    renders `#SBATCH -p gpu`, `-A lab`, `--cpus-per-task=8`, `--mem=64G`, `-t 04:00:00` and
    `--gres=gpu:1` above the worker command, and submits four such jobs.
    """

    model_config = ConfigDict(extra="forbid")

    queue: str | None = None
    #: Charged account or project: SLURM and PBS `-A`, LSF `-P`.
    account: str | None = None
    cores: int = Field(default=1, ge=1)
    memory: str = "4GiB"
    #: Dask worker processes per job; the job's cores are shared out among them as threads.
    processes: int = Field(default=1, ge=1)
    #: Hours:minutes:seconds (LSF gets hours:minutes, rounded up).
    walltime: str = Field(default="01:00:00", pattern=r"^\d+:[0-5]\d:[0-5]\d$")
    jobs: int = Field(default=1, ge=1)
    #: Further scheduler directives as written after `#SBATCH`, `#PBS` or `#BSUB`.
    job_extra_directives: list[str] = Field(default_factory=list)
    #: Shell lines run before the worker starts, e.g. `module load cuda` or activating a venv.
    job_script_prologue: list[str] = Field(default_factory=list)
    #: Worker scratch (spill) directory on the compute node, e.g. node-local `/scratch/$USER`.
    local_directory: str | None = None
    #: Where the jobs' output files go (the scheduler's default: the submit directory).
    log_directory: str | None = None
    #: The Python the jobs run (default: this process's interpreter, on a shared filesystem).
    python: str | None = None
    #: Network interface the scheduler and workers talk over, e.g. `ib0`.
    interface: str | None = None
    #: Seconds to wait for every job's workers to join (queued jobs count against it).
    start_timeout_s: float = Field(default=3600.0, gt=0)


class ClusterConfig(BaseModel):
    """Dask cluster settings: which cluster to start (`kind`, see the module docstring), or
    `scheduler_address` (or Dask's own `scheduler-address` config, e.g. DASK_SCHEDULER_ADDRESS)
    to move the work onto an existing cluster."""

    model_config = ConfigDict(extra="forbid")

    kind: ClusterKind = "local"
    scheduler_address: str | None = None
    n_workers: int = Field(default=2, ge=1)
    threads_per_worker: int = Field(default=1, ge=1)
    processes: bool = True
    memory_limit: str = "4GiB"
    #: `local` only: one worker process per GPU in place of `n_workers` ("all", or indices
    #: among the GPUs this process sees), each with its own device.
    gpus: list[int] | Literal["all"] | None = None
    #: The batch jobs of the `slurm`, `pbs`, `lsf` and `jobqueue-local` kinds.
    jobqueue: JobQueueConfig = Field(default_factory=JobQueueConfig)
    #: Seconds to wait for the scheduler at `scheduler_address` before giving up with one line.
    connect_timeout_s: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _gpus_on_local(self) -> ClusterConfig:
        if self.gpus is not None and self.kind != "local":
            raise ValueError(
                f"gpus applies to the local kind; under {self.kind}, ask the batch scheduler "
                "for GPUs in jobqueue.job_extra_directives (e.g. --gres=gpu:1, one per job)"
            )
        return self


@contextmanager
def dask_client(config: ClusterConfig | None = None) -> Iterator[Client]:
    """A Client for the configured cluster; a cluster it starts is closed on exit.
    An address that does not answer within `connect_timeout_s` raises ServiceUnreachableError,
    and so do batch jobs whose workers have not all joined within `jobqueue.start_timeout_s`."""
    config = config or ClusterConfig()
    address = config.scheduler_address or dask.config.get("scheduler-address", None)
    if address:
        with connect_scheduler(address, config.connect_timeout_s) as client:
            yield client
        return
    with _start_cluster(config) as cluster, Client(cluster) as client:
        if config.kind in JOBQUEUE_KINDS:
            _await_jobs(client, cluster, config)
        yield client


def _start_cluster(config: ClusterConfig) -> Cluster:
    if config.kind in JOBQUEUE_KINDS:
        return jobqueue_cluster(config)
    if config.gpus is not None:
        pins = gpu_pins(config.gpus, os.environ.get("CUDA_VISIBLE_DEVICES"), _cuda_device_count)
        return gpu_cluster(pins, config.threads_per_worker, config.memory_limit)
    return LocalCluster(
        n_workers=config.n_workers,
        threads_per_worker=config.threads_per_worker,
        processes=config.processes,
        memory_limit=config.memory_limit,
        dashboard_address=":0",  # a free port: many clusters may run side by side
    )


def gpu_pins(
    gpus: list[int] | Literal["all"], visible: str | None, device_count: Callable[[], int]
) -> list[str]:
    """CUDA_VISIBLE_DEVICES of each GPU worker: `gpus` index the devices this process sees,
    which are `visible` (its own CUDA_VISIBLE_DEVICES) when set, else `device_count()` devices.

    Example: gpu_pins([0, 1], "2,3", count) -> ["2", "3"]; gpu_pins("all", None, lambda: 2)
    -> ["0", "1"]; gpu_pins("all", "GPU-5e1c,GPU-77a0", count) -> ["GPU-5e1c", "GPU-77a0"].
    """
    if visible is not None:
        devices = [device.strip() for device in visible.split(",") if device.strip()]
    else:
        devices = [str(index) for index in range(device_count())]
    if gpus == "all":
        gpus = list(range(len(devices)))
    missing = [index for index in gpus if not 0 <= index < len(devices)]
    if not gpus or missing or len(set(gpus)) != len(gpus):
        raise ValueError(
            f"gpus {gpus}: this process sees {len(devices)} GPU(s) "
            f"(CUDA_VISIBLE_DEVICES={visible!r}); give distinct indices below that"
        )
    return [devices[index] for index in gpus]


def _cuda_device_count() -> int:
    import torch  # only here: a cluster without GPUs never pays for importing torch

    return torch.cuda.device_count()


def gpu_cluster(pins: list[str], threads_per_worker: int, memory_limit: str) -> SpecCluster:
    """One worker process (under a Nanny) per entry of `pins`, each seeing only that device as
    `cuda:0` through CUDA_VISIBLE_DEVICES; workers are named `gpu-<pin>`."""
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": ":0"}}
    workers = {
        f"gpu-{pin}": {
            "cls": Nanny,
            "options": {
                "host": "127.0.0.1",
                "nthreads": threads_per_worker,
                "memory_limit": memory_limit,
                "env": {"CUDA_VISIBLE_DEVICES": pin},
            },
        }
        for pin in pins
    }
    return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.WARN)


def worker_device() -> str:
    """The device a task on this worker computes on, with the GPU pinned to the worker if any.

    Example: `client.run(worker_device)` on a two-GPU cluster ->
    {"tcp://127.0.0.1:40211": "cuda:0 (CUDA_VISIBLE_DEVICES=0)",
     "tcp://127.0.0.1:35097": "cuda:0 (CUDA_VISIBLE_DEVICES=1)"}.
    """
    import torch

    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    pinned = os.environ.get("CUDA_VISIBLE_DEVICES")
    return device if pinned is None else f"{device} (CUDA_VISIBLE_DEVICES={pinned})"


def jobqueue_cluster(config: ClusterConfig) -> JobQueueCluster:
    """The dask-jobqueue cluster of a batch `kind`, its scheduler started and no job submitted
    yet (`cluster.job_script()` shows what each job will run; `cluster.scale(jobs=n)` submits).
    """
    try:
        import dask_jobqueue
        from dask_jobqueue.local import LocalCluster as LocalJobCluster
    except ImportError as exc:
        raise ValueError(
            f"cluster kind {config.kind} needs dask-jobqueue: pip install 'segflow[hpc]'"
        ) from exc
    jobs = config.jobqueue
    options: dict[str, Any] = {
        "cores": jobs.cores,
        "memory": jobs.memory,
        "processes": jobs.processes,
        "queue": jobs.queue,
        "job_extra_directives": jobs.job_extra_directives,
        "job_script_prologue": jobs.job_script_prologue,
        "local_directory": jobs.local_directory,
        "log_directory": jobs.log_directory,
        "python": jobs.python,
        "interface": jobs.interface,
        "scheduler_options": {"dashboard_address": ":0"},
    }
    if config.kind == "jobqueue-local":
        return LocalJobCluster(**options)
    if config.kind == "lsf":
        return dask_jobqueue.LSFCluster(
            **options, project=jobs.account, walltime=_hours_minutes(jobs.walltime)
        )
    cls = dask_jobqueue.SLURMCluster if config.kind == "slurm" else dask_jobqueue.PBSCluster
    return cls(**options, account=jobs.account, walltime=jobs.walltime)


def _hours_minutes(walltime: str) -> str:
    """LSF's `-W` limit: "01:30:20" -> "01:31" (rounded up to the minute)."""
    hours, minutes, seconds = (int(part) for part in walltime.split(":"))
    total = hours * 60 + minutes + (seconds > 0)
    return f"{total // 60:02d}:{total % 60:02d}"


def _await_jobs(client: Client, cluster: JobQueueCluster, config: ClusterConfig) -> None:
    """Submit the configured jobs and wait until all their workers joined: stages size their
    work by the workers present (`default_in_flight`), and none present means nothing runs."""
    jobs = config.jobqueue
    expected = jobs.jobs * jobs.processes
    cluster.scale(jobs=jobs.jobs)
    try:
        client.wait_for_workers(expected, timeout=jobs.start_timeout_s)
    except TimeoutError as exc:
        joined = len(client.nthreads())
        raise ServiceUnreachableError(
            f"{joined} of {expected} Dask workers of the {config.kind} jobs joined within "
            f"{jobs.start_timeout_s:g} s (jobs still queued or failed: see the queue and the "
            f"jobs' output in {jobs.log_directory or 'the submit directory'})"
        ) from exc


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
