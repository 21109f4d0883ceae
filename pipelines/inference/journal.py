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
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import psutil

from pipelines.location import Where, is_folder, list_folder
from pipelines.storage import create_exclusive, read_text, read_texts, remove_file, remove_tree

JOURNAL_DIR = ".segflow-infer"


class RunLockedError(ValueError):
    """Another run holds the output store."""


@dataclass(frozen=True)
class Journal:
    """The block markers of one run on one output store."""

    root: Where

    @classmethod
    def of(cls, output: Where, key: str) -> Journal:
        return cls(output / JOURNAL_DIR / key)

    @property
    def done_dir(self) -> Where:
        return self.root / "done"

    def marker(self, block_name: str) -> Where:
        return self.done_dir / f"{block_name}.json"

    def done(self) -> dict[str, dict]:
        """Outcomes of the blocks already finished, by block name: one listing, the markers
        read together (`pipelines.storage.read_texts`)."""
        if not is_folder(self.done_dir):
            return {}
        files, _ = list_folder(self.done_dir)
        markers = [f for f in files if f.name.endswith(".json")]
        return {
            PurePosixPath(f.name).stem: json.loads(text)
            for f, text in zip(markers, read_texts(markers), strict=True)
        }

    def start(self) -> None:
        """Create this run's directory and drop other runs' leftovers (the lock is held)."""
        _, runs = list_folder(self.root.parent)
        for other in runs:
            if other != self.root:
                remove_tree(other)
        if isinstance(self.done_dir, Path):
            self.done_dir.mkdir(parents=True, exist_ok=True)

    def remove(self) -> None:
        remove_tree(self.root)
        if isinstance(self.root, Path):
            with contextlib.suppress(OSError):
                self.root.parent.rmdir()


#: A lock file still empty after this long was left by a run killed while creating it.
EMPTY_LOCK_GRACE_S = 10.0


def _read_lock(path: Where) -> dict:
    try:
        return json.loads(read_text(path))
    except (OSError, ValueError):
        return {}


def _is_stale(path: Where, holder: dict) -> bool:
    """True when the holder ran on this host and its process is gone. A lock object on
    object storage is never empty (one PUT writes it whole), so one without a holder there
    was not written by segflow and is left to the user."""
    if not holder:
        if not isinstance(path, Path):
            return False
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
def run_lock(output: Where) -> Iterator[Where]:
    """Hold the output store's run lock; a second run refuses, a dead holder's lock is taken.
    Taken by an exclusive create (`pipelines.storage.create_exclusive`: O_EXCL locally, a
    conditional PUT on object storage), so two runs never both hold it."""
    path = output / JOURNAL_DIR / "lock"
    if isinstance(path, Path):
        path.parent.mkdir(parents=True, exist_ok=True)
    payload = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "start": time.time()})
    for _ in range(2):
        if create_exclusive(path, payload):
            break
        holder = _read_lock(path)
        if not _is_stale(path, holder):
            raise RunLockedError(
                f"{output}: another inference run holds it (pid {holder.get('pid')} on "
                f"{holder.get('host')} since {time.ctime(holder.get('start', 0))}); "
                f"remove {path} if that run is gone"
            )
        remove_file(path)
    else:
        raise RunLockedError(f"{output}: could not take the run lock {path}")
    try:
        yield path
    finally:
        remove_file(path)
        if isinstance(path, Path):
            with contextlib.suppress(OSError):
                path.parent.rmdir()
