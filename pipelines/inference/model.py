"""The model on the workers: its weights shipped once per worker, built there once.

Kept free of MLflow and Lightning imports (pipelines.inference.source resolves URIs on the
client), so worker processes start in a few seconds.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass

import torch
from distributed import Client, Worker, WorkerPlugin

from pipelines.numerics import NumericLayout
from segcore.model import UNet
from segcore.tiling import default_tile_size


@dataclass(frozen=True)
class ModelSource:
    """A model resolved to its weights: what every worker loads, whatever the URI pointed to."""

    uri: str
    version: str | None
    config: dict
    state: dict[str, torch.Tensor]
    digest: str

    def build(self) -> UNet:
        model = UNet.from_config(self.config)
        model.load_state_dict(self.state)
        return model.eval()


def _device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


class ForwardSlot:
    """One forward pass at a time on a worker, each under the session's torch threads:
    `with plugin.lock:` around a pass, while the worker's other threads read and write blocks.

    torch's CPU thread count is per calling thread (OpenMP): a Dask thread keeps the count it
    first ran torch with, whatever the process was told since (measured: after a process
    cluster had run, an in-process worker's threads no longer matched its caller's). So
    entering sets the calling thread's count to `threads`: the session's choice in a worker
    process Dask started, the caller's own count in the caller's process (an in-process
    cluster), which `sets_threads` False keeps. `threads` is None on a GPU (nothing to fix).
    """

    def __init__(self, sets_threads: bool, threads: int | None) -> None:
        self.sets_threads = sets_threads
        self.threads = threads
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        self._lock.acquire()
        if self.threads is not None:
            torch.set_num_threads(self.threads)

    def __exit__(self, *exc_info: object) -> None:
        self._lock.release()


@dataclass(frozen=True)
class WorkerProfile:
    """What a worker computes with, before the session fixes its threads."""

    device: str
    hardware: str
    torch: str
    #: Its torch threads per forward pass (its share of the host's cores; the caller's count
    #: in the caller's process); None on a GPU.
    threads: int | None
    #: Whether the session may set its threads (a worker process Dask started for the work).
    sets_threads: bool
    tile_size: int


class ModelPlugin(WorkerPlugin):
    """Builds the model once per worker in `setup`; block tasks find it in `worker.plugins`.

    `lock` (a `ForwardSlot`) serialises forward passes within a worker, so a worker's other
    threads read and write blocks while one computes instead of competing for the same cores
    or GPU, and runs each pass with the threads the session fixed (`use_threads`).
    """

    def __init__(
        self,
        source: ModelSource,
        device: str,
        channels_last: bool,
        compile_model: bool,
        workers_per_host: dict[str, int],
    ) -> None:
        self.source = source
        self.requested_device = device
        self.channels_last = channels_last
        self.compile_model = compile_model
        self.workers_per_host = workers_per_host
        #: The process that registered the plugin: its torch settings are its caller's.
        self.client_process = (socket.gethostname(), os.getpid())
        #: The caller's torch threads: an in-process worker computes with them.
        self.caller_threads = torch.get_num_threads()

    def setup(self, worker: Worker) -> None:
        self.device = _device(self.requested_device)
        own_process = (socket.gethostname(), os.getpid()) != self.client_process
        if own_process:
            self._tune_worker_process(worker)
        model = self.source.build().to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model: torch.nn.Module = torch.compile(model) if self.compile_model else model
        self.unet = model
        threads = torch.get_num_threads() if own_process else self.caller_threads
        self.lock = ForwardSlot(own_process, threads if self.device.type == "cpu" else None)
        self.source = None  # the weights live in the model now

    def _tune_worker_process(self, worker: Worker) -> None:
        """Process-wide torch settings, only in a worker process Dask started for this work
        (never in the caller's own process, where an in-process cluster's workers run)."""
        if self.device.type == "cpu":
            # Dask starts workers with OMP_NUM_THREADS=1; share this host's cores among its
            # workers instead (the block lock keeps one forward pass per worker at a time).
            host = worker.address.rsplit(":", 1)[0]
            cores = len(os.sched_getaffinity(0))
            torch.set_num_threads(max(1, cores // self.workers_per_host.get(host, 1)))
        else:
            torch.backends.cudnn.benchmark = True

    def profile(self, batch_size: int) -> WorkerProfile:
        """This worker's numerics and the default tile size for its memory."""
        cpu = self.device.type == "cpu"
        return WorkerProfile(
            device=self.device.type,
            hardware=torch.backends.cpu.get_cpu_capability()
            if cpu
            else torch.cuda.get_device_name(self.device),
            torch=torch.__version__,
            threads=self.lock.threads,
            sets_threads=self.lock.sets_threads,
            tile_size=default_tile_size(self.unet, self.device, batch_size),
        )

    def use_threads(self, threads: int | None) -> None:
        """Run every later forward pass with `threads` torch threads (the session's choice)."""
        if self.lock.sets_threads and threads is not None:
            torch.set_num_threads(threads)  # the default of threads that have not run torch
            self.lock.threads = threads


def workers_per_host(client: Client) -> dict[str, int]:
    """How many Dask workers share each host (to split its CPU cores among them)."""
    counts: dict[str, int] = {}
    for address in client.scheduler_info(n_workers=-1)["workers"]:
        host = address.rsplit(":", 1)[0]
        counts[host] = counts.get(host, 0) + 1
    return counts


def _profile(name: str, batch_size: int, dask_worker: Worker) -> WorkerProfile:
    return dask_worker.plugins[name].profile(batch_size)


def worker_profiles(client: Client, name: str, batch_size: int) -> list[WorkerProfile]:
    """The profile of every worker holding plugin `name`."""
    return list(client.run(_profile, name, batch_size).values())


def common_layout(profiles: list[WorkerProfile], precision: str) -> NumericLayout:
    """The one numeric layout every worker will compute a session's blocks under, so that no
    output combines blocks computed two ways. CPU workers' threads per forward pass are fixed
    to the smallest share among them (a heterogeneous cluster computes as its smallest
    worker); what cannot be fixed, workers must share, or this raises a ValueError naming
    the difference.

    Example: workers with 8 and 4 threads on AVX2 CPUs, torch 2.13, float32
    -> NumericLayout(device="cpu", hardware="AVX2", precision="float32", threads=4, ...)
    """
    for what in ("device", "hardware", "torch"):
        values = sorted({str(getattr(p, what)) for p in profiles})
        if len(values) != 1:
            advice = "set device explicitly" if what == "device" else "use workers that share it"
            raise ValueError(
                f"workers disagree on the {what} ({', '.join(values)}), so their blocks would "
                f"differ in the last bits; {advice}"
            )
    counts = [p.threads for p in profiles if p.threads is not None]
    threads = min(counts) if counts else None
    fixed = sorted({p.threads for p in profiles if not p.sets_threads and p.threads != threads})
    if fixed:
        raise ValueError(
            f"workers in the calling process run torch with {fixed[0]} threads, others with "
            f"{threads}: set torch.set_num_threads({threads}) in the caller or use one kind of "
            f"worker"
        )
    return NumericLayout(
        device=profiles[0].device,
        hardware=profiles[0].hardware,
        precision=precision,
        threads=threads,
        torch=profiles[0].torch,
    )


def _use_threads(name: str, threads: int | None, dask_worker: Worker) -> None:
    dask_worker.plugins[name].use_threads(threads)


def use_layout(client: Client, name: str, layout: NumericLayout) -> None:
    """Fix every worker's torch threads per forward pass to the layout's."""
    client.run(_use_threads, name, layout.threads)
