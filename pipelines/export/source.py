"""What an export reads: a store's instance labels, the image they segment, its pixel size and
the segmentation's provenance.

Inference writes `labels/instances` into the slide store itself, or into
`<output_dir>/<name>.zarr`, whose `attrs["segflow"]["source"]` names the slide store holding
the image; both are accepted here.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import zarr

from pipelines.stage import IDENTITY_ATTR, SEGFLOW_ATTR, Identity
from segcore.errors import one_line
from segcore.store import (
    INSTANCES,
    LABELS_GROUP,
    SEGMENTATION,
    SlideStore,
    StoreError,
    verify_chunks,
)

#: Namespace of every exported object's UUID (uuid5 of it, the segmentation and the label id).
OBJECT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "segflow/export/object")


class ExportError(ValueError):
    """A store that cannot be exported: not a store, or one without instance labels."""


@dataclass(frozen=True)
class ExportSource:
    """One store's instances and the image under them."""

    path: Path
    instances: zarr.Array
    image: zarr.Array
    mpp: float | None
    #: `attrs["segflow"]` of `labels/segmentation`: model URI, version, digest, identity, ...
    segmentation: dict

    @classmethod
    def open(cls, path: str | Path) -> ExportSource:
        path = Path(path)
        try:
            group = zarr.open_group(path, mode="r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError) as exc:
            raise ExportError(f"{path}: not a Zarr store ({one_line(exc)})") from exc
        try:
            instances = group[f"{LABELS_GROUP}/{INSTANCES}/0"]
        except KeyError:
            raise ExportError(f"{path}: no instances to export (run segflow infer first)") from None
        own = dict(group.attrs.get(SEGFLOW_ATTR) or {})
        image_store = path if "store_format" in own else Path(own.get("source", path))
        try:
            slide = SlideStore.open(image_store)
        except StoreError as exc:
            raise ExportError(f"{path}: no image for its instances ({one_line(exc)})") from exc
        image = slide.image(0)
        for array in (instances, image):
            verify_chunks(array)  # a missing chunk would read as background
        if image.shape[1:] != instances.shape:
            raise ExportError(
                f"{path}: instances {instances.shape} do not cover the image {image.shape[1:]}"
            )
        try:
            segmentation = dict(group[f"{LABELS_GROUP}/{SEGMENTATION}"].attrs[SEGFLOW_ATTR])
        except KeyError:
            segmentation = {}
        return cls(path, instances, image, slide.metadata.get("mpp"), segmentation)

    @property
    def identity_key(self) -> str:
        """The segmentation's identity key (model, settings, inputs), or, for instances written
        without one, the store's name: what makes object ids stable across exports."""
        record = self.segmentation.get(IDENTITY_ATTR)
        return Identity.model_validate(record).key if record else f"unrecorded:{self.path.name}"

    @property
    def namespace(self) -> uuid.UUID:
        return uuid.uuid5(OBJECT_NAMESPACE, self.identity_key)

    def provenance(self, exporter_version: str) -> dict:
        """What the exported files were made from, for their headers."""
        return {
            "store": str(self.path),
            "identity_key": self.identity_key,
            "mpp": self.mpp,
            "model_uri": self.segmentation.get("model_uri"),
            "model_version": self.segmentation.get("model_version"),
            "model_digest": self.segmentation.get("model_digest"),
            "segmentation_segflow_version": self.segmentation.get("segflow_version"),
            "identity": self.segmentation.get(IDENTITY_ATTR),
            "exported_by": f"segflow {exporter_version}",
        }
