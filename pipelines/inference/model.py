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


class ModelPlugin(WorkerPlugin):
    """Builds the model once per worker in `setup`; block tasks find it in `worker.plugins`.

    `lock` serialises forward passes within a worker, so a worker's other threads read and
    write blocks while one computes instead of competing for the same cores or GPU.
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

    def setup(self, worker: Worker) -> None:
        self.device = _device(self.requested_device)
        if (socket.gethostname(), os.getpid()) != self.client_process:
            self._tune_worker_process(worker)
        model = self.source.build().to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model: torch.nn.Module = torch.compile(model) if self.compile_model else model
        self.unet = model
        self.lock = threading.Lock()
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

    def profile(self, batch_size: int) -> tuple[str, int]:
        """This worker's device type and the default tile size for its memory."""
        return self.device.type, default_tile_size(self.unet, self.device, batch_size)


def workers_per_host(client: Client) -> dict[str, int]:
    """How many Dask workers share each host (to split its CPU cores among them)."""
    counts: dict[str, int] = {}
    for address in client.scheduler_info(n_workers=-1)["workers"]:
        host = address.rsplit(":", 1)[0]
        counts[host] = counts.get(host, 0) + 1
    return counts


def _profile(name: str, batch_size: int, dask_worker: Worker) -> tuple[str, int]:
    return dask_worker.plugins[name].profile(batch_size)


def worker_profiles(client: Client, name: str, batch_size: int) -> list[tuple[str, int]]:
    """(device type, default tile size) of every worker holding plugin `name`."""
    return list(client.run(_profile, name, batch_size).values())
