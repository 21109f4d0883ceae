"""Where a run keeps its outputs and which services it talks to, resolved once at the entry point.

With nothing configured everything is embedded on one machine: stores under `<workdir>/stores`,
MLflow in `sqlite:///<workdir>/mlflow.db`, a Dask LocalCluster, and Prefect's temporary local
API with its database and task cache under `<workdir>/prefect`. `PREFECT_API_URL`,
`MLFLOW_TRACKING_URI` and `DASK_SCHEDULER_ADDRESS` move a run onto real servers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import prefect.settings
from pydantic import BaseModel, ConfigDict

from flows.interrupt import on_interrupt
from pipelines.cluster import ClusterConfig
from pipelines.redaction import RedactedUri

#: Where the user already put Prefect's results (and so the task cache).
STORAGE_VARIABLES = (
    "PREFECT_RESULTS_LOCAL_STORAGE_PATH",
    "PREFECT_LOCAL_STORAGE_PATH",
    "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK",
    "PREFECT_DEFAULT_RESULT_STORAGE_BLOCK",
)
#: The first start migrates a fresh database; 20 s (Prefect's default) is too tight on a busy
#: 2-core machine.
SERVER_STARTUP_SECONDS = 120


class Runtime(BaseModel):
    """The services of a run; a field left None is taken from the environment, else embedded."""

    model_config = ConfigDict(extra="forbid")

    workdir: Path = Path("segflow-work")
    #: None = the embedded `sqlite:///<workdir>/mlflow.db` (artifacts in <workdir>/mlartifacts).
    tracking_uri: RedactedUri = None
    #: A running Dask scheduler for every stage; None = each stage starts the LocalCluster its
    #: own `cluster` settings describe.
    scheduler_address: RedactedUri = None

    @property
    def stores_dir(self) -> Path:
        """Where ingested slide stores live."""
        return self.workdir / "stores"

    @property
    def prefect_dir(self) -> Path:
        """The embedded Prefect API's database and the task cache."""
        return self.workdir / "prefect"

    @property
    def mlflow_uri(self) -> str:
        """The tracking (and registry) URI to talk to."""
        return self.tracking_uri or f"sqlite:///{self.workdir / 'mlflow.db'}"

    def resolved(self, env: Mapping[str, str]) -> Runtime:
        """Absolute workdir, and unset services filled from `env`."""
        workdir = self.workdir.expanduser().resolve()
        tracking_uri = self.tracking_uri or env.get("MLFLOW_TRACKING_URI") or None
        if tracking_uri == f"sqlite:///{workdir / 'mlflow.db'}":
            tracking_uri = None  # the embedded store named explicitly: keep its artifacts beside it
        address = self.scheduler_address or env.get("DASK_SCHEDULER_ADDRESS") or None
        return Runtime(workdir=workdir, tracking_uri=tracking_uri, scheduler_address=address)

    def cluster(self, config: ClusterConfig) -> ClusterConfig:
        """A stage's cluster settings, pointed at the run's scheduler when it has one."""
        if self.scheduler_address is None:
            return config
        return config.model_copy(update={"scheduler_address": self.scheduler_address})


def embedded_prefect_settings(runtime: Runtime, env: Mapping[str, str]) -> dict[str, object]:
    """Prefect settings for a run: the task cache under the workdir and, when no API URL is set,
    the temporary local server's database kept there too (so `prefect server start` on the
    same database shows the runs afterwards), without telemetry."""
    settings: dict[str, object] = {}
    if not any(env.get(name) for name in STORAGE_VARIABLES):
        settings["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(runtime.prefect_dir / "storage")
    if prefect_api_url(env) is None:
        settings |= {
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": prefect_database_url(runtime),
            "PREFECT_SERVER_ANALYTICS_ENABLED": False,
        }
    return settings


def prefect_api_url(env: Mapping[str, str]) -> str | None:
    """The Prefect server to use: PREFECT_API_URL, or the active Prefect profile's; None means
    Prefect's temporary local server."""
    return env.get("PREFECT_API_URL") or prefect.settings.get_current_settings().api.url or None


def prefect_database_url(runtime: Runtime) -> str:
    """The embedded Prefect API's SQLite database."""
    return f"sqlite+aiosqlite:///{runtime.prefect_dir / 'prefect.db'}"


@contextmanager
def prefect_session(runtime: Runtime, env: Mapping[str, str]) -> Iterator[str]:
    """Apply `embedded_prefect_settings` for the duration of the block; yields the API URL,
    that of a temporary local server (flows.prefect_server) when none is set."""
    runtime.prefect_dir.mkdir(parents=True, exist_ok=True)
    updates = {
        getattr(prefect.settings, name): value
        for name, value in embedded_prefect_settings(runtime, env).items()
    }
    with prefect.settings.temporary_settings(updates=updates):
        api_url = prefect_api_url(env)
        if api_url is not None:
            yield api_url
            return
        from flows.prefect_server import serving  # the server's modules load only when needed

        server = serving(prefect_database_url(runtime), SERVER_STARTUP_SECONDS)
        with (
            prefect.settings.temporary_settings({prefect.settings.PREFECT_API_URL: server.api_url}),
            on_interrupt(lambda reason: server.stop(), spare=server.server_process.pid),
        ):
            yield server.api_url
