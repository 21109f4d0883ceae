"""Where stages write: checked output places, private temporaries, install, locks; the same
questions of a local folder (`Path`) and of an object-storage prefix (`ObjectUrl`).

A stage builds its output in a hidden sibling of the final place, named after the final
place, the writing process and a random suffix:

    stores/.s1.zarr.tmp-4242-9f1c2ab0            being written by process 4242
    stores/.s1.zarr.old-4242-5d0e7c11            the previous s1.zarr, being replaced by 4242
    s3://lab/stores/.s1.zarr.tmp-gpu7-4242-9f1c2ab0   the same on object storage (its host too)

so two writers in one process (threads of a flow run) never share a temporary, and a
leftover is removed only when the process that made it is gone: a live run's work is never
deleted by another run. Object storage has no rename: there `install` copies the finished
prefix server-side, every chunk first and the Zarr metadata documents (`zarr.json`) last,
deepest first and the root's at the very end, after removing the old output the same way
round (its metadata first). A reader therefore sees the old output, no output, or the new
one, never a group whose metadata lists chunks that are not there; an install killed half
way leaves no root metadata, so the output is not current and the next run writes it again.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import tempfile
import uuid
import warnings
from pathlib import Path, PurePosixPath

import psutil
import zarr

from pipelines.location import ObjectUrl, Where, _remote
from segcore.atomic import replacing, sibling
from segcore.store import open_group, zarr_location

#: Errors that say "this place cannot be written", which trying again will not change.
_NOT_WRITABLE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR})
#: Zarr v3's metadata document: what makes a group or an array exist for a reader.
METADATA_DOCUMENT = "zarr.json"


class OutputError(ValueError):
    """An output place that cannot be written or replaced; the message names it."""


def writable_folder(folder: str | Where) -> Where:
    """`folder`, created if missing and proven writable by creating a file (an object) in it.

    Example: a workdir on a read-only mount raises
    `OutputError("/mnt/ro/work: cannot write here (Read-only file system)")`; a prefix in a
    bucket that does not exist raises `OutputError("s3://nope/work: cannot write here (...)")`.
    Nothing local is created for an object-storage prefix.
    """
    if isinstance(folder, ObjectUrl):
        probe = folder / f".segflow-probe-{uuid.uuid4().hex[:8]}"
        fs = folder.filesystem()
        try:
            fs.pipe_file(probe.path, b"")
            fs.rm_file(probe.path)
        except Exception as exc:  # the client's errors: no bucket, access denied, unreachable
            reason = getattr(exc, "strerror", None) or str(exc)
            raise OutputError(f"{folder}: cannot write here ({reason})") from None
        return folder
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


def temporary_sibling(final: Where, kind: str = "tmp") -> Where:
    """A fresh hidden place beside `final` owned by this process (see the module docstring;
    the local naming rule is `segcore.atomic.sibling`, shared with single files). On object
    storage the name also carries the host, since many hosts write to one bucket."""
    if isinstance(final, ObjectUrl):
        host = socket.gethostname().replace("-", "_")
        suffix = f"{kind}-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        return final.with_name(f".{final.name}.{suffix}")
    return sibling(final, kind)


_SIBLING = re.compile(r"^\.(?P<name>.+)\.(tmp|old)-(?:(?P<host>[^-]+)-)?(?P<pid>\d+)-[0-9a-f]{8}$")


def _abandoned(name: str, final_name: str, remote: bool) -> bool:
    """Whether `name` is a temporary sibling of `final_name` whose writer is gone: its process
    has ended, on this host (a sibling on object storage made on another host is left be)."""
    match = _SIBLING.match(name)
    if match is None or match["name"] != final_name:
        return False
    if remote and match["host"] != socket.gethostname().replace("-", "_"):
        return False
    return not psutil.pid_exists(int(match["pid"]))


def remove_stale_siblings(final: Where) -> None:
    """Remove temporary and superseded copies of `final` whose writing process has died."""
    if isinstance(final, ObjectUrl):
        if not exists(final.parent):  # an empty prefix: nothing written there yet
            return
        entries = _remote(final.parent, "list it", lambda fs: fs.ls(final.parent.path))
        for entry in entries:
            name = PurePosixPath(entry.rstrip("/")).name
            if _abandoned(name, final.name, remote=True):
                remove_tree(final.with_name(name))
        return
    for path in final.parent.glob(f".{final.name}.*-*-*"):
        if _abandoned(path.name, final.name, remote=False):
            shutil.rmtree(path, ignore_errors=True)


def refuse_links(final: Where) -> None:
    """Raise when `final` is a symbolic link: installing renames the path itself, which would
    put the new output where the link was and leave the link's target stale."""
    if isinstance(final, Path) and final.is_symlink():
        target = os.readlink(final)
        raise OutputError(
            f"{final}: is a symbolic link to {target}; segflow will not replace a link "
            "(remove it, or write to the target's folder)"
        )


def exists(where: Where) -> bool:
    """Whether anything (a file, a folder, an object or a prefix) is at `where`."""
    if isinstance(where, ObjectUrl):
        return bool(_remote(where, "read it", lambda fs: fs.exists(where.path)))
    return where.exists()


def _keys(prefix: ObjectUrl) -> list[str]:
    """Every object under `prefix` (full keys, bucket first); none when there is no prefix."""
    return list(_remote(prefix, "list it", lambda fs: fs.find(prefix.path)))


def _split(keys: list[str]) -> tuple[list[str], list[str]]:
    """(data, metadata documents) of `keys`, the documents from the root down."""
    data = [k for k in keys if PurePosixPath(k).name != METADATA_DOCUMENT]
    metadata = [k for k in keys if PurePosixPath(k).name == METADATA_DOCUMENT]
    return data, sorted(metadata, key=lambda k: k.count("/"))


def remove_tree(where: Where) -> None:
    """Remove `where` and everything under it (nothing when absent). On object storage the
    metadata documents go first, root first, so a reader never opens a group whose chunks
    are being deleted."""
    if isinstance(where, Path):
        shutil.rmtree(where, ignore_errors=True)
        return
    data, metadata = _split(_keys(where))
    if metadata:
        _remote(where, "delete it", lambda fs: fs.rm(metadata))
    if data:
        _remote(where, "delete it", lambda fs: fs.rm(data))


def _copy_published(tmp: ObjectUrl, final: ObjectUrl) -> None:
    """Copy every object of `tmp` to the same key under `final`, server-side: the chunks
    together, then the metadata documents one by one, deepest first, the root's last."""
    data, metadata = _split(_keys(tmp))
    if not metadata:
        raise OutputError(f"{tmp}: no Zarr metadata to install")

    def target(key: str) -> str:
        return f"{final.path}/{PurePosixPath(key).relative_to(tmp.path).as_posix()}"

    if data:
        _remote(final, "write it", lambda fs: fs.copy(data, [target(k) for k in data]))
    for key in reversed(metadata):
        _remote(final, "write it", lambda fs, k=key: fs.copy(k, target(k)))


def install(tmp: Where, final: Where) -> None:
    """Put the finished output `tmp` at `final`.

    Locally an older `final` is renamed aside first, then removed, so `final` is at every
    moment either the old output or the new one. On object storage (no rename) the old
    output is removed and `tmp` copied in, metadata last (module docstring), then removed.
    """
    if isinstance(tmp, ObjectUrl) and isinstance(final, ObjectUrl):
        remove_tree(final)
        _copy_published(tmp, final)
        remove_tree(tmp)
        return
    if isinstance(tmp, ObjectUrl) or isinstance(final, ObjectUrl):
        raise OutputError(f"{final}: cannot install {tmp} from another kind of storage")
    refuse_links(final)
    if not final.exists():
        os.replace(tmp, final)
        return
    old = temporary_sibling(final, "old")
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old)


def write_file(path: Where, text: str) -> None:
    """Write `text` in place of `path`'s content: readers never see half (segcore.atomic
    locally; one PUT, which S3 applies whole, on object storage)."""
    if isinstance(path, ObjectUrl):
        _remote(path, "write it", lambda fs: fs.pipe_file(path.path, text.encode()))
        return
    with replacing(path) as tmp:
        tmp.write_text(text)


def read_text(path: Where) -> str:
    """The text of the file (object) `path`; FileNotFoundError when there is none."""
    if isinstance(path, ObjectUrl):
        fs = path.filesystem()
        return fs.cat_file(path.path).decode()
    return path.read_text()


def read_texts(paths: list[Where]) -> list[str]:
    """The texts of the files `paths` (all local, or all on one object storage), in order.
    Objects are fetched concurrently: 10 000 small objects take one batch of requests, not
    10 000 round trips one after another."""
    if not paths or isinstance(paths[0], Path):
        return [read_text(path) for path in paths]
    first = paths[0]
    found = _remote(first.parent, "read it", lambda fs: fs.cat([p.path for p in paths]))
    return [found[p.path].decode() for p in paths]


def create_exclusive(path: Where, text: str) -> bool:
    """Create `path` holding `text` unless it exists (then False, leaving it as it was): an
    O_EXCL create locally, a conditional PUT (If-None-Match: *) on object storage."""
    if isinstance(path, ObjectUrl):
        fs = path.filesystem()
        try:
            fs.pipe_file(path.path, text.encode(), mode="create")
        except FileExistsError:
            return False
        return True
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return True


def remove_file(path: Where) -> None:
    """Remove the file (object) `path`, if there."""
    if isinstance(path, ObjectUrl):
        with contextlib.suppress(FileNotFoundError):
            path.filesystem().rm_file(path.path)
        return
    path.unlink(missing_ok=True)


def tree_bytes(where: Where) -> int:
    """Bytes stored under `where`."""
    if isinstance(where, ObjectUrl):
        return int(_remote(where, "list it", lambda fs: fs.du(where.path)))
    return sum(p.stat().st_size for p in where.rglob("*") if p.is_file())


def put_file(source: Path, target: Where) -> None:
    """Copy the local file `source` to `target`: readers never see half (segcore.atomic
    locally; one upload, which S3 applies whole, on object storage)."""
    if isinstance(target, ObjectUrl):
        _remote(target, "write it", lambda fs: fs.put_file(str(source), target.path))
        return
    with replacing(target) as tmp:
        shutil.copyfile(source, tmp)


def files_by_age(folder: Where, pattern: str) -> list[Where]:
    """The files under `folder` that the glob `pattern` matches (e.g. `*/last.ckpt`), least
    recently modified first; none when `folder` is absent."""
    if isinstance(folder, Path):
        return sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime)
    found = _remote(folder, "list it", lambda fs: fs.glob(f"{folder.path}/{pattern}", detail=True))
    ordered = sorted(found.values(), key=lambda info: info["LastModified"])
    return [ObjectUrl(folder.protocol, info["name"], folder.storage) for info in ordered]


def reconsolidate(store: Where) -> None:
    """Consolidate `store`'s metadata again where it was consolidated before: readers that
    trust consolidated metadata would not see newly installed arrays or groups otherwise."""
    if open_group(store, mode="r").metadata.consolidated_metadata is not None:
        with warnings.catch_warnings():
            # The store chose consolidation already; zarr's "not in the v3 spec" note is noise.
            warnings.simplefilter("ignore", zarr.errors.ZarrUserWarning)
            zarr.consolidate_metadata(zarr_location(store, read_only=False))
