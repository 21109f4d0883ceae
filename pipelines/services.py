"""Fail fast when a service is not there: one quick probe per service, one line saying which.

MLflow's REST client retries a refused connection with backoff for minutes (a dead tracking
port took 359 s and then blamed "no such model version"), and Dask waits for a scheduler as
long as its connect timeout. A short probe before the first real request turns both into one
line within seconds, without touching either library's process-wide settings.

    mlflow_client("http://127.0.0.1:5000")       # MlflowClient, once the server answered
    require_mlflow("sqlite:///work/mlflow.db")   # nothing to probe: not a server
    connect_scheduler("tcp://10.0.0.5:8786", 10)  # Client, or SchedulerUnreachableError
"""

from __future__ import annotations

import requests
from distributed import Client
from mlflow import MlflowClient

from pipelines.redaction import redact_uri
from pipelines.runtime import sqlite_database

#: Seconds to wait for a TCP connection, then for the first byte of the answer: well inside
#: the 30 s a user waits before deciding something hangs.
MLFLOW_CONNECT_TIMEOUT_S = 5.0
MLFLOW_READ_TIMEOUT_S = 10.0


class ServiceUnreachableError(ValueError):
    """A tracking server or Dask scheduler that does not answer."""


class MissingStoreError(ValueError):
    """A tracking store to read from that does not exist."""


def require_mlflow(tracking_uri: str) -> None:
    """Raise ServiceUnreachableError unless the http(s) tracking server at `tracking_uri`
    answers; other URIs (sqlite, file, databricks) have no server of segflow's to probe and
    pass."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    try:
        # Any HTTP answer, an error status included, proves a server is there: MLflow itself
        # then reports what is wrong with the request. /health is MLflow server's cheapest page.
        requests.get(
            f"{tracking_uri.rstrip('/')}/health",
            timeout=(MLFLOW_CONNECT_TIMEOUT_S, MLFLOW_READ_TIMEOUT_S),
            allow_redirects=False,
        )
    except requests.exceptions.SSLError:
        return  # the server answered the handshake; MLflow applies its own TLS settings
    except requests.exceptions.RequestException as exc:
        raise ServiceUnreachableError(
            f"cannot reach MLflow at {redact_uri(tracking_uri)} ({_reason(exc)})"
        ) from exc


def mlflow_client(tracking_uri: str) -> MlflowClient:
    """A client, for reading, whose tracking and registry URIs are both `tracking_uri`, once
    the server (if it is one) has answered.

    A `sqlite:///` store whose database file does not exist holds no run and no model, and
    MLflow would create it on the first request: a failed lookup would leave an empty
    database behind, so it is refused instead (`MissingStoreError`).
    """
    require_mlflow(tracking_uri)
    database = sqlite_database(tracking_uri)
    if database is not None and not database.is_file():
        raise MissingStoreError(
            f"no MLflow store at {redact_uri(tracking_uri)} yet (nothing has been trained there)"
        )
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def connect_scheduler(address: str, timeout_s: float) -> Client:
    """A Client of the Dask scheduler at `address`, or ServiceUnreachableError after
    `timeout_s` seconds."""
    try:
        return Client(address, timeout=timeout_s)
    except (OSError, TimeoutError) as exc:  # distributed raises OSError or asyncio's timeout
        raise ServiceUnreachableError(
            f"cannot reach the Dask scheduler at {redact_uri(address)} (no answer within "
            f"{timeout_s:g} s)"
        ) from exc


def _reason(exc: requests.exceptions.RequestException) -> str:
    if isinstance(exc, requests.exceptions.Timeout):
        return "timed out"
    if isinstance(exc, requests.exceptions.ConnectionError):
        return "connection refused or host unknown"
    return type(exc).__name__
