"""Services that are not there fail fast with one line: a tracking server or Dask scheduler on
a dead loopback port (bound, then closed) is reported within seconds, not after MLflow's
minutes of retries or Dask's wait, and a server that does answer is let through."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from flow_helpers import prefect_api
from test_cli import assert_one_line_error, run
from test_infer import make_store, smooth_image

from pipelines.cluster import ClusterConfig, dask_client
from pipelines.services import ServiceUnreachableError, require_mlflow
from pipelines.train import train
from pipelines.training.config import TrainConfig

#: The promise: a dead service is reported within this many seconds.
FAST_S = 30


@pytest.fixture
def dead_port() -> int:
    """A loopback port nothing listens on: bound by us, then closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def answering_server() -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 that answers every request with 404."""
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_dead_tracking_server_is_one_line_within_seconds(dead_port):
    uri = f"http://127.0.0.1:{dead_port}"
    started = time.monotonic()
    with pytest.raises(ServiceUnreachableError) as error:
        require_mlflow(uri)
    assert time.monotonic() - started < FAST_S
    assert str(error.value).startswith(f"cannot reach MLflow at {uri} (")
    assert "\n" not in str(error.value)


def test_the_message_keeps_the_password_out(dead_port):
    with pytest.raises(ServiceUnreachableError) as error:
        require_mlflow(f"http://alice:s3cret@127.0.0.1:{dead_port}")
    assert "s3cret" not in str(error.value)
    assert f"alice:***@127.0.0.1:{dead_port}" in str(error.value)


def test_any_http_answer_counts_as_reachable(answering_server):
    require_mlflow(answering_server)  # 404 on /health: a server is there; MLflow says the rest


def test_training_against_a_dead_server_fails_before_any_work(dead_port, tmp_path):
    uri = f"http://127.0.0.1:{dead_port}"
    config = TrainConfig(stores=[tmp_path / "absent.zarr"], tracking_uri=uri, workdir=tmp_path)
    started = time.monotonic()
    # The store does not exist either: the tracking server is checked first, before any work.
    with pytest.raises(ServiceUnreachableError, match=f"cannot reach MLflow at {uri}"):
        train(config)
    assert time.monotonic() - started < FAST_S


def test_a_dead_scheduler_is_one_line_within_its_timeout(dead_port):
    address = f"tcp://127.0.0.1:{dead_port}"
    config = ClusterConfig(scheduler_address=address, connect_timeout_s=3)
    started = time.monotonic()
    with pytest.raises(ServiceUnreachableError) as error, dask_client(config):
        pass
    assert time.monotonic() - started < FAST_S
    assert str(error.value).startswith(f"cannot reach the Dask scheduler at {address} (")


@pytest.mark.slow  # ~30 s: starts a Prefect server
@pytest.mark.integration
def test_the_command_line_reports_dead_services_within_seconds(dead_port, tmp_path, capsys):
    store = make_store(tmp_path / "s.zarr", smooth_image((64, 64), seed=1))
    common = [str(store), "--workdir", str(tmp_path / "work")]
    with prefect_api():
        uri = f"http://127.0.0.1:{dead_port}"
        started = time.monotonic()
        code, _, err = run(capsys, "infer", *common, "--tracking-uri", uri)
        assert time.monotonic() - started < FAST_S
        assert code != 0
        assert_one_line_error(err, f"cannot reach MLflow at {uri}")

        address = f"tcp://127.0.0.1:{dead_port}"
        started = time.monotonic()
        wait = "cluster.connect_timeout_s=2"
        code, _, err = run(capsys, "weights", *common, wait, "--scheduler", address)
        assert time.monotonic() - started < FAST_S
        assert code != 0
        assert_one_line_error(err, f"cannot reach the Dask scheduler at {address}")
