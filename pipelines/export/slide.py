"""Export one store's instances: a QuPath GeoJSON FeatureCollection and a measurement table,
chunk by chunk in bounded memory.

Pass 1, one task per chunk of `labels/instances`: every object inside the chunk is finished
there (measurements, perimeter and outline from the chunk alone) and written out as soon as
the task returns; an object touching a face shared with a neighbour chunk returns only its sums
rows (`measure.chunk_sums`). Pass 2: the rows of each crossing object are combined
(`measure.combine`), and the object is finished by the chunk holding its bounding box's top-left
corner, one task per such chunk reading the window that covers its objects' boxes. Every object
comes out once and whole; memory holds the chunks in flight and the sums rows of the objects
that cross chunk faces (their number follows the faces' length, not the slide's area).

Instances are expected connected (inference labels connected components): an object that does
not touch its chunk's faces is taken to lie wholly inside it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import zarr
from distributed import Client
from scipy import ndimage

from pipelines.cluster import default_in_flight, map_bounded, scheduler_kept
from pipelines.components import chunk_regions
from pipelines.export.measure import SUMS, chunk_sums, combine, measurements, perimeter
from pipelines.export.outline import rings, shoelace
from pipelines.export.source import ExportSource
from pipelines.export.writers import TABLE_SUFFIX, GeoJsonWriter, TableWriter
from pipelines.stage import segflow_version
from segcore.store import read_checked

Format = Literal["geojson", "table"]
FORMATS: tuple[Format, ...] = ("geojson", "table")
#: How QuPath shows the objects: its "Nucleus" class, in its usual red.
CLASSIFICATION = {"name": "Nucleus", "color": [200, 0, 0]}

Region = tuple[slice, slice]
Mask = tuple[np.ndarray, tuple[int, int]]  # an object's mask in its box, the box's (y, x)


@dataclass(frozen=True)
class _Context:
    """What every task needs (small, picklable: Zarr arrays pickle as their location)."""

    instances: zarr.Array
    image: zarr.Array
    mpp: float | None
    namespace: uuid.UUID
    geojson: bool


@dataclass
class _Batch:
    columns: dict[str, np.ndarray]
    features: list[str]
    #: Sums rows of objects that touch a face shared with another chunk (pass 1).
    crossing: np.ndarray = field(default_factory=lambda: np.zeros((0, len(SUMS)), np.int64))


@dataclass(frozen=True)
class ExportResult:
    """What `export_store` wrote for one store."""

    store: Path
    n_objects: int
    #: Objects that touched a chunk face and were finished from their whole window.
    n_crossing: int
    files: list[Path]
    seconds: float


def object_id(namespace: uuid.UUID, label: int) -> str:
    """The Feature id of instance `label`: the same for every export of one segmentation."""
    return str(uuid.uuid5(namespace, str(int(label))))


def _geometry(mask: np.ndarray, origin: tuple[int, int]) -> dict:
    """The object's outline along pixel edges in level-0 (x, y) coordinates, with its holes;
    a MultiPolygon of outlines (no holes) for the rare label made of separate pieces."""
    found = rings(mask, origin)
    outlines = [r for r in found if shoelace(r) > 0]
    if len(outlines) == 1:
        holes = [r for r in found if shoelace(r) < 0]
        return {"type": "Polygon", "coordinates": [outlines[0], *holes]}
    return {"type": "MultiPolygon", "coordinates": [[r] for r in outlines]}


def _feature(label: int, mask: Mask, values: dict, namespace: uuid.UUID) -> str:
    return json.dumps(
        {
            "type": "Feature",
            "id": object_id(namespace, label),
            "geometry": _geometry(*mask),
            "properties": {
                "objectType": "detection",
                "classification": CLASSIFICATION,
                "label_id": label,
                "measurements": values,
            },
        },
        separators=(",", ":"),
    )


def _finish(rows: np.ndarray, masks: list[Mask], context: _Context) -> _Batch:
    """Table rows and Features of complete objects from their sums rows and whole masks."""
    perimeters = np.array([perimeter(mask) for mask, _ in masks], dtype=np.float64)
    columns = measurements(rows, perimeters, context.mpp)
    features = []
    if context.geojson:
        names = [name for name in columns if name != "id"]
        values = zip(*(columns[name].tolist() for name in names), strict=True)
        for label, mask, row in zip(columns["id"].tolist(), masks, values, strict=True):
            measured = dict(zip(names, row, strict=True))
            features.append(_feature(label, mask, measured, context.namespace))
    return _Batch(columns, features)


def _crossing(compact: np.ndarray, n: int, region: Region, shape: tuple[int, int]) -> np.ndarray:
    """Which of objects 1..n of a chunk touch a face it shares with another chunk."""
    lines = [np.zeros(0, compact.dtype)]
    if region[0].start > 0:
        lines.append(compact[0])
    if region[0].stop < shape[0]:
        lines.append(compact[-1])
    if region[1].start > 0:
        lines.append(compact[:, 0])
    if region[1].stop < shape[1]:
        lines.append(compact[:, -1])
    touching = np.zeros(n + 1, bool)
    touching[np.concatenate(lines)] = True
    return touching[1:]


def _chunk_objects(context: _Context, region: Region) -> _Batch:
    """Pass 1 task: finish the objects inside one chunk, return sums of those crossing it."""
    labels = read_checked(context.instances, region)
    ids = np.unique(labels)
    compact = np.searchsorted(ids, labels).astype(np.int32)
    if ids[0] == 0:
        ids = ids[1:]
    else:
        compact += 1  # no background in this chunk: objects start at 1 all the same
    slices = ndimage.find_objects(compact)
    pixels = read_checked(context.image, (slice(None), *region))
    y0, x0 = region[0].start, region[1].start
    rows = chunk_sums(compact, slices, pixels, (y0, x0))
    rows[:, 0] = ids
    crossing = _crossing(compact, len(ids), region, context.instances.shape)
    masks = [
        (compact[slices[k]] == k + 1, (y0 + slices[k][0].start, x0 + slices[k][1].start))
        for k in np.flatnonzero(~crossing)
    ]
    batch = _finish(rows[~crossing], masks, context)
    batch.crossing = rows[crossing]
    return batch


def _window_objects(context: _Context, rows: np.ndarray) -> _Batch:
    """Pass 2 task: finish crossing objects (combined sums rows) from one window over their
    boxes, read whole."""
    y0, x0 = int(rows[:, 7].min()), int(rows[:, 8].min())
    window = (slice(y0, int(rows[:, 9].max())), slice(x0, int(rows[:, 10].max())))
    labels = read_checked(context.instances, window)
    masks = [
        (labels[top - y0 : bottom - y0, left - x0 : right - x0] == label, (top, left))
        for label, top, left, bottom, right in rows[:, [0, 7, 8, 9, 10]].tolist()
    ]
    return _finish(rows, masks, context)


def _by_owner(rows: np.ndarray, chunks: Sequence[int]) -> list[tuple[tuple[int, int], np.ndarray]]:
    """Combined rows grouped by the chunk holding their box's top-left corner, raster order."""
    owners = np.stack([rows[:, 7] // chunks[0], rows[:, 8] // chunks[1]], axis=1)
    keys, inverse = np.unique(owners, axis=0, return_inverse=True)
    order = np.argsort(inverse.ravel(), kind="stable")
    bounds = np.searchsorted(inverse.ravel()[order], np.arange(len(keys) + 1))
    return [
        ((int(i), int(j)), rows[order[bounds[k] : bounds[k + 1]]])
        for k, (i, j) in enumerate(keys.tolist())
    ]


def export_paths(
    store: str | Path, formats: Sequence[Format], out_dir: Path | None = None
) -> list[Path]:
    """Where `export_store` writes the `formats` of `store` (default: beside the store)."""
    store = Path(store)
    out = out_dir if out_dir is not None else store.parent
    name = store.name.removesuffix(".zarr")
    suffix = {"geojson": ".geojson", "table": TABLE_SUFFIX}
    return [out / f"{name}{suffix[f]}" for f in formats]


def export_store(
    store: str | Path,
    out_dir: str | Path | None = None,
    formats: Sequence[Format] = FORMATS,
    client: Client | None = None,
    max_in_flight: int | None = None,
) -> ExportResult:
    """Write `<out_dir>/<name>.geojson` and/or `<name>.parquet` (`.csv` without pyarrow) for the
    instances of `store` (default `out_dir`: the store's folder); on a Dask `client`, else on
    local threads, at most `max_in_flight` chunks at a time."""
    start = time.perf_counter()
    source = ExportSource.open(store)
    out = Path(out_dir) if out_dir is not None else source.path.parent
    out.mkdir(parents=True, exist_ok=True)
    paths = dict(zip(formats, export_paths(source.path, formats, out), strict=True))
    provenance = source.provenance(segflow_version())
    context = _Context(
        source.instances, source.image, source.mpp, source.namespace, "geojson" in formats
    )
    in_flight = max_in_flight or default_in_flight(client)
    files: list[Path] = []
    n_objects = 0
    with ExitStack() as stack, scheduler_kept(client):
        geojson = table = None
        if "geojson" in formats:
            geojson = stack.enter_context(GeoJsonWriter(paths["geojson"], provenance))
            files.append(geojson.path)
        if "table" in formats:
            table = stack.enter_context(TableWriter(paths["table"], provenance))
            files.append(table.path)

        def emit(batch: _Batch) -> None:
            nonlocal n_objects
            n_objects += len(batch.columns["id"])
            if geojson is not None:
                geojson.write(batch.features)
            if table is not None:
                table.write(batch.columns)

        regions = chunk_regions(source.instances.shape, source.instances.chunks)
        crossing = []
        jobs = ((index, (context, region)) for index, region in regions.items())
        for _, batch in map_bounded(client, _chunk_objects, jobs, in_flight):
            emit(batch)
            if len(batch.crossing):
                crossing.append(batch.crossing)
        rows = combine(np.concatenate(crossing)) if crossing else None
        del crossing
        n_crossing = 0 if rows is None else len(rows)
        groups = [] if rows is None else _by_owner(rows, source.instances.chunks)
        jobs = ((owner, (context, group)) for owner, group in groups)
        for _, batch in map_bounded(client, _window_objects, jobs, in_flight):
            emit(batch)
    return ExportResult(source.path, n_objects, n_crossing, files, time.perf_counter() - start)
