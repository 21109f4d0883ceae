"""Interruption: the first SIGINT or SIGTERM ends a command within seconds with exit 130 or 143,
one `segflow:` line, no SIGABRT, its MLflow run KILLED, its Prefect flow run Cancelled and no
process of its tree left; `kill -9` leaves no temporary Prefect server behind.

Each case runs the installed `segflow` on tiny real inputs and signals it once work has visibly
started (a training run's record, inference's journal of finished blocks)."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import torch
from flow_helpers import TINY
from mlflow import MlflowClient

from pipelines.inference.journal import JOURNAL_DIR
from pipelines.ingest import IngestConfig, ingest_slide
from pipelines.sources import SlideSource
from pipelines.weightmaps import WeightsConfig, compute_weight_maps
from segcore.checkpoint import save_unet
from segcore.model import UNet
from segcore.synthetic import write_synthetic_slide

SEGFLOW = Path(sys.executable).with_name("segflow")
#: How long a signalled command may take to exit.
EXIT_SECONDS = 10
#: How long work may take to start on a busy 2-core machine (imports, server start-up).
START_SECONDS = 300
#: Training that outlasts any test unless interrupted.
ENDLESS_TRAINING = [
    "max_steps=100000",
    "model.base_channels=4",
    "model.depth=3",
    "output_size=32",
    "batch_size=2",
    "num_workers=2",  # DataLoader worker processes: they must go too
    "checkpoint_every=1000",
]
THREADS = ["cluster.processes=false"]


def _ingested(folder: Path, name: str, size: int, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    slide, labels = folder / f"{name}.tif", folder / f"{name}_labels.tif"
    write_synthetic_slide(slide, labels, size, size, seed)
    config = IngestConfig(chunk_size=128, min_level_size=64, cluster={"processes": False})
    return ingest_slide(SlideSource(image=slide, labels=labels), folder / "stores", config).store


@pytest.fixture(scope="module")
def training_store(tmp_path_factory) -> Path:
    """A labelled store with its weight maps, made by the stages' library calls."""
    store = _ingested(tmp_path_factory.mktemp("train"), "a", 256, 1)
    compute_weight_maps(store, WeightsConfig(block_size=128, cluster={"processes": False}))
    return store


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "unet.pt"
    torch.manual_seed(0)
    save_unet(UNet(3, 2, base_channels=4, depth=3, dropout=0.0), path)
    return path


class Command:
    """A `segflow` command in a subprocess, its process tree recorded while it runs."""

    def __init__(self, *argv: str | Path, cwd: Path) -> None:
        self.err_path = cwd / "stderr.txt"
        with self.err_path.open("w") as err:
            self.proc = subprocess.Popen(
                [str(SEGFLOW), *map(str, argv)],
                stdout=subprocess.DEVNULL,
                stderr=err,
                cwd=cwd,
            )
        self.tree: dict[int, psutil.Process] = {}

    def record_tree(self) -> None:
        try:
            parent = psutil.Process(self.proc.pid)
            for process in [parent, *parent.children(recursive=True)]:
                self.tree.setdefault(process.pid, process)
        except psutil.NoSuchProcess:
            pass

    def wait_until(self, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + START_SECONDS
        while not ready():
            assert self.proc.poll() is None, f"ended before {what}: {self.stderr}"
            assert time.monotonic() < deadline, f"no {what} after {START_SECONDS} s"
            self.record_tree()
            time.sleep(0.5)
        self.record_tree()

    def signal_and_wait(self, signum: int) -> tuple[int, float]:
        started = time.monotonic()
        self.proc.send_signal(signum)
        try:
            code = self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        return code, time.monotonic() - started

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def left_behind(self) -> list[str]:
        _, alive = psutil.wait_procs(list(self.tree.values()), timeout=5)
        return [" ".join(p.cmdline()[:4]) for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def _training_started(workdir: Path) -> Callable[[], bool]:
    return lambda: any((workdir / "checkpoints").glob("*/run.json"))


def _assert_interrupted(command: Command, code: int, seconds: float, expected: int) -> None:
    err = command.stderr
    name = signal.Signals(expected - 128).name
    assert code == expected, err
    assert seconds < EXIT_SECONDS, f"took {seconds:.1f} s"
    lines = [line for line in err.splitlines() if line.startswith("segflow")]
    assert lines == [f"segflow: interrupted ({name})"], err
    assert "terminate called" not in err and "Traceback" not in err
    assert command.left_behind() == []


def _mlflow_statuses(workdir: Path) -> list[str]:
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return [run.info.status for run in client.search_runs(experiments)]


def _prefect_states(workdir: Path) -> tuple[list[tuple], list[tuple]]:
    """(state type, message) of every flow run and (name, state type) of every task run, read
    from the temporary server's database after it has stopped."""
    with sqlite3.connect(workdir / "prefect" / "prefect.db") as db:
        flows = db.execute(
            "select f.state_type, s.message from flow_run f join flow_run_state s"
            " on s.id = f.state_id"
        ).fetchall()
        tasks = db.execute("select name, state_type from task_run").fetchall()
    return flows, tasks


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_training_ends_its_runs(tmp_path, training_store, signum):
    workdir = tmp_path / "work"
    command = Command(
        "train", training_store, *ENDLESS_TRAINING, "--workdir", workdir, cwd=tmp_path
    )
    command.wait_until(_training_started(workdir), "training run")
    time.sleep(2)  # well into the steps, DataLoader workers running
    command.record_tree()
    assert len(command.tree) >= 4, "segflow, its Prefect server and 2 DataLoader workers"
    code, seconds = command.signal_and_wait(signum)
    _assert_interrupted(command, code, seconds, 128 + signum)
    assert _mlflow_statuses(workdir) == ["KILLED"]
    flows, tasks = _prefect_states(workdir)
    reason = f"interrupted ({signal.Signals(signum).name})"
    assert flows == [("CANCELLED", reason)]
    assert tasks == [("train", "CANCELLED")]


@pytest.mark.slow
def test_interrupted_inference_leaves_a_resumable_journal(tmp_path, model_file):
    store = _ingested(tmp_path / "slides", "big", 1536, 5)
    workdir = tmp_path / "work"
    journal = store / JOURNAL_DIR
    command = Command(
        "infer",
        store,
        "--model",
        model_file,
        "tile_size=124",
        "block_size=128",
        "batch_size=1",
        *THREADS,
        "--workdir",
        workdir,
        cwd=tmp_path,
    )
    command.wait_until(lambda: any(journal.glob("*/done/*.json")), "finished block")
    code, seconds = command.signal_and_wait(signal.SIGINT)
    _assert_interrupted(command, code, seconds, 130)
    assert any(journal.glob("*/done/*.json")), "the journal of finished blocks is kept"
    flows, tasks = _prefect_states(workdir)
    assert flows == [("CANCELLED", "interrupted (SIGINT)")]
    assert [state for _, state in tasks] == ["CANCELLED"]


@pytest.mark.slow
def test_interrupted_pipeline_run(tmp_path):
    archive = tmp_path / "archive"
    archive.mkdir()
    for name, seed in (("a", 1), ("b", 2)):
        write_synthetic_slide(
            archive / f"{name}.tif", archive / f"{name}_labels.tif", 256, 256, seed
        )
    workdir = tmp_path / "work"
    endless = [o for o in TINY if not o.startswith("train.max_steps")] + ["train.max_steps=100000"]
    command = Command("run", archive, *endless, "--workdir", workdir, cwd=tmp_path)
    command.wait_until(_training_started(workdir), "training run")
    code, seconds = command.signal_and_wait(signal.SIGINT)
    _assert_interrupted(command, code, seconds, 130)
    assert _mlflow_statuses(workdir) == ["KILLED"]
    flows, tasks = _prefect_states(workdir)
    assert flows == [("CANCELLED", "interrupted (SIGINT)")]
    assert ("train", "CANCELLED") in tasks
    assert {state for name, state in tasks if name.startswith("ingest")} == {"COMPLETED"}


@pytest.mark.slow
def test_kill_9_leaves_no_temporary_prefect_server(tmp_path, training_store):
    workdir = tmp_path / "work"
    command = Command(
        "train", training_store, *ENDLESS_TRAINING, "--workdir", workdir, cwd=tmp_path
    )

    def servers() -> list[psutil.Process]:
        command.record_tree()
        return [p for p in command.tree.values() if "flows.prefect_server" in p.cmdline()]

    command.wait_until(lambda: bool(servers()), "temporary Prefect server")
    (server,) = servers()
    command.proc.kill()
    command.proc.wait()
    _, alive = psutil.wait_procs([server], timeout=EXIT_SECONDS)
    assert not alive, "the temporary Prefect server outlived its command"


BLOCKED_MAIN_THREAD = """
import sys, threading, time
from pathlib import Path
from flows.interrupt import handling, on_interrupt

def work():
    time.sleep(600)

with handling(sys.stderr):
    with on_interrupt(lambda reason: Path(sys.argv[1]).write_text(reason)):
        worker = threading.Thread(target=work)
        worker.start()
        print("working", flush=True)
        worker.join()  # the main thread waits on a lock, like Prefect's as_completed
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_first_signal_ends_a_process_whose_main_thread_waits(tmp_path, signum):
    """The mechanism alone, without Prefect: a main thread blocked on a lock behind a busy
    worker thread still ends at the first signal, after the registered cleanup ran."""
    record = tmp_path / "cleanup.txt"
    proc = subprocess.Popen(
        [sys.executable, "-c", BLOCKED_MAIN_THREAD, str(record)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline() == "working\n"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=EXIT_SECONDS)
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum
    assert err.strip() == f"segflow: interrupted ({name})"
    assert record.read_text() == f"interrupted ({name})"
