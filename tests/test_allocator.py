"""The `segflow` command runs with glibc's allocator tuned, unless the user chose otherwise."""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.allocator import SWITCH, TUNED_ENVIRONMENT, tuned_environment

SEGFLOW = Path(sys.executable).with_name("segflow")
glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")


@glibc
def test_tuned_environment_adds_the_settings_once():
    env = tuned_environment({"PATH": "/usr/bin"})
    assert env == {"PATH": "/usr/bin", **TUNED_ENVIRONMENT, SWITCH: "0"}
    assert tuned_environment(env) is None  # the re-executed process does not loop


@glibc
@pytest.mark.parametrize("user", [{"MALLOC_ARENA_MAX": "4"}, {SWITCH: "0"}])
def test_a_users_choice_is_left_alone(user):
    assert tuned_environment({"PATH": "/usr/bin", **user}) is None


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().partition("=")[::2] for item in raw if b"=" in item)


@glibc
@pytest.mark.parametrize(
    ("extra", "expected"),
    [({}, TUNED_ENVIRONMENT["MALLOC_ARENA_MAX"]), ({"MALLOC_ARENA_MAX": "4"}, "4")],
)
def test_the_installed_command_runs_tuned(tmp_path, extra, expected):
    """Read the running command's own environment from /proc (execve keeps the pid)."""
    from segcore.synthetic import write_synthetic_slide

    write_synthetic_slide(tmp_path / "s.tif", tmp_path / "t.tif", 64, 64, seed=1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != SWITCH}
    proc = subprocess.Popen(
        [str(SEGFLOW), "ingest", str(tmp_path / "s.tif"), "--workdir", str(tmp_path / "w")],
        env={**env, **extra},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Re-execution happens before any import of note (a fraction of a second); the
        # command then starts Prefect for several seconds. Sample its environment meanwhile.
        seen: dict[str, str] = {}
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                seen = _environ(proc.pid)
            except OSError:  # it just ended
                break
            time.sleep(0.1)
        assert seen.get("MALLOC_ARENA_MAX") == expected, seen
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
