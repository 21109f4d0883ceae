"""Prefect for a run: which API it reports to, and the embedded settings kept in the workdir.

The run's workdir and services are a `pipelines.runtime.Runtime`, resolved once where the run
starts (re-exported here for the flows). With no Prefect API URL (the runtime's, from
PREFECT_API_URL, or the active profile's) a run uses a temporary local API whose home,
database and task cache are in `prefect_dir`: `<workdir>/prefect`, so nothing is written to
~/.prefect and `prefect server start` on the same database shows the runs afterwards. A
workdir on object storage cannot hold a SQLite database, so its Prefect state stays local, in
Prefect's own home (PREFECT_HOME, default ~/.prefect) under `segflow/<hash of the workdir
URL>`: one folder per workdir, the same for every run on it. Prefect's settings are changed
for the duration of `prefect_session` only (prefect.settings.temporary_settings).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import prefect.settings

from flows.interrupt import on_interrupt
from pipelines.runtime import Runtime

__all__ = [
    "embedded_prefect_settings",
    "prefect_api_url",
    "prefect_database_url",
    "prefect_dir",
    "prefect_session",
]

#: Prefect's result-storage settings: where the user put Prefect's results (and so the task
#: cache), by variable or profile, is kept.
RESULT_STORAGE_SETTINGS = frozenset({"local_storage_path", "default_storage_block"})
#: The first start migrates a fresh database; 20 s (Prefect's default) is too tight on a busy
#: 2-core machine.
SERVER_STARTUP_SECONDS = 120


def prefect_dir(runtime: Runtime) -> Path:
    """PREFECT_HOME of an embedded run (the temporary API's database, the task cache): always
    a local folder, `<workdir>/prefect`, or for a workdir on object storage one in Prefect's
    home named after the workdir's URL.

    Example: a workdir s3://lab/work -> ~/.prefect/segflow/5c3e1b0e6f2a9d47.
    """
    if isinstance(runtime.workdir, Path):
        return runtime.workdir / "prefect"
    key = hashlib.sha256(str(runtime.workdir).encode()).hexdigest()[:16]
    return Path(prefect.settings.get_current_settings().home) / "segflow" / key


def embedded_prefect_settings(runtime: Runtime, home: Path | None = None) -> dict[str, object]:
    """Prefect settings for a run: the runtime's API URL, the task cache in `home` (default
    `prefect_dir`) and, when there is no API URL, PREFECT_HOME and the temporary local
    server's database there too, without telemetry. What the user set (a variable or the
    active profile) is kept."""
    home = home or prefect_dir(runtime)
    current = prefect.settings.get_current_settings()
    settings: dict[str, object] = {}
    if not current.results.model_fields_set & RESULT_STORAGE_SETTINGS:
        settings["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(home / "storage")
    if runtime.prefect_api_url is not None:
        settings["PREFECT_API_URL"] = runtime.prefect_api_url
    elif prefect_api_url(runtime) is None:
        if "home" not in current.model_fields_set:
            settings["PREFECT_HOME"] = str(home)
        settings |= {
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": prefect_database_url(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": False,
        }
    return settings


def prefect_api_url(runtime: Runtime) -> str | None:
    """The Prefect server to use: the runtime's, or the active Prefect profile's; None means
    Prefect's temporary local server."""
    return runtime.prefect_api_url or prefect.settings.get_current_settings().api.url or None


def prefect_database_url(home: Path) -> str:
    """The embedded Prefect API's SQLite database in `home` (a `prefect_dir`)."""
    return f"sqlite+aiosqlite:///{home / 'prefect.db'}"


@contextmanager
def prefect_session(runtime: Runtime) -> Iterator[str]:
    """Apply `embedded_prefect_settings` for the duration of the block; yields the API URL,
    that of a temporary local server (flows.prefect_server) when none is set."""
    home = prefect_dir(runtime)  # once: inside the block, Prefect's home may be this folder
    home.mkdir(parents=True, exist_ok=True)
    updates = {
        getattr(prefect.settings, name): value
        for name, value in embedded_prefect_settings(runtime, home).items()
    }
    with prefect.settings.temporary_settings(updates=updates):
        api_url = prefect_api_url(runtime)
        if api_url is not None:
            yield api_url
            return
        from flows.prefect_server import serving  # the server's modules load only when needed

        server = serving(prefect_database_url(home), SERVER_STARTUP_SECONDS)
        with (
            prefect.settings.temporary_settings({prefect.settings.PREFECT_API_URL: server.api_url}),
            on_interrupt(lambda reason: server.stop(), spare=server.server_process.pid),
        ):
            yield server.api_url
