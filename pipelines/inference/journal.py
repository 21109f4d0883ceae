"""What survives a kill: the run lock of an output store and the done-markers of its blocks.

Layout inside the output store (ignored by Zarr and NGFF readers: no zarr.json at its root):
    .segflow-infer/
      lock                    {"pid", "host", "start"}: created with O_EXCL, removed at the end
      <run key>/
        done/<block>.json     written after all chunks of the block are on disk
        labels/..., probabilities/...   the run's outputs until they are moved into place
The run key is the key of the output's identity (`pipelines.stage.Identity`: the input store,
the model's digest, every setting that changes output bytes, the numeric layout the blocks
are computed under), so a different model, setting or layout (device, precision, torch
threads per pass, torch version: `pipelines.numerics`) starts afresh instead of mixing
blocks from two runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

JOURNAL_DIR = ".segflow-infer"


class RunLockedError(ValueError):
    """Another run holds the output store."""


@dataclass(frozen=True)
class Journal:
    """The block markers of one run on one output store."""

    root: Path

    @classmethod
    def of(cls, output: Path, key: str) -> Journal:
        return cls(output / JOURNAL_DIR / key)

    @property
    def done_dir(self) -> Path:
        return self.root / "done"

    def marker(self, block_name: str) -> Path:
        return self.done_dir / f"{block_name}.json"

    def done(self) -> dict[str, dict]:
        """Outcomes of the blocks already finished, by block name."""
        if not self.done_dir.is_dir():
            return {}
        return {p.stem: json.loads(p.read_text()) for p in self.done_dir.glob("*.json")}

    def start(self) -> None:
        """Create this run's directory and drop other runs' leftovers (the lock is held)."""
        for other in self.root.parent.iterdir():
            if other.is_dir() and other != self.root:
                shutil.rmtree(other)
        self.done_dir.mkdir(parents=True, exist_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.root.parent.rmdir()


#: A lock file still empty after this long was left by a run killed while creating it.
EMPTY_LOCK_GRACE_S = 10.0


def _read_lock(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _is_stale(path: Path, holder: dict) -> bool:
    """True when the holder ran on this host and its process is gone."""
    if not holder:
        with contextlib.suppress(OSError):
            return time.time() - path.stat().st_mtime > EMPTY_LOCK_GRACE_S
        return True
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int) or not psutil.pid_exists(pid):
        return True
    try:
        # A recycled pid belongs to a process started after the lock was taken.
        return psutil.Process(pid).create_time() > holder.get("start", 0) + 1
    except psutil.NoSuchProcess:
        return True


@contextlib.contextmanager
def run_lock(output: Path) -> Iterator[Path]:
    """Hold the output store's run lock; a second run refuses, a dead holder's lock is taken."""
    path = output / JOURNAL_DIR / "lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "start": time.time()})
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            if not _is_stale(path, holder):
                raise RunLockedError(
                    f"{output}: another inference run holds it (pid {holder.get('pid')} on "
                    f"{holder.get('host')} since {time.ctime(holder.get('start', 0))}); "
                    f"remove {path} if that run is gone"
                ) from None
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(payload)
        break
    else:
        raise RunLockedError(f"{output}: could not take the run lock {path}")
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            path.parent.rmdir()
