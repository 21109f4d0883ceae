"""Stage 1 under the stage contract (`pipelines.stage`): a slide becomes a slide store.

Per slide (`ingest_slide`):
  1. identity: the streamed sha256 of the source files (and page), the settings that shape a
     store, the store format; when the store at `<out_dir>/<name>.zarr` records the same, the
     slide is "skipped";
  2. the store is written into a hidden sibling `.<name>.zarr.tmp-<pid>-<random>`
     (`pipelines.ingest.writer`), its identity recorded on the root last;
  3. the finished store is put in place (`pipelines.storage.install`: a rename locally, a
     server-side copy published metadata last on object storage); a failed slide leaves
     nothing behind.
`ingest_archive` runs many slides, `parallel_slides` at a time, on one Dask cluster and reports
per slide, so one bad slide never stops the others. Stores live on a file system every worker
can reach, or under an object-storage prefix (`out_dir` an `s3://...` URL, reached with
`config.object_storage` unless it is an `ObjectUrl` carrying its own settings): the same
steps, chunk for chunk the same store, and nothing local is created for it. Slides may also
be objects (pipelines.location): TIFF and PNG are read where they are by range requests,
OpenSlide's formats from a local copy in the staging cache (`pipelines.staging.stage_dir_for`),
and the identity is that of the same bytes read locally.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from contextlib import nullcontext

from distributed import Client

from pipelines.cluster import dask_client
from pipelines.ingest.config import IngestConfig
from pipelines.ingest.writer import write_store
from pipelines.location import Where, is_file, parse_location
from pipelines.progress import RunProgress
from pipelines.runtime import Runtime
from pipelines.sources import (
    IngestError,
    SlideSource,
    expand_pages,
    file_checksums,
    name_clashes,
    source_checksum,
)
from pipelines.stage import Identity, StageOutput, StageResult, record_identity, run_archive
from pipelines.staging import readable, stage_dir_for
from pipelines.storage import (
    install,
    refuse_links,
    remove_stale_siblings,
    remove_tree,
    temporary_sibling,
    tree_bytes,
    writable_folder,
)
from segcore.store import STORE_FORMAT, open_group

#: A slide store's identity is recorded on its root group.
SLIDE_STORE = StageOutput("")


class IngestResult(StageResult):
    """What happened to one slide."""

    source: SlideSource
    shape: tuple[int, int, int] | None = None
    checksum: str | None = None
    mb_written: float = 0.0


def store_identity(checksum: str, config: IngestConfig) -> Identity:
    """What a store is made from: the source's content and the settings that shape it."""
    return Identity(
        stage="ingest",
        format=STORE_FORMAT,
        inputs={"checksum": checksum},
        settings=config.settings(),
    )


def _named(message: str, source: SlideSource) -> str:
    """`message` led by the file it is about (ReaderErrors name theirs already)."""
    named = [str(p) for p in (source.image, source.labels) if p is not None]
    return message if message.startswith(tuple(named)) else f"{source.image}: {message}"


def ingest_slide(
    source: SlideSource,
    out_dir: str | Where,
    config: IngestConfig | None = None,
    client: Client | None = None,
) -> IngestResult:
    """Ingest one slide into `<out_dir>/<name>.zarr` ("skipped" when current); `out_dir` is a
    local folder or an object-storage prefix. Region work runs on `client`, or on local threads
    without one. Bad input raises `IngestError`."""
    config = config or IngestConfig()
    started = time.perf_counter()
    out_dir = parse_location(out_dir, config.object_storage)
    final = out_dir / f"{source.name}.zarr"
    writable_folder(out_dir)
    remove_stale_siblings(final)
    for path in (source.image, source.labels):
        if path is not None and not is_file(path):
            raise IngestError(f"{path}: no such file")
    # OpenSlide's formats on object storage are read from a local copy, anything else where
    # it is; the checksum reads the same bytes, so a staged slide is downloaded once.
    with readable(source.image, stage_dir_for(out_dir)) as image:
        files = file_checksums(source, image)
        checksum = source_checksum(files, source)
        identity = store_identity(checksum, config)
        result = IngestResult(
            source=source, store=final, status="skipped", checksum=checksum, identity=identity.key
        )
        if not config.overwrite and SLIDE_STORE.is_current(final, identity):
            result.shape = tuple(open_group(final, mode="r").attrs["segflow"]["shape"])
            result.seconds = time.perf_counter() - started
            return result
        refuse_links(final)
        tmp = temporary_sibling(final)
        try:
            metadata = write_store(tmp, source, files, checksum, config, client, image)
            record_identity(open_group(tmp, mode="r+"), identity, metadata)
            result.mb_written = tree_bytes(tmp) / 1e6
            install(tmp, final)
        except IngestError:
            raise
        except ValueError as exc:  # ReaderError and friends
            raise IngestError(_named(str(exc), source)) from exc
        finally:
            remove_tree(tmp)
    result.status = "written"
    result.shape = tuple(metadata["shape"])
    result.seconds = time.perf_counter() - started
    return result


def _failed(source: SlideSource, out_dir: Where, error: str, seconds: float) -> IngestResult:
    store = out_dir / f"{source.name}.zarr"
    return IngestResult(source=source, store=store, status="failed", error=error, seconds=seconds)


def ingest_archive(
    sources: Iterable[SlideSource],
    out_dir: str | Where,
    config: IngestConfig | None = None,
    client: Client | None = None,
    progress: bool = False,
    runtime: Runtime | None = None,
) -> list[IngestResult]:
    """Ingest many slides (stacks expanded into pages), `config.parallel_slides` at a time on
    one Dask cluster (`client`, or one started from `config.cluster`, on `runtime`'s scheduler
    when it names one); one result per slide, a bad slide "failed" with its one-line error."""
    config = config or IngestConfig()
    if runtime is not None:
        config = runtime.configure(config)
    out_dir = parse_location(out_dir, config.object_storage)
    expanded: list[SlideSource | IngestResult] = []
    for source in sources:
        try:
            expanded.extend(expand_pages(source))
        except IngestError as exc:
            expanded.append(_failed(source, out_dir, str(exc), 0.0))
    if not expanded:
        raise IngestError("no slides given: name at least one slide")
    slides = [i for i, item in enumerate(expanded) if isinstance(item, SlideSource)]
    for position, error in name_clashes([expanded[i] for i in slides]).items():
        expanded[slides[position]] = _failed(expanded[slides[position]], out_dir, error, 0.0)
    todo = [item for item in expanded if isinstance(item, SlideSource)]
    with nullcontext(client) if client is not None else dask_client(config.cluster) as cluster:

        def one(source: SlideSource, bars: RunProgress) -> IngestResult:
            return ingest_slide(source, out_dir, config, cluster)

        ran = iter(
            run_archive(
                todo,
                one,
                lambda source, error, seconds: _failed(source, out_dir, error, seconds),
                subject=lambda source: source.image,
                parallel=config.parallel_slides,
                progress=progress,
            )
        )
    return [next(ran) if isinstance(item, SlideSource) else item for item in expanded]
