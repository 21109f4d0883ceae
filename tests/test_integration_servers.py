"""segflow against real servers: a `prefect server` and an `mlflow server` started here on
127.0.0.1, the pipeline run as the installed `segflow` command with PREFECT_API_URL and
MLFLOW_TRACKING_URI set, and everything checked through the servers' HTTP APIs."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from flow_helpers import tiny_archive
from server_helpers import (
    BIN,
    clean_env,
    free_port,
    http,
    prefect_server,
    start,
    stop,
    tiny_config,
    wait_for_deployment,
    wait_for_flow_run,
    wait_healthy,
)

from segcore.store import SlideStore

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Iterator[dict[str, str]]:
    root = tmp_path_factory.mktemp("servers")
    env = clean_env()
    mlflow_port = free_port()
    mlflow = start(
        [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(mlflow_port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "mlartifacts"),
        ],
        env,
        root / "mlflow.log",
    )
    try:
        with prefect_server(root, env) as api:
            mlflow_url = f"http://127.0.0.1:{mlflow_port}"
            wait_healthy(f"{mlflow_url}/health", mlflow, root / "mlflow.log", 120)
            yield {"PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": mlflow_url, "env": env}
    finally:
        stop(mlflow)


def segflow(argv: list[str], servers: dict, cwd: Path) -> subprocess.CompletedProcess:
    env = servers["env"] | {
        "PREFECT_API_URL": servers["PREFECT_API_URL"],
        "MLFLOW_TRACKING_URI": servers["MLFLOW_TRACKING_URI"],
    }
    return subprocess.run(
        [str(BIN / "segflow"), *argv], env=env, cwd=cwd, capture_output=True, text=True, timeout=600
    )


def flow_run_id(stdout: str) -> str:
    return re.search(r"Prefect flow run: ([0-9a-f-]{36})", stdout).group(1)


def test_pipeline_against_real_prefect_and_mlflow_servers(tmp_path, servers):
    archive = tiny_archive(tmp_path / "archive")
    (archive / "broken.tif").unlink()
    config = tiny_config(tmp_path / "pipeline.yaml")
    workdir = tmp_path / "work"
    argv = ["run", str(archive), "--config", str(config), "--workdir", str(workdir)]

    done = segflow(argv, servers, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    run_id = flow_run_id(done.stdout)
    api = servers["PREFECT_API_URL"]

    (flow_run,) = http(f"{api}/flow_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
    assert flow_run["state"]["type"] == "COMPLETED"
    tasks = http(f"{api}/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
    names = sorted(t["name"] for t in tasks)
    assert names == sorted(
        ["ingest a", "ingest b", "ingest c", "weights a.zarr", "weights b.zarr", "train"]
        + ["infer a.zarr", "infer b.zarr", "infer c.zarr"]
    )
    assert {t["state"]["type"] for t in tasks} == {"COMPLETED"}
    artifacts = http(
        f"{api}/artifacts/filter", {"artifacts": {"key": {"any_": ["segflow-pipeline"]}}}
    )
    assert any("| c | written | – | written |" in a["data"] for a in artifacts)

    mlflow = servers["MLFLOW_TRACKING_URI"]
    experiment = http(
        f"{mlflow}/api/2.0/mlflow/experiments/get-by-name?experiment_name=segflow-unet"
    )
    experiment_id = experiment["experiment"]["experiment_id"]
    runs = http(f"{mlflow}/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment_id]})["runs"]
    assert len(runs) == 1 and runs[0]["info"]["status"] == "FINISHED"
    metrics = {m["key"] for m in runs[0]["data"]["metrics"]}
    assert {"val_iou", "train_loss"} <= metrics
    model = http(f"{mlflow}/api/2.0/mlflow/registered-models/get?name=segflow-unet")
    aliases = {a["alias"]: a["version"] for a in model["registered_model"]["aliases"]}
    assert aliases["champion"] == "1"
    for name in "abc":
        store = SlideStore.open(workdir / "stores" / f"{name}.zarr")
        assert store.segmentation is not None
        assert store.group["labels/segmentation"].attrs["segflow"]["model_uri"] == (
            "models:/segflow-unet/1"
        )
    assert not (workdir / "mlflow.db").exists()  # the server's store, not the embedded one

    again = segflow(argv, servers, tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    rerun = flow_run_id(again.stdout)
    tasks = http(f"{api}/task_runs/filter", {"flow_runs": {"id": {"any_": [rerun]}}})
    assert {t["state"]["name"] for t in tasks} == {"Cached"}
    runs = http(f"{mlflow}/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment_id]})["runs"]
    assert len(runs) == 1

    # `segflow serve` registers the deployments with the server; a run of the nightly one
    # (what its schedule starts) finds nothing new: every task is answered from the cache.
    serve = start(
        [str(BIN / "segflow"), "serve", *argv[1:], "--cron", "0 3 * * *"],
        servers["env"] | {k: servers[k] for k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")},
        tmp_path / "serve.log",
    )
    try:
        nightly = wait_for_deployment(api, "nightly-infer", serve, tmp_path / "serve.log")
        schedules = http(f"{api}/deployments/{nightly['id']}/schedules")
        assert [s["schedule"]["cron"] for s in schedules] == ["0 3 * * *"]
        run = http(f"{api}/deployments/{nightly['id']}/create_flow_run", {})
        state = wait_for_flow_run(api, run["id"], serve, tmp_path / "serve.log")
        assert state == "COMPLETED", (tmp_path / "serve.log").read_text()[-3000:]
        tasks = http(f"{api}/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
        assert sorted(t["name"] for t in tasks) == sorted(
            ["ingest a", "ingest b", "ingest c", "infer a.zarr", "infer b.zarr", "infer c.zarr"]
        )
        assert {t["state"]["name"] for t in tasks} == {"Cached"}
    finally:
        stop(serve)
