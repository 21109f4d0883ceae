"""Shared by the integration tests: real servers (and `segflow` itself) started as processes on
127.0.0.1, and their HTTP APIs read with the standard library."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from flow_helpers import TINY

BIN = Path(sys.executable).parent
FINAL_STATES = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def clean_env() -> dict[str, str]:
    """This process's environment without any Prefect or MLflow setting of the developer's."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(url: str, payload: dict | None = None, attempts: int = 5) -> dict:
    """GET (or POST `payload` as JSON) and decode the JSON answer.

    A 503 is retried with backoff, as Prefect's own client does: the server answers 503 when
    its SQLite database is briefly locked by a concurrent writer (the serve process), and the
    request was not applied. A GET that times out (the same lock, held longer on a busy
    machine) is retried too; a POST is not, as it may have been applied.
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
        except TimeoutError:
            if data is not None or attempt == attempts - 1:
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


def start(argv: list[str], env: dict, log: Path, cwd: Path | None = None) -> subprocess.Popen:
    """A process in its own process group, so stopping it stops its children too."""
    with log.open("w") as out:
        return subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextmanager
def prefect_server(root: Path, env: dict[str, str]) -> Iterator[str]:
    """A `prefect server` with its own database under `root`; yields its API URL."""
    port = free_port()
    server_env = env | {
        "PREFECT_HOME": str(root / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    argv = ["server", "start", "--host", "127.0.0.1", "--port", str(port)]
    root.mkdir(parents=True, exist_ok=True)
    log = root / "prefect.log"
    server = start([str(BIN / "prefect"), *argv], server_env, log)
    try:
        # The first start migrates Prefect's fresh database: slow on a busy machine.
        wait_healthy(f"http://127.0.0.1:{port}/api/health", server, log, 240)
        yield f"http://127.0.0.1:{port}/api"
    finally:
        stop(server)


def tiny_config(path: Path) -> Path:
    """The tiny stage settings (`flow_helpers.TINY`) as a pipeline config file."""
    tree: dict = {}
    for item in TINY:
        key, _, value = item.partition("=")
        node = tree
        for part in key.split(".")[:-1]:
            node = node.setdefault(part, {})
        node[key.split(".")[-1]] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(tree))
    return path


def wait_for_deployment(api: str, name: str, process: subprocess.Popen, log: Path) -> dict:
    """The deployment `name` once `process` (a serve or deploy) has registered it."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        found = http(f"{api}/deployments/filter", {"deployments": {"name": {"any_": [name]}}})
        if found:
            return found[0]
        if process.poll() is not None and process.returncode != 0:
            pytest.fail(f"{process.args[:2]} exited:\n{log.read_text()[-3000:]}")
        time.sleep(1)
    pytest.fail(f"deployment {name} never appeared:\n{log.read_text()[-3000:]}")


def wait_for_flow_run(
    api: str, run_id: str, process: subprocess.Popen, log: Path, timeout: float = 300
) -> str:
    """The final state type of a flow run that `process` (a serve or a worker) executes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = http(f"{api}/flow_runs/{run_id}")["state"]
        if state["type"] in FINAL_STATES:
            return state["type"]
        if process.poll() is not None:
            pytest.fail(f"{process.args[:2]} exited:\n{log.read_text()[-3000:]}")
        time.sleep(1)
    pytest.fail(f"flow run {run_id} did not finish:\n{log.read_text()[-3000:]}")
