"""Where stages write: checked output folders, private temporary siblings, atomic install.

A stage builds its output in a hidden sibling of the final path, named after the final path,
the writing process and a random suffix:

    stores/.s1.zarr.tmp-4242-9f1c2ab0     being written by process 4242
    stores/.s1.zarr.old-4242-5d0e7c11     the previous s1.zarr, being replaced by 4242

so two writers in one process (threads of a flow run) never share a temporary, and a
leftover is removed only when the process that made it is gone: a live run's work is never
deleted by another run.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import psutil
import zarr

from segcore.atomic import replacing, sibling

#: Errors that say "this place cannot be written", which trying again will not change.
_NOT_WRITABLE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR})


class OutputError(ValueError):
    """An output place that cannot be written or replaced; the message names it."""


def writable_folder(folder: str | Path) -> Path:
    """`folder`, created if missing and proven writable by creating a file in it.

    Example: a workdir on a read-only mount raises
    `OutputError("/mnt/ro/work: cannot write here (Read-only file system)")`.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".segflow-probe-"):
            pass
    except FileExistsError:
        raise OutputError(f"{folder}: cannot write here (exists and is not a folder)") from None
    except OSError as exc:
        if exc.errno in _NOT_WRITABLE:
            raise OutputError(f"{folder}: cannot write here ({exc.strerror})") from exc
        raise
    return folder


def temporary_sibling(final: Path, kind: str = "tmp") -> Path:
    """A fresh hidden path beside `final` owned by this process (see the module docstring;
    the naming rule is `segcore.atomic.sibling`, shared with single files)."""
    return sibling(final, kind)


def remove_stale_siblings(final: Path) -> None:
    """Remove temporary and superseded copies of `final` whose writing process has died."""
    for path in final.parent.glob(f".{final.name}.*-*-*"):
        pid = path.name.split("-")[-2]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def refuse_links(final: Path) -> None:
    """Raise when `final` is a symbolic link: installing renames the path itself, which would
    put the new output where the link was and leave the link's target stale."""
    if final.is_symlink():
        target = os.readlink(final)
        raise OutputError(
            f"{final}: is a symbolic link to {target}; segflow will not replace a link "
            "(remove it, or write to the target's folder)"
        )


def install(tmp: Path, final: Path) -> None:
    """Move the finished folder `tmp` to `final`; an older `final` is renamed aside first, then
    removed, so `final` is at every moment either the old output or the new one."""
    refuse_links(final)
    if not final.exists():
        os.replace(tmp, final)
        return
    old = temporary_sibling(final, "old")
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old)


def write_file(path: Path, text: str) -> None:
    """Write `text` in place of `path`'s content: readers never see half (segcore.atomic)."""
    with replacing(path) as tmp:
        tmp.write_text(text)


def reconsolidate(store: Path) -> None:
    """Consolidate `store`'s metadata again where it was consolidated before: readers that
    trust consolidated metadata would not see newly installed arrays or groups otherwise."""
    if zarr.open_group(store, mode="r").metadata.consolidated_metadata is not None:
        with warnings.catch_warnings():
            # The store chose consolidation already; zarr's "not in the v3 spec" note is noise.
            warnings.simplefilter("ignore", zarr.errors.ZarrUserWarning)
            zarr.consolidate_metadata(store)
