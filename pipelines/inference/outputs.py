"""A run's output arrays: built in the journal's work group, moved into the store when complete.

Blocks write level 0 of `labels/segmentation` (and `probabilities`) inside
`.segflow-infer/<run key>/out`; once every block is done, `finish` derives the pyramid levels
and `labels/instances` there, then `install_run` renames each finished group into the output
store (`pipelines.storage.install`: a rename locally, a server-side copy on object storage,
its chunks first and its metadata last).
A reader of the store therefore sees the previous result or the new one, never half of one,
and every derived array is rebuilt from level 0 when a run is resumed before `finish` ended.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import zarr
from distributed import Client
from ome_zarr.format import FormatV05
from ome_zarr.writer import add_metadata, get_metadata

from pipelines.cluster import map_bounded
from pipelines.components import Labelling, clean_foreground, label_foreground
from pipelines.location import ObjectUrl, Where
from pipelines.stage import Identity, record_identity
from pipelines.storage import (
    METADATA_DOCUMENT,
    OutputError,
    exists,
    install,
    read_text,
    remove_stale_siblings,
    remove_tree,
    write_file,
)
from segcore import ngff
from segcore.store import INSTANCES, LABELS_GROUP, SEGMENTATION, open_group, zarr_location

PROBABILITIES = "probabilities"
_BUILT = "built"
_CUT = "foreground-cut"
_READY = "ready"


@dataclass(frozen=True)
class WorkGroup:
    """The output arrays of one run, inside its journal directory."""

    root: Where

    @property
    def group(self) -> zarr.Group:
        return open_group(self.root, mode="a")

    def label_path(self, name: str, level: int = 0) -> Where:
        return self.root / LABELS_GROUP / name / str(level)

    @property
    def probabilities_path(self) -> Where:
        return self.root / PROBABILITIES / "0"

    @property
    def is_built(self) -> bool:
        return exists(self.root / _BUILT)


def create_work_group(
    root: Where,
    shape: tuple[int, int],
    chunk_size: int,
    n_levels: int,
    mpp: float | None,
    n_classes: int,
    probabilities: str | None,
    classes: Sequence[str] = (),
) -> WorkGroup:
    """Create (or reopen, when resuming) the run's empty segmentation and probability arrays.

    The segmentation holds the model's classes as they are (0 background, 1 cell and, for a
    model with a boundary class, 2 boundary), named in its NGFF "properties": the instances
    pass seeds from the interior class, and every consumer takes foreground as class > 0
    (`label_foreground`, exports of the instances, the benchmarks' Dice), so nothing is lost
    by keeping the boundary and nothing reads 2 as a different object."""
    work = WorkGroup(root)
    if exists(root / _READY):
        return work
    group = open_group(root, mode="w")
    if probabilities is not None:
        ngff.create_image(
            group.create_group(PROBABILITIES),
            (n_classes, *shape),
            probabilities,
            chunk_size=chunk_size,
            min_level_size=max(shape),  # one level: probabilities are for analysis, not viewing
            mpp=mpp,
        )
    properties = [{"label-value": v, "class": name} for v, name in enumerate(classes) if v]
    ngff.create_label(
        group,
        SEGMENTATION,
        shape,
        "uint8",
        n_levels,
        chunk_size,
        mpp=mpp,
        properties=properties or None,
    )
    write_file(root / _READY, "")
    return work


def _pyramid(
    group: zarr.Group, name: str, client: Client, max_in_flight: int, chunk_size: int
) -> None:
    """Fill levels 1.. of label `name` from level 0, region by region on the cluster."""
    label = group[f"{LABELS_GROUP}/{name}"]
    levels = sorted(int(k) for k in label.array_keys())
    for k in levels[1:]:
        src, dst = label[str(k - 1)], ngff.writable(label[str(k)])
        jobs = (
            (region, (src, dst, region, "nearest"))
            for region in ngff.level_regions(dst.shape, chunk_size)
        )
        for _ in map_bounded(client, ngff.downsample_region, jobs, max_in_flight):
            pass


@dataclass(frozen=True)
class InstanceRule:
    """How instances come from the class map: its foreground's (class > 0) connected
    components (edge neighbours, `connectivity` 2 also diagonal ones), after touching objects
    are cut apart (`segcore.separation`): by a watershed from the interior class's components
    when `seeded` (a background / interior / boundary map), else by a watershed of the
    distance transform when `cut_depth` (its h, px) is set; and objects of fewer than
    `min_size` px dropped, each chunk seeing `cut_halo` px around it."""

    connectivity: Literal[1, 2] = 1
    cut_depth: float | None = None
    cut_halo: int = 32
    #: Objects of fewer px are dropped (0: none), judged with the same halo.
    min_size: int = 0
    seeded: bool = False

    @property
    def separation(self) -> str:
        """The cut: "boundary" (seeded), "watershed" (distance transform) or "none"."""
        if self.seeded:
            return "boundary"
        return "none" if self.cut_depth is None else "watershed"


def finish(
    work: WorkGroup,
    client: Client,
    chunk_size: int,
    n_levels: int,
    mpp: float | None,
    rule: InstanceRule,
    max_in_flight: int,
    identity: Identity,
) -> Labelling:
    """Derive pyramids and instances from the finished level 0; returns the instance count and
    the seam report (`pipelines.components.Labelling`)."""
    group = work.group
    segmentation = group[f"{LABELS_GROUP}/{SEGMENTATION}/0"]
    shape = segmentation.shape
    instances = ngff.create_label(
        group,
        INSTANCES,
        shape,
        "uint32",
        n_levels,
        chunk_size,
        # lz4 writes ids 2-4x faster than zstd, for a larger store only on noisy maps.
        compression=ngff.Compression(codec="blosc-lz4"),
        mpp=mpp,
        overwrite=True,
    )
    foreground = segmentation
    if rule.separation != "none" or rule.min_size > 1:
        # A work array beside the labels: removed with the journal, never installed.
        foreground = ngff.create_array(
            group, _CUT, shape, "uint8", segmentation.chunks, overwrite=True
        )
        clean_foreground(
            segmentation,
            foreground,
            client,
            rule.cut_halo,
            rule.cut_depth,
            rule.min_size,
            max_in_flight,
            seeded=rule.seeded,
        )
    labelling = label_foreground(foreground, instances[0], client, rule.connectivity, max_in_flight)
    for name in (SEGMENTATION, INSTANCES):
        _pyramid(group, name, client, max_in_flight, chunk_size)
    record_identity(
        group[f"{LABELS_GROUP}/{INSTANCES}"],
        identity,
        {
            "n_instances": labelling.n_components,
            "seams": asdict(labelling),
            "connectivity": rule.connectivity,
            "separation": rule.separation,
            "cut_depth": rule.cut_depth if rule.separation == "watershed" else None,
            "min_size": rule.min_size,
            "source": SEGMENTATION,
        },
    )
    write_file(work.root / _BUILT, json.dumps(asdict(labelling)))
    return labelling


def record_run(work: WorkGroup, identity: Identity, metadata: dict) -> None:
    """The run's identity and metadata on the segmentation label (and its identity on the
    probabilities), unless an interrupted install moved them already."""
    label = work.root / LABELS_GROUP / SEGMENTATION
    if _uninstalled(label):
        record_identity(open_group(label, mode="r+"), identity, metadata)
    if _uninstalled(work.root / PROBABILITIES):
        record_identity(open_group(work.root / PROBABILITIES, mode="r+"), identity)


def built_instances(work: WorkGroup) -> Labelling:
    """The labelling of a run whose instances were built before it was interrupted."""
    return Labelling(**json.loads(read_text(work.root / _BUILT)))


def _uninstalled(group: Where) -> bool:
    """Whether the finished group `group` of the work group is still to be installed: its
    metadata is there (an install removes it with the rest, metadata first on object
    storage, so a group an interrupted install left half-removed counts as installed)."""
    return exists(group / METADATA_DOCUMENT)


def _install(new: Where, final: Where) -> None:
    remove_stale_siblings(final)
    install(new, final)


def _ensure_group(where: Where, attrs: dict) -> zarr.Group:
    try:
        return open_group(where, mode="r+")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return zarr.create_group(zarr_location(where, read_only=False), attributes=attrs)


def _same_store(a: Where, b: Where) -> bool:
    if isinstance(a, Path) and isinstance(b, Path):
        return a.resolve() == b.resolve()
    return a == b


def image_link(image_store: Where, label: Where) -> str:
    """The relative path from the label group `label` to its image's store, as NGFF's
    "image-label" source names it; both must be local, or both in one bucket.

    >>> image_link(ObjectUrl("s3", "lab/stores/a.zarr"), ObjectUrl("s3", "lab/out/a.zarr/labels/x"))
    '../../../../stores/a.zarr'
    """
    if isinstance(image_store, Path) and isinstance(label, Path):
        return os.path.relpath(image_store.resolve(), label.resolve())
    if isinstance(image_store, ObjectUrl) and isinstance(label, ObjectUrl):
        bucket, other = image_store.path.split("/")[0], label.path.split("/")[0]
        if image_store.protocol == label.protocol and bucket == other:
            return posixpath.relpath(image_store.path, label.path)
    raise OutputError(
        f"{label}: cannot link labels to the image {image_store} by a relative path (the "
        "output must be in the same bucket as the slide store, or both local)"
    )


def check_output(output: Where, image_store: Where) -> None:
    """Raise `OutputError` (one line) when labels written to `output` could not link to the
    image in `image_store` (see `image_link`); nothing is written before this passes."""
    if not _same_store(output, image_store):
        image_link(image_store, output / LABELS_GROUP / SEGMENTATION)


def install_run(work: WorkGroup, output: Where, image_store: Where, probabilities: bool) -> None:
    """Move the finished groups into `output` and list the labels there (idempotent); an older
    run's probabilities go when this run wrote none, as they belong to the result replaced.

    In the slide store, the labels join the image's (valid NGFF 0.5: as many levels as the
    image) and `probabilities` is an NGFF image of its own beside them. An `output` elsewhere
    holds only labels: NGFF has no image group whose pixels live in another store, so its root
    is a plain Zarr group, and its `labels` group is NGFF labels that link to the image by a
    relative `source` path (ome-zarr's reader follows it when a label is opened). Checked with
    ome-zarr-models in tests/test_ngff_validation.py."""
    _ensure_group(output, {"segflow": {"source": str(image_store)}})
    labels = _ensure_group(output / LABELS_GROUP, {})
    for name in (SEGMENTATION, INSTANCES):
        new = work.root / LABELS_GROUP / name
        if not _uninstalled(new):
            continue  # moved by an earlier, interrupted install
        if not _same_store(output, image_store):
            # NGFF links a label to its image by a relative path; here the image is elsewhere.
            label = open_group(new, mode="r+")
            ome = dict(label.attrs["ome"])
            source = image_link(image_store, output / LABELS_GROUP / name)
            ome["image-label"] = {**ome["image-label"], "source": {"image": source}}
            label.attrs["ome"] = ome
        _install(new, output / LABELS_GROUP / name)
    if _uninstalled(work.root / PROBABILITIES):
        _install(work.root / PROBABILITIES, output / PROBABILITIES)
    elif not probabilities:
        remove_tree(output / PROBABILITIES)
    names = get_metadata(labels).get("labels", [])
    listed = names + [n for n in (SEGMENTATION, INSTANCES) if n not in names]
    if listed != names:
        fmt = FormatV05()
        add_metadata(labels, {"version": fmt.version, "labels": listed}, fmt=fmt)


def class_fractions(counts: np.ndarray) -> list[float]:
    total = max(int(counts.sum()), 1)
    return [float(c) / total for c in counts]
