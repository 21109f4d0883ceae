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
        tissue/0           tissue mask (y, x) uint8 at 1 / tissue_downsample of level 0
        segmentation/0..   class map (y, x) uint8, written by inference
        instances/0..      instance ids (y, x) uint32, written by inference
      training/
        target             class map (y, x) uint8 for training, from annotations
        weight             loss weight map (y, x) float32 (w_c + border term)

Every label image carries its own "multiscales" metadata and "image-label" source link, so
napari and ome-zarr readers show all levels (segcore.ngff writes both).

attributes["segflow"], written last by pipelines.ingest: source, source_bytes, labels_source,
labels_bytes, page, checksum (sha256 over the source files' sha256s, `file_checksums`), shape,
dtype, mpp (µm/px or None), n_levels, labels ({kind: "binary" | "instances", source_max,
n_instances} or None), tissue_downsample, tissue_fraction, settings (the ingest settings),
segflow_version, ingested_at.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import zarr

IMAGE_AXES = ("c", "y", "x")
LABELS_GROUP = "labels"
ANNOTATIONS = "annotations"
TISSUE = "tissue"
SEGMENTATION = "segmentation"
INSTANCES = "instances"
TRAINING_GROUP = "training"
TARGET = "target"
WEIGHT = "weight"
METADATA_KEY = "segflow"


class StoreError(ValueError):
    """A store is missing, incomplete or not a segflow slide store."""


@dataclass(frozen=True)
class SlideStore:
    """Read access to one ingested slide store; arrays are opened lazily, chunk by chunk."""

    path: Path

    @classmethod
    def open(cls, path: str | Path) -> SlideStore:
        path = Path(path)
        try:
            group = zarr.open_group(path, mode="r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
            raise StoreError(f"{path}: not a Zarr group ({exc})") from exc
        if METADATA_KEY not in group.attrs:
            raise StoreError(f"{path}: not a segflow slide store (no '{METADATA_KEY}' metadata)")
        return cls(path)

    @property
    def group(self) -> zarr.Group:
        return zarr.open_group(self.path, mode="r")

    @property
    def metadata(self) -> dict:
        return dict(self.group.attrs[METADATA_KEY])

    @property
    def name(self) -> str:
        return self.path.name.removesuffix(".zarr")

    def image(self, level: int = 0) -> zarr.Array:
        """Image level `level` of the pyramid, (c, y, x)."""
        return self.group[str(level)]

    @property
    def n_levels(self) -> int:
        return len(self.group.attrs["ome"]["multiscales"][0]["datasets"])

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.image(0).shape)

    def _optional(self, path: str) -> zarr.Array | None:
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
