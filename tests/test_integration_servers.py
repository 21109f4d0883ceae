"""segflow against real servers: a `prefect server` and an `mlflow server` started here on
127.0.0.1, the pipeline run as the installed `segflow` command with PREFECT_API_URL and
MLFLOW_TRACKING_URI set, and everything checked through the servers' HTTP APIs."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from flow_helpers import TINY, tiny_archive

from segcore.store import SlideStore

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(url: str, payload: dict | None = None, attempts: int = 5) -> dict:
    """GET (or POST `payload` as JSON) and decode the JSON answer.

    A 503 is retried with backoff, as Prefect's own client does: the server answers 503 when
    its SQLite database is briefly locked by a concurrent writer (the serve process), and the
    request was not applied.
    """
    data = json.dumps(payload).encode() if payload is not None else None
    for attempt in range(attempts):
        request = urllib.request.Request(
            url, data=data, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            if exc.code != 503 or attempt == attempts - 1:
                raise
            time.sleep(2**attempt)
    raise AssertionError("unreachable")


def wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


def start(argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    """A server in its own process group, so stopping it stops its workers too."""
    with log.open("w") as out:
        return subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Iterator[dict[str, str]]:
    root = tmp_path_factory.mktemp("servers")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    prefect_port, mlflow_port = free_port(), free_port()
    prefect_env = env | {
        "PREFECT_HOME": str(root / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    prefect = start(
        [
            str(BIN / "prefect"),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(prefect_port),
        ],
        prefect_env,
        root / "prefect.log",
    )
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
        prefect_url, mlflow_url = (
            f"http://127.0.0.1:{prefect_port}",
            f"http://127.0.0.1:{mlflow_port}",
        )
        # The first start migrates Prefect's fresh database: slow on a busy machine.
        wait_healthy(f"{prefect_url}/api/health", prefect, root / "prefect.log", 240)
        wait_healthy(f"{mlflow_url}/health", mlflow, root / "mlflow.log", 120)
        yield {
            "PREFECT_API_URL": f"{prefect_url}/api",
            "MLFLOW_TRACKING_URI": mlflow_url,
            "env": env,
        }
    finally:
        stop(prefect)
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
    config = tmp_path / "pipeline.yaml"
    tree: dict = {}
    for item in TINY:
        key, _, value = item.partition("=")
        node = tree
        for part in key.split(".")[:-1]:
            node = node.setdefault(part, {})
        node[key.split(".")[-1]] = yaml.safe_load(value)
    config.write_text(yaml.safe_dump(tree))
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


def wait_for_deployment(api: str, name: str, serve: subprocess.Popen, log: Path) -> dict:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        found = http(f"{api}/deployments/filter", {"deployments": {"name": {"any_": [name]}}})
        if found:
            return found[0]
        if serve.poll() is not None:
            pytest.fail(f"segflow serve exited:\n{log.read_text()[-3000:]}")
        time.sleep(1)
    pytest.fail(f"deployment {name} never appeared:\n{log.read_text()[-3000:]}")


def wait_for_flow_run(api: str, run_id: str, serve: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        state = http(f"{api}/flow_runs/{run_id}")["state"]
        if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return state["type"]
        if serve.poll() is not None:
            pytest.fail(f"segflow serve exited:\n{log.read_text()[-3000:]}")
        time.sleep(1)
    pytest.fail(f"flow run {run_id} did not finish:\n{log.read_text()[-3000:]}")
