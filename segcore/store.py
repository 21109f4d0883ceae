"""The on-disk layout of one ingested slide: an OME-Zarr (NGFF 0.5, Zarr v3) store.

    <slide>.zarr/
      zarr.json            group; attributes["ome"]["multiscales"] for the image pyramid,
                           attributes["segflow"] = ingest metadata (below)
      0, 1, 2, ...         image pyramid, axes (c, y, x), uint8 (uint16 for 16-bit sources),
                           level k downsampled by 2^k (2x2 mean, sizes rounded up) until the
                           shorter side is <= min_level_size
      labels/
        zarr.json          attributes["ome"]["labels"] = names of the label images below
        annotations/0..    instance ids (y, x) uint32, 0 = background (only when labelled)
        tissue/0..         tissue mask (y, x) uint8, level 0 at 1 / tissue_downsample of image
                           level 0 (what readers use); one level per image level, the mask's
                           grid repeated where the image is finer (segcore.ngff.label_factors)
        segmentation/0..   class map (y, x) uint8, written by inference
        instances/0..      instance ids (y, x) uint32, written by inference
      training/
        target             class map (y, x) uint8 for training, from annotations
        weight             loss weight map (y, x) float32 (w_c + border term)

Every label image carries its own "multiscales" metadata, with as many levels as the image,
and an "image-label" source link, so napari and ome-zarr readers show all levels and the store
is valid NGFF 0.5 (segcore.ngff writes both). Stores ingested before the tissue label had a
level per image level still read (readers use its level 0) but fail NGFF validators when the
image has several levels; ingesting them again with `overwrite=true` fixes that.

attributes["segflow"], written last by pipelines.ingest: store_format, source, source_bytes,
labels_source, labels_bytes, page, checksum (sha256 over the source files' sha256s,
`file_checksums`), shape, dtype (the source's pixel type, kept as is), value_range ([min, max]
of the source pixels), mpp (µm/px or None), n_levels, labels ({kind: "binary" | "instances",
source_max, n_instances} or None), tissue_downsample, tissue_fraction, arrays (the chunk
manifest: {array path: number of stored chunks}), settings (the ingest settings),
segflow_version, ingested_at.

Integrity (store_format 2): every array is written through `segcore.ngff.create_array`, so
every chunk of its grid is on disk and ends in a crc32c checksum. `verify_chunks` finds a
missing chunk before a stage reads, and `read_checked` / `CheckedArray` turn a chunk that fails
to decode into a `StoreError` naming the array and the chunk. Stores of format 1 (chunks equal
to the fill value were not written, no checksums) are refused: a missing chunk there cannot be
told from background. `pipelines.ingest` rewrites them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.core.sync import sync

from segcore.errors import one_line
from segcore.ngff import LABELS_GROUP

ANNOTATIONS = "annotations"
TISSUE = "tissue"
SEGMENTATION = "segmentation"
INSTANCES = "instances"
TRAINING_GROUP = "training"
TARGET = "target"
WEIGHT = "weight"
METADATA_KEY = "segflow"
#: Bumped when stores written before no longer meet what readers check (see above).
STORE_FORMAT = 2


class StoreError(ValueError):
    """A store is missing, incomplete or not a segflow slide store."""


@runtime_checkable
class RemoteLocation(Protocol):
    """A store somewhere other than a local folder (`pipelines.location.ObjectUrl` is one):
    named and joined like a path, opened through the Zarr store it hands out. segcore keeps
    to this protocol so that it needs no object-storage client."""

    @property
    def name(self) -> str: ...

    def __truediv__(self, name: str) -> RemoteLocation: ...

    def zarr_store(self, read_only: bool) -> Store: ...


#: Where a store is: a local folder or a remote location.
StoreLocation = Path | RemoteLocation
Mode = Literal["r", "r+", "a", "w", "w-"]


def zarr_location(where: StoreLocation, read_only: bool = True) -> Path | Store:
    """What `zarr.open_*` is given for `where`: the folder itself, or the remote's Zarr store."""
    if isinstance(where, RemoteLocation) and not isinstance(where, Path):
        return where.zarr_store(read_only)
    return Path(where)


def open_group(where: StoreLocation, mode: Mode = "r") -> zarr.Group:
    """`zarr.open_group` of a local folder or a remote location (every opening of a store in
    segflow goes through here, so a stage never asks which kind it was given)."""
    # Every store segflow writes is Zarr v3 (NGFF 0.5): naming the format spares the probes
    # for v2 documents, six requests per open on object storage.
    return zarr.open_group(zarr_location(where, read_only=mode == "r"), mode=mode, zarr_format=3)


def array_location(array: zarr.Array) -> str:
    """Where `array` lives, for messages: its directory for a local store, its URL for an
    fsspec one (`s3://bucket/a.zarr/0`)."""
    store = array.store_path.store
    root = getattr(store, "root", None)
    if root is not None:
        return str(Path(root) / array.path) if array.path else str(root)
    fs, path = getattr(store, "fs", None), getattr(store, "path", None)
    if fs is None or path is None:
        return str(array.store_path)
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    return f"{protocol}://{path}/{array.path}".rstrip("/")


def _stored_keys(directory: Path) -> set[str]:
    """Every file under `directory`, as a "/"-separated path relative to it."""
    keys = set()
    for folder, _, files in os.walk(directory):
        relative = Path(folder).relative_to(directory).as_posix()
        prefix = "" if relative == "." else f"{relative}/"
        keys.update(prefix + name for name in files)
    return keys


def chunk_keys(array: zarr.Array) -> list[str]:
    """The store keys of every chunk (shard, when sharded) of `array`'s grid, in raster order."""
    grid = array.metadata.chunk_grid
    return [array.metadata.encode_chunk_key(c) for c in grid.all_chunk_coords(array.shape)]


async def _listed(store: Store, prefix: str) -> set[str]:
    return {key.removeprefix(prefix) async for key in store.list_prefix(prefix)}


def verify_chunks(array: zarr.Array) -> None:
    """Raise `StoreError` naming the first chunk of `array` that is not stored.

    One directory walk for a local store, so a 10 000-chunk level costs milliseconds; one
    paginated listing (1000 keys a request on S3) for any other Zarr store.
    """
    store = array.store_path.store
    root = getattr(store, "root", None)
    if root is not None:
        stored = _stored_keys(Path(root) / array.path)
    else:
        stored = sync(_listed(store, f"{array.path}/" if array.path else ""))
    for key in chunk_keys(array):
        if key not in stored:
            raise StoreError(f"{array_location(array)}: chunk {key}: missing")


def _chunks_under(array: zarr.Array, selection: tuple[slice, ...]) -> list[tuple[int, ...]]:
    """Grid coordinates of the chunks that `selection` (slices, one per axis) touches."""
    ranges = []
    for sel, n, size in zip(selection, array.shape, array.chunks, strict=False):
        start, stop, _ = sel.indices(n)
        ranges.append(range(start // size, max(start, stop - 1) // size + 1))
    for n, size in zip(array.shape[len(selection) :], array.chunks[len(selection) :], strict=True):
        ranges.append(range(-(-n // size)))
    return list(product(*ranges))


def _corrupt_chunk(array: zarr.Array, selection: tuple[slice, ...], error: Exception) -> Exception:
    """The `StoreError` for the first chunk under `selection` that fails to decode on its own,
    or `error` itself when each decodes alone (the failure was not in a chunk)."""
    for coords in _chunks_under(array, selection):
        try:
            array.get_block_selection(coords)
        except OSError:
            raise
        except Exception as exc:
            key = array.metadata.encode_chunk_key(coords)
            return StoreError(f"{array_location(array)}: chunk {key}: corrupt ({one_line(exc)})")
    return error


def read_checked(array: zarr.Array, selection: Sequence[slice]) -> np.ndarray:
    """`array[selection]`; a chunk that fails to decode raises `StoreError` naming it.

    Chunks are re-read one by one only on the error path, to find the culprit.
    """
    selection = tuple(selection)
    try:
        return np.asarray(array[selection])
    except OSError:
        raise  # I/O trouble is not corruption: callers may retry it
    except Exception as exc:
        raise _corrupt_chunk(array, selection, exc) from exc


@dataclass(frozen=True)
class CheckedArray:
    """A read-only view of a Zarr array for `dask.array.from_array` whose reads name a corrupt
    chunk (`read_checked`)."""

    array: zarr.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    @property
    def ndim(self) -> int:
        return self.array.ndim

    def __getitem__(self, selection: tuple[slice, ...]) -> np.ndarray:
        return read_checked(self.array, selection)


@dataclass(frozen=True)
class SlideStore:
    """Read access to one ingested slide store (a local folder or a remote location); arrays
    are opened lazily, chunk by chunk."""

    path: StoreLocation

    @classmethod
    def open(cls, path: str | StoreLocation) -> SlideStore:
        path = Path(path) if isinstance(path, str) else path
        try:
            group = open_group(path, mode="r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
            raise StoreError(f"{path}: not a Zarr group ({exc})") from exc
        except ValueError as exc:  # zarr.json that is not JSON, or not Zarr's
            raise StoreError(f"{path}: unreadable zarr.json ({one_line(exc)})") from exc
        if METADATA_KEY not in group.attrs:
            raise StoreError(f"{path}: not a segflow slide store (no '{METADATA_KEY}' metadata)")
        found = dict(group.attrs[METADATA_KEY]).get("store_format", 1)
        if found != STORE_FORMAT:
            raise StoreError(
                f"{path}: store format {found}, this segflow reads format {STORE_FORMAT} "
                "(every chunk stored and checksummed); ingest the slide again"
            )
        return cls(path)

    @property
    def group(self) -> zarr.Group:
        return open_group(self.path, mode="r")

    @property
    def metadata(self) -> dict:
        return dict(self.group.attrs[METADATA_KEY])

    @property
    def name(self) -> str:
        return self.path.name.removesuffix(".zarr")

    def _array(self, path: str) -> zarr.Array:
        try:
            array = self.group[path]
        except KeyError:
            raise StoreError(f"{self.path / path}: missing array metadata (zarr.json)") from None
        if not isinstance(array, zarr.Array):
            raise StoreError(f"{self.path / path}: a group where an array belongs")
        return array

    def image(self, level: int = 0) -> zarr.Array:
        """Image level `level` of the pyramid, (c, y, x)."""
        return self._array(str(level))

    def verified(self, array: zarr.Array) -> zarr.Array:
        """`array` once every chunk of it is on disk and, where ingest recorded it, its chunk
        count matches the manifest; `StoreError` otherwise."""
        verify_chunks(array)
        expected = self.metadata.get("arrays", {}).get(array.path)
        if expected is not None and expected != array.nchunks:
            raise StoreError(
                f"{array_location(array)}: {array.nchunks} chunks, the store's manifest "
                f"records {expected}"
            )
        return array

    @property
    def n_levels(self) -> int:
        return len(self.group.attrs["ome"]["multiscales"][0]["datasets"])

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.image(0).shape)

    def _optional(self, path: str) -> zarr.Array | None:
        """The array at `path`; None when absent, unless the manifest says it was written."""
        if path in self.metadata.get("arrays", {}):
            return self._array(path)
        try:
            return self.group[path]
        except KeyError:
            return None

    @property
    def annotations(self) -> zarr.Array | None:
        return self._optional(f"{LABELS_GROUP}/{ANNOTATIONS}/0")

    @property
    def tissue(self) -> zarr.Array | None:
        return self._optional(f"{LABELS_GROUP}/{TISSUE}/0")

    @property
    def tissue_downsample(self) -> int:
        """Level-0 px per tissue-mask px along each axis."""
        return int(self.metadata["tissue_downsample"])

    @property
    def target(self) -> zarr.Array | None:
        return self._optional(f"{TRAINING_GROUP}/{TARGET}")

    @property
    def weight(self) -> zarr.Array | None:
        return self._optional(f"{TRAINING_GROUP}/{WEIGHT}")

    @property
    def segmentation(self) -> zarr.Array | None:
        return self._optional(f"{LABELS_GROUP}/{SEGMENTATION}/0")

    @property
    def instances(self) -> zarr.Array | None:
        return self._optional(f"{LABELS_GROUP}/{INSTANCES}/0")


def chunk_manifest(group: zarr.Group) -> dict[str, int]:
    """{array path: chunk count} of every array under `group`, at any depth."""
    return {
        name: member.nchunks
        for name, member in group.members(max_depth=None)
        if isinstance(member, zarr.Array)
    }
