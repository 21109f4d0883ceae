"""Training in subprocesses: DDP on two CPU processes (gloo), and kill-then-resume.

Lightning's "ddp" strategy re-executes the command line once per extra process, so these run
`python -m pipelines.train --config ...` as a user would, not training inside pytest.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from train_stores import disk_store, tiny_config, write_config

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _command(config: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.train", "--config", str(config), *overrides]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return env | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _result(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture()
def stores(tmp_path) -> tuple[Path, Path]:
    return disk_store(tmp_path / "a.zarr", size=96, seed=0), disk_store(tmp_path / "b.zarr", 72, 1)


def test_ddp_two_cpu_processes_log_one_run(tmp_path, stores):
    cfg = tiny_config(
        tmp_path,
        [stores[0]],
        [stores[1]],
        strategy="ddp",
        devices=2,
        accelerator="cpu",
        max_steps=4,
        steps_per_epoch=2,
    )
    config = write_config(tmp_path / "ddp.yaml", cfg)
    done = subprocess.run(
        _command(config), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Starting with 2 processes" in done.stderr  # really two ranks, gloo on CPU
    result = _result(done.stdout)
    assert result["global_step"] == 4
    client = MlflowClient(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(cfg["experiment"])
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [result["run_id"]]  # only rank 0 logged
    assert runs[0].info.status == "FINISHED"
    assert len(client.search_model_versions(f"name='{cfg['registered_model_name']}'")) == 1
    assert len(client.get_metric_history(result["run_id"], "val_iou")) == 2


def test_killed_run_resumes_same_run_and_step(tmp_path, stores):
    cfg = tiny_config(
        tmp_path,
        [stores[0]],
        [stores[1]],
        max_steps=100_000,
        steps_per_epoch=1000,
        checkpoint_every=3,
    )
    config = write_config(tmp_path / "long.yaml", cfg)
    checkpoints = tmp_path / "work" / "checkpoints"
    process = subprocess.Popen(
        _command(config),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not list(checkpoints.glob("*/last.ckpt")) and time.monotonic() < deadline:
            assert process.poll() is None, "training exited before writing a checkpoint"
            time.sleep(0.5)
        time.sleep(1.0)  # a few more steps, past the checkpoint, mid-epoch
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    (last,) = checkpoints.glob("*/last.ckpt")
    killed_at = torch.load(last, weights_only=True)["global_step"]
    first_run = json.loads((last.parent / "run.json").read_text())["run_id"]
    assert 0 < killed_at < 1000  # killed mid-epoch

    target = killed_at + 4
    done = subprocess.run(
        _command(config, "resume=true", f"max_steps={target}"),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = _result(done.stdout)
    assert result["run_id"] == first_run
    assert result["resumed_from_step"] == killed_at
    assert result["global_step"] == target
    client = MlflowClient(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(cfg["experiment"])
    assert len(client.search_runs([experiment.experiment_id])) == 1
    steps = {m.step for m in client.get_metric_history(first_run, "train_loss")}
    # Steps from before the kill and after the resume, in one run, none restarted from zero.
    assert set(range(killed_at)) <= steps and max(steps) == target - 1
    assert client.get_run(first_run).info.status == "FINISHED"


def test_pipeline_with_ddp_trains_in_ranks_without_rerunning_the_pipeline(tmp_path):
    """`segflow run ... train.strategy=ddp train.devices=2`: rank 1 joins the training, it does
    not start a second pipeline (Lightning re-runs the command line of the process that calls
    fit, so training runs in a child `python -m pipelines.train` of its own)."""
    from flow_helpers import TINY, tiny_archive

    archive = tiny_archive(tmp_path / "archive")
    (archive / "broken.tif").unlink()
    work = tmp_path / "work"
    ddp = ["train.strategy=ddp", "train.devices=2", "train.accelerator=cpu"]
    segflow = Path(sys.executable).with_name("segflow")
    done = subprocess.run(
        [str(segflow), "run", str(archive), *TINY, *ddp, "--workdir", str(work)],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Starting with 2 processes" in done.stderr  # really two ranks, gloo on CPU
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name != "Default"]
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # only rank 0 logged
    with sqlite3.connect(work / "prefect" / "prefect.db") as db:
        flow_runs = db.execute("select count(*) from flow_run").fetchone()[0]
        ingests = db.execute("select count(*) from task_run where name like 'ingest%'").fetchone()
    assert flow_runs == 1  # one pipeline, not one per rank
    assert ingests[0] == 3  # each slide ingested once
