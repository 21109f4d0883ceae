"""Writing one slide store: a slide (and its label image) copied into OME-Zarr, region by region.

`write_store` fills a fresh folder or object-storage prefix in the layout of `segcore.store`:
level 0 region by region (tasks that open the reader themselves, so nothing unpicklable
travels and memory per task is one region), each pyramid level from the level above, the
annotations (a binary mask's connected components become instances) with their own pyramid,
the tissue mask from a coarse level, and the descriptive metadata last. Whether to write,
where, and the install belong to the stage (`pipelines.ingest.stage`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import zarr
from distributed import Client

from pipelines.cluster import default_in_flight, map_bounded
from pipelines.components import label_foreground
from pipelines.ingest.config import IngestConfig
from pipelines.location import Where, file_size, open_binary
from pipelines.sources import IngestError, SlideSource, source_files
from segcore import ngff
from segcore.readers import ReaderError, SlideReader, open_labels, open_slide
from segcore.store import ANNOTATIONS, STORE_FORMAT, TISSUE, chunk_manifest, zarr_location
from segcore.tissue import EmptySlideError, tissue_downsample, tissue_mask

_IMAGE_DTYPES = ("uint8", "uint16")
_UINT32_MAX = int(np.iinfo(np.uint32).max)


# --- region tasks (run on Dask workers; they open their own readers) ----------------------


@contextmanager
def _opened(
    image: Where, page: int | None, cache_bytes: int | None = None
) -> Iterator[SlideReader]:
    """A reader of the slide (`cache_bytes` given) or label image at `image`: a local file, or
    an object read by range requests through an open fsspec file."""
    if isinstance(image, Path):
        reader = (
            open_labels(image, page)
            if cache_bytes is None
            else open_slide(image, page, cache_bytes)
        )
        with reader:
            yield reader
        return
    with open_binary(image) as fh:
        if cache_bytes is None:
            reader = open_labels(str(image), page, fh)
        else:
            reader = open_slide(str(image), page, cache_bytes, fh)
        with reader:
            yield reader


def _write_image_region(
    path: Where, page: int | None, cache_bytes: int, dst: zarr.Array, region: ngff.Region
) -> tuple[int, int]:
    """Copy the slide's pixels into `dst`; returns the region's smallest and largest value."""
    ys, xs = region
    with _opened(path, page, cache_bytes) as reader:
        block = reader.read_region(ys.start, xs.start, ys.stop - ys.start, xs.stop - xs.start)
    dst[:, ys, xs] = block
    return int(block.min()), int(block.max())


def _write_label_region(
    path: Where, page: int | None, dst: zarr.Array, region: ngff.Region
) -> tuple[int, int]:
    """Copy label ids into `dst`; returns the region's largest and smallest non-zero id."""
    ys, xs = region
    with _opened(path, page) as reader:
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
    """fn(*args) for every args tuple, results in call order (on the cluster, else on local
    threads); every call has ended when this returns or raises."""
    results: list = [None] * len(calls)
    jobs = ((index, args) for index, args in enumerate(calls))
    for index, value in map_bounded(client, fn, jobs, default_in_flight(client)):
        results[index] = value
    return results


def _build_pyramid(
    levels: list[zarr.Array], method: ngff.Method, region_size: int, client: Client | None
) -> None:
    """Fill levels 1.. from level 0, one level after another (a region of `region_size` px
    of level k+1 reads twice that of level k)."""
    for src, dst in zip(levels, levels[1:], strict=False):
        calls = [(src, dst, r, method) for r in ngff.level_regions(dst.shape, region_size)]
        _run(client, ngff.downsample_region, calls)


# --- one slide ----------------------------------------------------------------------------


def _region_size(lazy: bool, shape: Sequence[int], config: IngestConfig) -> int:
    """Level-0 px per read task; Pillow decodes a whole PNG/JPEG anyway, so one task reads it
    once rather than once per region."""
    return config.chunk_size * config.region_chunks if lazy else max(shape[-2:])


def _probe(
    source: SlideSource, image: Where, config: IngestConfig
) -> tuple[tuple[int, int, int], np.dtype, float | None, int, int]:
    """Shape, dtype, mpp and the read region sizes of the slide and its labels; checks the
    label image against the slide; `image` is where the slide's pixels are read."""
    with _opened(image, source.page, config.openslide_cache_mb << 20) as reader:
        shape, dtype, mpp = reader.shape, reader.dtype, reader.mpp
        image_region = _region_size(reader.lazy, shape, config)
    label_region = image_region
    if shape[1] == 0 or shape[2] == 0:
        raise IngestError(f"{source.image}: empty slide ({shape[1]} x {shape[2]} px)")
    if dtype.name not in _IMAGE_DTYPES:
        raise IngestError(f"{source.image}: unsupported pixel type {dtype} (uint8 or uint16)")
    if source.labels is not None:
        with _opened(source.labels, source.page) as labels:
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
        n_instances = label_foreground(levels[0], levels[0], client).n_components
    _build_pyramid(levels, "nearest", config.chunk_size, client)
    return {
        "kind": "binary" if binary else "instances",
        "source_max": high,
        "n_instances": n_instances,
    }


def _write_tissue(
    root: zarr.Group, levels: list[zarr.Array], mpp: float | None, config: IngestConfig
) -> tuple[int, float]:
    """labels/tissue: level 0 the mask at 1/tissue_downsample of image level 0, then as many
    levels as the image has (`ngff.create_label`); returns (downsample, fraction)."""
    downsample = tissue_downsample(levels[0].shape, config.tissue.max_size)
    k = min(downsample.bit_length() - 1, len(levels) - 1)
    factor = downsample >> k
    source = levels[k]
    if factor > 1:
        coarse = np.round(ngff.downsample_array(source, factor)).astype(source.dtype)
    else:
        coarse = source[...]
    mask = tissue_mask(coarse, config.tissue)
    arrays = ngff.create_label(
        root,
        TISSUE,
        mask.shape,
        np.uint8,
        len(levels),
        chunk_size=max(mask.shape),
        compression=config.compression,
        mpp=mpp,
        downsample=downsample,
        colors=[{"label-value": 1, "rgba": [0, 200, 0, 96]}],
        properties=[{"label-value": 1, "class": "tissue"}],
    )
    level = mask.astype(np.uint8)
    for array in arrays:
        if array.shape != level.shape:
            level = ngff.downsample2(level, "nearest")
        array[...] = level
    return downsample, float(mask.mean())


def write_store(
    folder: Where,
    source: SlideSource,
    files: dict[str, str],
    checksum: str,
    config: IngestConfig,
    client: Client | None,
    image: Where | None = None,
) -> dict:
    """Write the store of `source` into the new `folder`; returns its descriptive metadata
    (the caller records it on the root with the stage's identity). The slide's pixels are
    read from `image` (a staged local copy; default `source.image`). Bad input raises
    IngestError (or a ReaderError naming the file)."""
    image = source.image if image is None else image
    shape, dtype, mpp, image_region, label_region = _probe(source, image, config)
    root = zarr.open_group(zarr_location(folder, read_only=False), mode="w", zarr_format=3)
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
    calls = [(image, source.page, cache, levels[0], r) for r in regions]
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
    image_bytes = sum(file_size(p) for p in source_files(source.image))
    return {
        "store_format": STORE_FORMAT,
        "source": str(source.image),
        "source_bytes": image_bytes,
        "labels_source": str(source.labels) if source.labels else None,
        "labels_bytes": file_size(source.labels) if source.labels else None,
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
    }
