"""One model session per inference run, and a lost Dask scheduler as one line, at once.

Against a real `dask scheduler` and `dask worker` started as processes on 127.0.0.1: the
worker's own log says how often a model plugin was put on it, and the scheduler is killed
with SIGKILL mid-run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from distributed import Client
from prefect.states import Failed
from server_helpers import BIN, clean_env, free_port, start, stop
from test_infer import make_store, smooth_image

from flows.tasks import infer_task, is_transient
from pipelines.cluster import SchedulerLostError, scheduler_kept
from pipelines.infer import InferConfig, infer_slide
from pipelines.inference.journal import JOURNAL_DIR
from segcore.checkpoint import save_unet
from segcore.model import UNet
from segcore.store import SlideStore

#: What a worker logs each time a plugin is put on it (distributed.worker.plugin_add).
REGISTERED = "Starting Worker plugin segflow-infer-"
REMOVED = "Removing Worker plugin segflow-infer-"
SETTINGS = ["tile_size=92", "block_size=104"]  # depth 3: 92 px in, 52 out


@dataclass(frozen=True)
class Cluster:
    address: str
    scheduler: subprocess.Popen
    worker_log: Path

    def registrations(self) -> tuple[int, int]:
        """(model plugins put on the worker, model plugins taken off it) so far."""
        log = self.worker_log.read_text()
        return log.count(REGISTERED), log.count(REMOVED)


@pytest.fixture
def cluster(tmp_path) -> Iterator[Cluster]:
    """A scheduler and one two-thread worker, each its own process (group)."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = clean_env()
    dask = str(BIN / "dask")
    scheduler = start(
        [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        env,
        tmp_path / "scheduler.log",
    )
    worker_log = tmp_path / "worker.log"
    worker = start([dask, "worker", address, "--nthreads", "2", "--no-dashboard"], env, worker_log)
    try:
        with Client(address, timeout=60) as client:
            client.wait_for_workers(1, timeout=120)
        yield Cluster(address, scheduler, worker_log)
    finally:
        stop(worker)
        stop(scheduler)


@pytest.fixture
def model_file(tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "unet.pt"
    save_unet(UNet(3, 2, base_channels=4, depth=3, dropout=0.0).eval(), path)
    return path


def blocks_done(store: Path) -> int:
    return len(list((store / JOURNAL_DIR).glob("*/done/*.json")))


def kill_when_blocks_are_done(cluster: Cluster, store: Path, running: subprocess.Popen | None):
    """SIGKILL the scheduler once the first block of `store` is done; the time it died."""
    deadline = time.monotonic() + 300
    while blocks_done(store) == 0:
        assert running is None or running.poll() is None, "the run ended before any block"
        assert time.monotonic() < deadline, "no block finished in time"
        time.sleep(0.05)
    os.killpg(cluster.scheduler.pid, signal.SIGKILL)
    cluster.scheduler.wait()
    return time.monotonic()


def test_a_lost_scheduler_is_not_retried():
    lost = SchedulerLostError("lost the Dask scheduler at tcp://10.0.0.5:8786 (...)")
    assert not is_transient(infer_task, None, Failed(data=lost))


def test_a_slide_losing_its_scheduler_fails_at_once_in_one_line(tmp_path, cluster, model_file):
    store = make_store(tmp_path / "s.zarr", smooth_image((600, 600), seed=1))
    config = InferConfig(tile_size=92, block_size=104, progress=False)
    raised: list[BaseException] = []

    def attempt(client: Client) -> None:
        try:
            infer_slide(store, model_file, config, client)
        except BaseException as exc:  # handed to the test's thread
            raised.append(exc)

    with Client(cluster.address, timeout=10) as client:
        thread = threading.Thread(target=attempt, args=(client,))
        thread.start()
        killed = kill_when_blocks_are_done(cluster, store, None)
        thread.join(timeout=60)
        ended = time.monotonic()
        assert not thread.is_alive()
        (error,) = raised
        assert isinstance(error, SchedulerLostError), repr(error)
        # Dask cancels a lost scheduler's futures at once: no wait for the reconnect (10 s).
        assert ended - killed < 8, ended - killed
        assert str(error).startswith(f"lost the Dask scheduler at {cluster.address} (")
        assert "\n" not in str(error)
        # A client that has lost its scheduler is refused at once, not after its reconnect.
        with pytest.raises(SchedulerLostError, match=cluster.address), scheduler_kept(client):
            pass
    # Nothing half-written reached the store; the finished blocks stay for the next run.
    assert SlideStore.open(store).segmentation is None
    assert blocks_done(store) > 0


def segflow(*args: str, workdir: Path) -> list[str]:
    return [str(BIN / "segflow"), *args, "--workdir", str(workdir)]


@pytest.mark.slow  # two `segflow infer` runs, each with its temporary Prefect server
def test_an_infer_flow_puts_the_model_on_the_workers_once(tmp_path, cluster, model_file):
    stores = [
        str(make_store(tmp_path / f"{name}.zarr", smooth_image((150, 180), seed=seed)))
        for seed, name in enumerate("abc")
    ]
    argv = segflow(
        "infer", *stores, "--model", str(model_file), "--scheduler", cluster.address,
        *SETTINGS, workdir=tmp_path / "work",
    )  # fmt: skip
    env = clean_env()
    first = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert all(SlideStore.open(s).segmentation is not None for s in stores)
    # Three slides, one model session: resolved, hashed and put on the worker once (it was
    # once per slide), and taken off again when the run ends.
    assert cluster.registrations() == (1, 1)
    # A re-run answered from the cache loads no model at all.
    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "cached" in again.stdout + again.stderr
    assert cluster.registrations() == (1, 1)


@pytest.mark.slow  # a `segflow infer` run with its temporary Prefect server
def test_segflow_infer_losing_its_scheduler_ends_in_one_line(tmp_path, cluster, model_file):
    stores = [
        make_store(tmp_path / f"{name}.zarr", smooth_image((600, 600), seed=seed))
        for seed, name in enumerate("abc")
    ]
    argv = segflow(
        "infer", *map(str, stores), "--model", str(model_file), "--scheduler", cluster.address,
        *SETTINGS, workdir=tmp_path / "work",
    )  # fmt: skip
    log = tmp_path / "segflow.log"
    with log.open("w") as out:
        run = subprocess.Popen(argv, env=clean_env(), stdout=out, stderr=subprocess.PIPE, text=True)
        try:
            killed = kill_when_blocks_are_done(cluster, stores[0], run)
            _, stderr = run.communicate(timeout=120)
        finally:
            if run.poll() is None:
                run.kill()
    ended = time.monotonic()
    (line,) = [line for line in stderr.splitlines() if line.startswith("segflow:")]
    assert line.startswith(f"segflow: error: lost the Dask scheduler at {cluster.address} (")
    assert run.returncode == 2, stderr
    assert "Traceback" not in stderr and "KeyError" not in stderr
    # Not retried on the dead client (that took ~50 s of backoff); the rest is shutting down.
    assert ended - killed < 30, ended - killed
    # The slide it was on keeps its finished blocks to resume from; none was installed.
    assert blocks_done(stores[0]) > 0
    assert all(SlideStore.open(s).segmentation is None for s in stores)
