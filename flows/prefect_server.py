"""Prefect's temporary local API as a child process that never outlives the command.

Prefect starts its own temporary server (`SubprocessASGIServer`) when no API URL is set and
stops it from an `atexit` hook; a command killed with SIGKILL runs no hook, and the uvicorn
process went on serving, re-parented to PID 1. Here the same server runs under a small wrapper
(this module's `__main__`) whose watchdog thread stops it as soon as its parent is gone:
polling `os.getppid()` works on every POSIX system, unlike Linux's PR_SET_PDEATHSIG, and
needs no file descriptor that forked workers could inherit and hold open.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import prefect
from prefect.server.api.server import SubprocessASGIServer, subprocess_server_logger
from prefect.settings import get_current_settings

#: How often the watchdog looks for its parent, and how long uvicorn may take to stop after.
POLL_SECONDS = 0.25
GRACE_SECONDS = 5.0


class TemporaryServer(SubprocessASGIServer):
    """Prefect's temporary server (its start-up, health check, port retries and `stop`), run
    under this module's watchdog so that it exits when the process that started it does."""

    #: Its own instances: Prefect's class keeps one per port, shared with Prefect's servers.
    _instances: dict[int | None, SubprocessASGIServer] = {}
    #: The database it serves (PREFECT_SERVER_DATABASE_CONNECTION_URL when it started).
    database_url: str | None = None

    def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
        # Prefect 3.8's own command line and environment, with the wrapper in front of uvicorn.
        return subprocess.Popen(
            args=[
                sys.executable,
                "-m",
                __name__,
                str(os.getpid()),
                "--app-dir",
                str(prefect.__module_path__.parent),
                "--factory",
                "prefect.server.api.server:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "error",
                "--lifespan",
                "on",
            ],
            env={
                **os.environ,
                "PREFECT_UI_ENABLED": "0",
                "PREFECT__SERVER_EPHEMERAL": "1",
                "PREFECT__SERVER_FINAL": "1",
                **get_current_settings().to_environment_variables(exclude_unset=True),
            },
            # Out of the terminal's process group: a Ctrl-C there must not stop the server
            # before the interrupted command has recorded its flow run as Cancelled.
            start_new_session=True,
        )

    def stop(self) -> None:
        """Prefect's stop, without its "Stopping temporary server" line: it runs at exit, after
        the command's report, when the quiet block that kept Prefect's info lines off the
        terminal has ended."""
        level = subprocess_server_logger.level
        subprocess_server_logger.setLevel(logging.WARNING)
        try:
            super().stop()
        finally:
            subprocess_server_logger.setLevel(level)


def serving(database_url: str, startup_timeout: int) -> TemporaryServer:
    """A running temporary server over `database_url`, to be started inside the Prefect
    settings it should run with: the one this process already runs for that database, else a
    new one (another database's server is stopped first). Like Prefect's own, it is kept for
    later flow runs of the process and stopped at exit, after Prefect's log and event workers
    have sent what they hold."""
    server = TemporaryServer()
    if server.running and server.database_url != database_url:
        server.stop()
        server = TemporaryServer()
    if not server.running:
        server.database_url = database_url
        server.start(timeout=startup_timeout)
    return server


def _stop_when_orphaned(parent: int) -> None:
    """Send ourselves SIGTERM (uvicorn's graceful stop) once `parent` is gone; exit hard if
    that takes longer than GRACE_SECONDS."""
    while os.getppid() == parent:
        time.sleep(POLL_SECONDS)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_SECONDS)
    os._exit(1)


def main(argv: list[str]) -> None:
    """`python -m flows.prefect_server PARENT_PID UVICORN_ARGS...`"""
    import uvicorn

    parent, *uvicorn_args = argv
    threading.Thread(target=_stop_when_orphaned, args=(int(parent),), daemon=True).start()
    uvicorn.main.main(args=uvicorn_args, prog_name="uvicorn")


if __name__ == "__main__":
    main(sys.argv[1:])
