"""infra/ is safe by default: loopback-only ports, no default or literal secrets, no secret in
a URI, .env.example naming every secret, and a Dask cluster that, started as
docker-compose.tls.yml starts it, serves segflow's client and refuses everyone else."""

from __future__ import annotations

import operator
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dask.config
import pytest
import yaml
from distributed import Client

from pipelines.cluster import ClusterConfig, dask_client
from pipelines.redaction import redact_uri

INFRA = Path(__file__).resolve().parents[1] / "infra"
COMPOSE = INFRA / "docker-compose.yml"
COMPOSE_TLS = INFRA / "docker-compose.tls.yml"
ENV_EXAMPLE = INFRA / ".env.example"
LOOPBACK = {"127.0.0.1", "::1", "[::1]", "localhost"}
#: Variable names that hold secrets (AWS_SECRET_ACCESS_KEY, PREFECT_API_AUTH_STRING, PGPASSWORD);
#: not paths to them (DASK_..._TLS__CLIENT__KEY, MLFLOW_AUTH_CONFIG_PATH).
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH_STRING|ACCESS_KEY", re.IGNORECASE)
#: A whole value that is one required variable: `${NAME:?message}` (unset or empty: an error).
REQUIRED = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*):\?[^}]+\}")
#: Every interpolation of the file (`$${...}` is a literal dollar for the container's shell).
INTERPOLATION = re.compile(r"(?<!\$)\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<rest>[^}]*)\}")
URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")


def compose_files() -> list[Path]:
    return [COMPOSE, COMPOSE_TLS]


def strings(tree) -> Iterator[str]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield str(key)
            yield from strings(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from strings(value)
    elif isinstance(tree, str):
        yield tree


def environments(path: Path) -> Iterator[tuple[str, str, str]]:
    """(service, variable, value) of every service's environment, anchors merged."""
    for service, spec in yaml.safe_load(path.read_text())["services"].items():
        env = spec.get("environment") or {}
        if isinstance(env, list):
            env = dict(item.partition("=")[::2] for item in env)
        for name, value in env.items():
            yield service, name, str(value)


def required_variables() -> set[str]:
    return {m["name"] for p in compose_files() for m in REQUIRED.finditer(p.read_text())}


@pytest.mark.parametrize("path", compose_files(), ids=lambda p: p.name)
def test_published_ports_listen_on_loopback_only(path):
    published = 0
    for service, spec in yaml.safe_load(path.read_text())["services"].items():
        for port in spec.get("ports", []):
            published += 1
            if isinstance(port, dict):
                host = port.get("host_ip", "")
            else:
                # "IP:HOST:CONTAINER" (IPv6 in brackets); "HOST:CONTAINER" or "CONTAINER" has
                # no IP and so binds every interface.
                parts = str(port).rsplit(":", 2)
                host = parts[0] if len(parts) == 3 else ""
            assert host in LOOPBACK, f"{service}: port {port!r} is published beyond loopback"
    if path == COMPOSE:
        assert published >= 4  # MLflow, Prefect, Dask, MinIO console: the check saw them


@pytest.mark.parametrize("path", compose_files(), ids=lambda p: p.name)
def test_secrets_are_required_variables_never_literals_or_defaults(path):
    checked = 0
    for service, name, value in environments(path):
        if SECRET_NAME.search(name):
            checked += 1
            assert REQUIRED.fullmatch(value), f"{service}: {name} is not a required variable"
    for match in INTERPOLATION.finditer(path.read_text()):
        name, rest = match["name"], match["rest"]
        if SECRET_NAME.search(name) or name in required_variables():
            assert rest.startswith(":?"), f"{match[0]}: a secret needs ${{{name}:?...}}"
    if path == COMPOSE:
        assert checked >= 10


@pytest.mark.parametrize("path", compose_files(), ids=lambda p: p.name)
def test_no_uri_carries_credentials(path):
    """Passwords travel in variables of their own (PGPASSWORD, ...), never in a URI, which
    services print in logs and errors: the project's redaction rule finds nothing to hide."""
    texts = [INTERPOLATION.sub("VALUE", t) for t in strings(yaml.safe_load(path.read_text()))]
    uris = [uri for text in texts for uri in URI.findall(text)]
    assert any("@" in uri for uri in uris) or path == COMPOSE_TLS  # a user name is fine
    for uri in uris:
        assert redact_uri(uri) == uri, f"{uri}: a secret in a URI"


def test_env_example_names_every_secret_without_a_value():
    lines = [line for line in ENV_EXAMPLE.read_text().splitlines() if line and line[0] != "#"]
    example = dict(line.partition("=")[::2] for line in lines)
    assert set(example) == required_variables()
    assert all(value == "" for value in example.values()), "no sample secret to copy"
    assert {"POSTGRES_PASSWORD", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING"} <= set(
        example
    )


def test_mlflow_and_prefect_ask_for_a_password():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert "--app-name basic-auth" in services["mlflow"]["command"]
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" in services["mlflow"]["environment"]
    assert "PREFECT_SERVER_API_AUTH_STRING" in services["prefect-server"]["environment"]
    auth = (INFRA / "mlflow-auth.ini").read_text()
    assert re.search(r"^default_permission = NO_PERMISSIONS$", auth, re.MULTILINE)


def _compose_works() -> bool:
    if shutil.which("docker") is None:
        return False
    done = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=60)
    return done.returncode == 0


@pytest.mark.skipif(not _compose_works(), reason="no `docker compose` here")
def test_docker_compose_config_needs_every_secret(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in required_variables()}
    argv = ["docker", "compose", "--env-file", os.devnull, "-f", str(COMPOSE), "config"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "in infra/.env" in done.stderr
    env |= {name: "x" for name in required_variables()}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# --- The Dask cluster over TLS, started with the override's own commands -----------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _certificates(folder: Path) -> Path:
    done = subprocess.run(
        ["sh", str(INFRA / "dask-certs.sh"), str(folder)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return folder


def _local(command: str, certs: Path, port: int) -> list[str]:
    """A service's command from docker-compose.tls.yml, pointed at this machine."""
    text = command.replace("/certs/", f"{certs}/").replace("${DASK_WORKER_MEMORY:-8GiB}", "1GiB")
    text = text.replace("dask-scheduler:8786", f"127.0.0.1:{port}")
    text = text.replace("--host 0.0.0.0 --port 8786", f"--host 127.0.0.1 --port {port}")
    text = text.replace("--dashboard-address :8787", "--no-dashboard")
    argv = shlex.split(text)
    assert argv[0] == "dask"
    return [str(Path(sys.executable).with_name("dask")), *argv[1:]]


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    """(address, certs) of a scheduler and a worker run as docker-compose.tls.yml runs them."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make certificates")
    certs = _certificates(tmp_path_factory.mktemp("certs"))
    services = yaml.safe_load(COMPOSE_TLS.read_text())["services"]
    port = _free_port()
    logs = tmp_path_factory.mktemp("logs")
    processes = []
    try:
        for name in ("dask-scheduler", "dask-worker"):
            argv = _local(services[name]["command"], certs, port)
            with (logs / f"{name}.log").open("w") as log:
                processes.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))
            if name == "dask-scheduler":
                _wait_for_port(port, processes[0], logs / f"{name}.log")
        yield f"tls://127.0.0.1:{port}", certs
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait(timeout=30)


def _wait_for_port(port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"scheduler did not listen: {log.read_text()}")


def _client_config(certs: Path) -> dict:
    """Dask configuration from the Prefect worker's environment in docker-compose.tls.yml (the
    variables a segflow shell exports), certificate paths pointed at `certs`."""
    env = {
        name: value.replace("/certs/", f"{certs}/")
        for service, name, value in environments(COMPOSE_TLS)
        if service == "prefect-worker" and name.startswith("DASK_")
    }
    assert env.pop("DASK_SCHEDULER_ADDRESS") == "tls://dask-scheduler:8786"
    return _dotted(dask.config.collect(paths=[], env=env))


def _dotted(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: `dask.config.set` replaces whole sections otherwise."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _dotted(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@pytest.mark.integration
def test_segflow_reaches_the_tls_cluster_with_the_client_certificate(tls_cluster):
    address, certs = tls_cluster
    with (
        dask.config.set(_client_config(certs)),
        dask_client(ClusterConfig(scheduler_address=address)) as client,
    ):
        client.wait_for_workers(1, timeout=60)
        assert client.submit(operator.add, 2, 3).result(timeout=60) == 5
        assert all(w.startswith("tls://") for w in client.scheduler_info()["workers"])


@pytest.mark.integration
def test_the_tls_cluster_refuses_clients_without_its_certificate(tls_cluster, tmp_path):
    address, _ = tls_cluster
    stranger = _certificates(tmp_path / "other-ca")  # valid certificates of another CA
    refused = {"distributed.comm.timeouts.connect": "3s"}
    with (
        dask.config.set(refused | _client_config(stranger)),
        pytest.raises((OSError, TimeoutError)),
    ):
        Client(address, timeout=3).close()
    # Plain TCP to the TLS port: no handshake, no scheduler.
    with dask.config.set(refused), pytest.raises((OSError, TimeoutError)):
        Client(address.replace("tls://", "tcp://"), timeout=3).close()
