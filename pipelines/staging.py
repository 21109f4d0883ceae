"""Local copies of objects that a library reads only from a file (OpenSlide's formats), kept
in one folder bounded in bytes: the least recently used copies go to make room.

    cache = StagingCache(Path("work/staged"), max_bytes=8 << 30)
    with cache.staged(url) as local:   # url: ObjectUrl('s3://lab/archive/a.svs')
        ...                            # local: work/staged/<key>/a.svs, kept while in use
    cache.removed                      # copies this cache removed to make room

    with readable(url, Path("work/staged")) as image:  # what the readers open: a local path
        ...                                            # as is, an OpenSlide slide staged, a
                                                       # TIFF/PNG object as is (range reads)

Which folder: `ObjectStorageConfig.stage_dir` when set, else `stage_dir_for(out_dir)`, the
folder `staged` beside a local stores folder and, when the stores themselves are on object
storage (nothing may go beside them), `segflow-<uid>/staged` in the system's temporary folder
(`tempfile.gettempdir()`: TMPDIR, else /tmp), one per user and shared by that user's runs.
Every Dask worker reads the copy, so on a cluster of several hosts with stores on object
storage set `stage_dir` to a folder they share; where the temporary folder is small or held in
memory (tmpfs), set it to a disk.

A copy is named by the URL and the object's version (its ETag), so a replaced object is
fetched again, and keeps the object's name (OpenSlide tells formats by extension). It is
downloaded under a hidden temporary name and renamed when complete, so a half-fetched copy is
never read. A copy in use holds a shared lock (flock on its folder's `.lock`), and only
copies whose lock can be taken exclusively are removed, so concurrent slides, threads or
processes never lose a copy they read. An object larger than the whole cache is an error.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from pipelines.location import (
    LocationError,
    ObjectUrl,
    Where,
    file_size,
    file_version,
    open_binary,
)
from segcore.atomic import replacing
from segcore.readers import needs_local_file

_COPY_BLOCK = 8 << 20
_LOCK = ".lock"


class StagingCache:
    """At most `max_bytes` of local copies in `folder` (created when first used)."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        #: Copies this cache removed to make room.
        self.removed = 0

    @contextmanager
    def staged(self, url: ObjectUrl) -> Iterator[Path]:
        """A local copy of `url`, kept while the block runs."""
        key = hashlib.sha256(f"{url}\n{file_version(url)}".encode()).hexdigest()[:20]
        local = self.folder / key / url.name
        local.parent.mkdir(parents=True, exist_ok=True)
        with (local.parent / _LOCK).open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH)
            if local.is_file():
                os.utime(local)  # the most recently used
            else:
                self._fetch(url, local)
            yield local

    def _fetch(self, url: ObjectUrl, local: Path) -> None:
        size = file_size(url)
        if size > self.max_bytes:
            raise LocationError(
                f"{url}: {size / 2**20:.1f} MiB does not fit the staging cache of "
                f"{self.max_bytes / 2**20:.1f} MiB in {self.folder} (raise stage_cache_mb)"
            )
        self._make_room(size)
        with replacing(local) as partial, open_binary(url) as src, partial.open("wb") as dst:
            while block := src.read(_COPY_BLOCK):
                dst.write(block)

    def copies(self) -> list[Path]:
        """The complete copies, least recently used first."""
        found = [p for p in self.folder.glob("*/*") if p.is_file() and not p.name.startswith(".")]
        return sorted(found, key=lambda p: p.stat().st_mtime_ns)

    def _make_room(self, size: int) -> None:
        """Remove the least recently used copies not in use until `size` more bytes fit."""
        copies = self.copies()
        total = sum(p.stat().st_size for p in copies)
        for copy in copies:
            if total + size <= self.max_bytes:
                return
            with (copy.parent / _LOCK).open("a") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # being read
                with suppress(FileNotFoundError):
                    total -= copy.stat().st_size
                    copy.unlink()
                    self.removed += 1


def stage_dir_for(out_dir: Where) -> Path:
    """The staging folder for slides ingested into `out_dir` when the storage settings name
    none (module docstring).

    Example: stage_dir_for(Path("work/stores")) -> Path("work/staged");
    stage_dir_for(ObjectUrl("s3", "lab/stores")) -> Path("/tmp/segflow-1000/staged").
    """
    if isinstance(out_dir, Path):
        return out_dir.parent / "staged"
    return Path(tempfile.gettempdir()) / f"segflow-{os.getuid()}" / "staged"


@contextmanager
def readable(image: Where, stage_dir: Path) -> Iterator[Where]:
    """`image` as the readers open it: a local path as it is; an object that OpenSlide reads
    (`segcore.readers.needs_local_file`) as a copy staged in its storage's cache
    (`stage_dir` unless its settings name one); any other object as it is, read by range
    requests."""
    if isinstance(image, Path):
        yield image
        return
    with open_binary(image) as fh:
        local = needs_local_file(str(image), fh)
    if not local:
        yield image
        return
    storage = image.storage
    cache = StagingCache(storage.stage_dir or stage_dir, storage.stage_cache_mb << 20)
    with cache.staged(image) as path:
        yield path
