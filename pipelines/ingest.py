"""Stage 1, ingestion: slides and their label images become OME-Zarr slide stores.

Per slide (`ingest_slide`), in the layout of `segcore.store`:
  1. checksum the source files (streamed sha256); when the store already holds the same
     checksum and settings, skip it;
  2. write everything into a hidden sibling `.<name>.zarr.tmp-<pid>-<random>`: level 0 region by
     region (Dask tasks that open the reader themselves, so nothing unpicklable travels and
     memory per task is one region), then each pyramid level from the level above, the
     annotations (a binary mask's connected components become instances) with their own
     pyramid, the tissue mask from a coarse level, and the metadata last;
  3. rename the finished store into place (`pipelines.storage.install`); a failed slide
     leaves nothing behind.
`ingest_archive` runs many slides at once on one Dask cluster and reports per slide, so one
bad slide never stops the others. Stores must live on a file system every worker can reach.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import dask
import numpy as np
import zarr
from distributed import Client, wait
from pydantic import BaseModel, ConfigDict, Field

from pipelines.cluster import ClusterConfig, dask_client
from pipelines.components import label_foreground
from pipelines.config import output_settings
from pipelines.sources import (
    IngestError,
    SlideSource,
    expand_pages,
    file_checksums,
    name_clashes,
    source_checksum,
)
from pipelines.storage import (
    install,
    refuse_links,
    remove_stale_siblings,
    temporary_sibling,
    writable_folder,
)
from segcore import ngff
from segcore.readers import ReaderError, open_labels, open_slide
from segcore.store import ANNOTATIONS, METADATA_KEY, STORE_FORMAT, TISSUE, chunk_manifest
from segcore.tissue import EmptySlideError, TissueConfig, tissue_downsample, tissue_mask

_IMAGE_DTYPES = ("uint8", "uint16")
_UINT32_MAX = int(np.iinfo(np.uint32).max)


class IngestConfig(BaseModel):
    """Ingestion settings. Everything but `cluster`, `parallel_slides` and `overwrite` shapes
    the store, and a change re-ingests slides that were ingested with other settings."""

    model_config = ConfigDict(extra="forbid")

    chunk_size: int = Field(default=1024, ge=16)
    #: Level-0 pixels read per Dask task, in chunks per side (2: 2048 x 2048 px regions).
    region_chunks: int = Field(default=2, ge=1)
    compression: ngff.Compression = ngff.Compression()
    #: Pyramid levels halve the slide until its shorter side is at most this many px.
    min_level_size: int = Field(default=1024, ge=1)
    tissue: TissueConfig = TissueConfig()
    #: "auto": a label image with a single non-zero value is a binary mask whose connected
    #: components become instances; any other is an instance label image.
    labels_kind: Literal["auto", "binary", "instances"] = "auto"
    openslide_cache_mb: int = Field(default=8, ge=0)
    parallel_slides: int = Field(default=2, ge=1)
    cluster: ClusterConfig = ClusterConfig()
    overwrite: bool = False

    def settings(self) -> dict:
        """The settings that shape a store, as stored in its metadata."""
        return output_settings(self)


class IngestResult(BaseModel):
    """What happened to one slide."""

    source: SlideSource
    store: Path
    status: Literal["written", "skipped", "failed"]
    error: str | None = None
    seconds: float = 0.0
    shape: tuple[int, int, int] | None = None
    checksum: str | None = None
    mb_written: float = 0.0


# --- region tasks (run on Dask workers; they open their own readers) ----------------------


def _write_image_region(
    path: Path, page: int | None, cache_bytes: int, dst: zarr.Array, region: ngff.Region
) -> tuple[int, int]:
    """Copy the slide's pixels into `dst`; returns the region's smallest and largest value."""
    ys, xs = region
    with open_slide(path, page, cache_bytes) as reader:
        block = reader.read_region(ys.start, xs.start, ys.stop - ys.start, xs.stop - xs.start)
    dst[:, ys, xs] = block
    return int(block.min()), int(block.max())


def _write_label_region(
    path: Path, page: int | None, dst: zarr.Array, region: ngff.Region
) -> tuple[int, int]:
    """Copy label ids into `dst`; returns the region's largest and smallest non-zero id."""
    ys, xs = region
    with open_labels(path, page) as reader:
        block = reader.read_region(ys.start, xs.start, ys.stop - ys.start, xs.stop - xs.start)[0]
    low, high = int(block.min()), int(block.max())
    if low < 0:
        raise ReaderError(
            f"{path}: negative label {low} at rows {ys.start}..{ys.stop}, columns "
            f"{xs.start}..{xs.stop}; label images must hold non-negative integer ids"
        )
    if high > _UINT32_MAX:
        raise ReaderError(f"{path}: label id {high} does not fit in uint32")
    nonzero = block[block != 0]
    dst[ys, xs] = block.astype(np.uint32)
    return high, int(nonzero.min()) if nonzero.size else 0


def _run(client: Client | None, fn: Callable, calls: Sequence[tuple]) -> list:
    """fn(*args) for every args tuple: on the cluster, or on local threads without one.

    Every call has ended when this returns or raises: a failed slide's temporary store is
    removed after its last write, not while other regions still write chunks into it.
    """
    if client is not None:
        futures = client.compute([dask.delayed(fn, pure=False)(*args) for args in calls])
        wait(futures)
        return client.gather(futures)
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        futures = [pool.submit(fn, *args) for args in calls]
    return [future.result() for future in futures]


def _build_pyramid(
    levels: list[zarr.Array], method: ngff.Method, region_size: int, client: Client | None
) -> None:
    """Fill levels 1.. from level 0, one level after another (a region of `region_size` px
    of level k+1 reads twice that of level k)."""
    for src, dst in zip(levels, levels[1:], strict=False):
        calls = [(src, dst, r, method) for r in ngff.level_regions(dst.shape, region_size)]
        _run(client, ngff.downsample_region, calls)


# --- one slide ----------------------------------------------------------------------------


def _existing_metadata(store: Path) -> dict | None:
    """The metadata of an earlier ingest at `store`; None when there is none to trust."""
    if not store.exists():
        return None
    try:
        return dict(zarr.open_group(store, mode="r").attrs.get(METADATA_KEY, {})) or None
    except Exception:  # an unreadable old store is simply rewritten (and replaced atomically)
        return None


def _region_size(lazy: bool, shape: Sequence[int], config: IngestConfig) -> int:
    """Level-0 px per read task; Pillow decodes a whole PNG/JPEG anyway, so one task reads it
    once rather than once per region."""
    return config.chunk_size * config.region_chunks if lazy else max(shape[-2:])


def _probe(
    source: SlideSource, config: IngestConfig
) -> tuple[tuple[int, int, int], np.dtype, float | None, int, int]:
    """Shape, dtype, mpp and the read region sizes of the slide and its labels; checks the
    label image against the slide."""
    with open_slide(source.image, source.page) as reader:
        shape, dtype, mpp = reader.shape, reader.dtype, reader.mpp
        image_region = _region_size(reader.lazy, shape, config)
    label_region = image_region
    if shape[1] == 0 or shape[2] == 0:
        raise IngestError(f"{source.image}: empty slide ({shape[1]} x {shape[2]} px)")
    if dtype.name not in _IMAGE_DTYPES:
        raise IngestError(f"{source.image}: unsupported pixel type {dtype} (uint8 or uint16)")
    if source.labels is not None:
        with open_labels(source.labels, source.page) as labels:
            if labels.shape[1:] != shape[1:]:
                raise IngestError(
                    f"{source.labels}: label image is {labels.shape[1]} x {labels.shape[2]} px "
                    f"but the slide {source.image} is {shape[1]} x {shape[2]} px"
                )
            label_region = _region_size(labels.lazy, shape, config)
    return shape, dtype, mpp, image_region, label_region


def _write_labels(
    root: zarr.Group,
    source: SlideSource,
    shape: tuple[int, int],
    n_levels: int,
    mpp: float | None,
    region_size: int,
    config: IngestConfig,
    client: Client | None,
) -> dict:
    """labels/annotations with its pyramid; returns the label metadata."""
    levels = ngff.create_label(
        root,
        ANNOTATIONS,
        shape,
        np.uint32,
        n_levels,
        chunk_size=config.chunk_size,
        compression=config.compression,
        mpp=mpp,
    )
    regions = ngff.level_regions(shape, region_size)
    calls = [(source.labels, source.page, levels[0], r) for r in regions]
    stats = _run(client, _write_label_region, calls)
    high = max(s[0] for s in stats)
    nonzero = [s[1] for s in stats if s[1]]
    single_value = bool(nonzero) and min(nonzero) == high
    binary = config.labels_kind == "binary" or (config.labels_kind == "auto" and single_value)
    n_instances = None
    if binary:
        # Components are labelled in place: each final task reads and rewrites only its chunk.
        n_instances = label_foreground(levels[0], levels[0], client)
    _build_pyramid(levels, "nearest", config.chunk_size, client)
    return {
        "kind": "binary" if binary else "instances",
        "source_max": high,
        "n_instances": n_instances,
    }


def _write_tissue(
    root: zarr.Group, levels: list[zarr.Array], mpp: float | None, config: IngestConfig
) -> tuple[int, float]:
    """labels/tissue at 1/tissue_downsample of level 0; returns (downsample, fraction)."""
    downsample = tissue_downsample(levels[0].shape, config.tissue.max_size)
    k = min(downsample.bit_length() - 1, len(levels) - 1)
    factor = downsample >> k
    source = levels[k]
    if factor > 1:
        coarse = np.round(ngff.downsample_array(source, factor)).astype(source.dtype)
    else:
        coarse = source[...]
    mask = tissue_mask(coarse, config.tissue)
    (array,) = ngff.create_label(
        root,
        TISSUE,
        mask.shape,
        np.uint8,
        1,
        chunk_size=max(mask.shape),
        compression=config.compression,
        mpp=mpp,
        downsample=downsample,
        colors=[{"label-value": 1, "rgba": [0, 200, 0, 96]}],
        properties=[{"label-value": 1, "class": "tissue"}],
    )
    array[...] = mask.astype(np.uint8)
    return downsample, float(mask.mean())


def _segflow_version() -> str:
    try:
        return importlib.metadata.version("segflow")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _write_store(
    tmp: Path,
    source: SlideSource,
    files: dict[str, str],
    checksum: str,
    config: IngestConfig,
    client: Client | None,
) -> tuple[int, int, int]:
    shape, dtype, mpp, image_region, label_region = _probe(source, config)
    root = zarr.open_group(tmp, mode="w", zarr_format=3)
    levels = ngff.create_image(
        root,
        shape,
        dtype,
        chunk_size=config.chunk_size,
        min_level_size=config.min_level_size,
        compression=config.compression,
        mpp=mpp,
    )
    cache = config.openslide_cache_mb << 20
    regions = ngff.level_regions(shape, image_region)
    calls = [(source.image, source.page, cache, levels[0], r) for r in regions]
    value_ranges = _run(client, _write_image_region, calls)
    _build_pyramid(levels, "mean", config.chunk_size, client)
    labels = None
    if source.labels is not None:
        labels = _write_labels(
            root, source, shape[1:], len(levels), mpp, label_region, config, client
        )
    try:
        downsample, fraction = _write_tissue(root, levels, mpp, config)
    except EmptySlideError as exc:
        raise IngestError(f"{source.image}: {exc}") from exc
    image_bytes = sum(Path(p).stat().st_size for p in files if p != str(source.labels))
    root.attrs[METADATA_KEY] = {
        "store_format": STORE_FORMAT,
        "source": str(source.image),
        "source_bytes": image_bytes,
        "labels_source": str(source.labels) if source.labels else None,
        "labels_bytes": source.labels.stat().st_size if source.labels else None,
        "page": source.page,
        "checksum": checksum,
        "file_checksums": files,
        "shape": list(shape),
        "dtype": dtype.name,
        # What the pixels span, so a 16-bit slide's real scale (often 12 bits) is known.
        "value_range": [min(r[0] for r in value_ranges), max(r[1] for r in value_ranges)],
        "mpp": mpp,
        "n_levels": len(levels),
        "labels": labels,
        "tissue_downsample": downsample,
        "tissue_fraction": fraction,
        "arrays": chunk_manifest(root),
        "settings": config.settings(),
        "segflow_version": _segflow_version(),
        "ingested_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return shape


def _size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def ingest_slide(
    source: SlideSource,
    out_dir: str | Path,
    config: IngestConfig | None = None,
    client: Client | None = None,
) -> IngestResult:
    """Ingest one slide into `<out_dir>/<name>.zarr` (skipped when unchanged); region work runs
    on `client`, or on local threads without one. Bad input raises `IngestError`."""
    config = config or IngestConfig()
    started = time.perf_counter()
    out_dir = Path(out_dir)
    final = out_dir / f"{source.name}.zarr"
    writable_folder(out_dir)
    remove_stale_siblings(final)
    for path in (source.image, source.labels):
        if path is not None and not path.exists():
            raise IngestError(f"{path}: no such file")
    files = file_checksums(source)
    checksum = source_checksum(files, source)
    existing = _existing_metadata(final)
    if (
        not config.overwrite
        and existing is not None
        and existing.get("checksum") == checksum
        and existing.get("settings") == config.settings()
        # An older store format is not current: rewriting it is the upgrade.
        and existing.get("store_format") == STORE_FORMAT
    ):
        return IngestResult(
            source=source,
            store=final,
            status="skipped",
            seconds=time.perf_counter() - started,
            shape=tuple(existing["shape"]),
            checksum=checksum,
        )
    refuse_links(final)
    tmp = temporary_sibling(final)
    try:
        shape = _write_store(tmp, source, files, checksum, config, client)
        mb = _size_mb(tmp)
        install(tmp, final)
    except IngestError:
        raise
    except ValueError as exc:  # ReaderError and friends already name their file
        message = str(exc)
        if not message.startswith(str(source.image)) and not (
            source.labels and message.startswith(str(source.labels))
        ):
            message = f"{source.image}: {message}"
        raise IngestError(message) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return IngestResult(
        source=source,
        store=final,
        status="written",
        seconds=time.perf_counter() - started,
        shape=shape,
        checksum=checksum,
        mb_written=mb,
    )


def _failed(source: SlideSource, store: Path, error: str, started: float) -> IngestResult:
    return IngestResult(
        source=source,
        store=store,
        status="failed",
        error=error.splitlines()[0] if error else "failed",
        seconds=time.perf_counter() - started,
    )


def _ingest_or_fail(
    source: SlideSource, out_dir: Path, config: IngestConfig, client: Client | None
) -> IngestResult:
    started = time.perf_counter()
    try:
        return ingest_slide(source, out_dir, config, client)
    except IngestError as exc:
        return _failed(source, out_dir / f"{source.name}.zarr", str(exc), started)
    except Exception as exc:  # one slide's unexpected failure must not end the archive run
        message = f"{source.image}: {type(exc).__name__}: {exc}"
        return _failed(source, out_dir / f"{source.name}.zarr", message, started)


def ingest_archive(
    sources: Iterable[SlideSource],
    out_dir: str | Path,
    config: IngestConfig | None = None,
    client: Client | None = None,
) -> list[IngestResult]:
    """Ingest many slides (stacks expanded into pages), `config.parallel_slides` at a time on
    one Dask cluster (`client`, or one started from `config.cluster`); one result per slide."""
    config = config or IngestConfig()
    out_dir = Path(out_dir)
    started = time.perf_counter()
    expanded: list[SlideSource | IngestResult] = []
    for source in sources:
        try:
            expanded.extend(expand_pages(source))
        except IngestError as exc:
            expanded.append(_failed(source, out_dir / f"{source.name}.zarr", str(exc), started))
    if not expanded:
        raise IngestError("no slides given: name at least one slide")
    slides = [i for i, item in enumerate(expanded) if isinstance(item, SlideSource)]
    for position, error in name_clashes([expanded[i] for i in slides]).items():
        item = expanded[slides[position]]
        expanded[slides[position]] = _failed(item, out_dir / f"{item.name}.zarr", error, started)
    todo = [i for i, item in enumerate(expanded) if isinstance(item, SlideSource)]
    with (
        nullcontext(client) if client is not None else dask_client(config.cluster) as cluster,
        ThreadPoolExecutor(max_workers=config.parallel_slides) as pool,
    ):
        run = pool.map(lambda i: _ingest_or_fail(expanded[i], out_dir, config, cluster), todo)
        for i, result in zip(todo, list(run), strict=True):
            expanded[i] = result
    return expanded
