"""Stage 2 under the stage contract (`pipelines.stage`): a slide store's training target and
U-Net loss weight map, block by block on Dask.

Reads `labels/annotations/0`, writes the group `training` with `target` (uint8: 1 = cell, or
with `target="cells+boundaries"` 1 = cell interior and 2 = cell boundary) and `weight`
(float32) chunked like image level 0, equal to `segcore.weights.training_target` and
`weight_map` of the whole image; the group's attributes name the classes (`classes`), which
training reads to size the network. Two passes over blocks of about `block_size` px, each
block a whole number of stored chunks (so no two tasks write one chunk), both through
`pipelines.cluster.map_bounded`:

  scan    per block: a digest of each annotation chunk (the identity's input) and the pixels
          of each class of the target (the slide-wide class frequencies);
  write   per block: the annotations around it with a halo of `halo + 1` px (halo = the
          larger of `border_halo(w0, sigma, tolerance)` and, for boundaries, `boundary_width`),
          separated, classified, weighted, cropped to the block.

The store may be a local folder or an object-storage prefix (`pipelines.location`): the maps
are written into a hidden sibling of `training` inside the store and installed through
`pipelines.storage`, the same chunks either way.

Worked example, a 5000 x 3000 px slide stored in 1024 px chunks, block_size 2048, defaults
(w0 10, sigma 5, tolerance 1e-3 -> halo 22): blocks of 2048 x 2048 px in a 3 x 2 grid, the
top-left one reads rows and columns 0..2071 and writes 0..2047.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterator, Sequence

import numpy as np
import zarr
from distributed import Client
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, model_validator

from pipelines.cluster import ClusterConfig, dask_client, default_in_flight, map_bounded
from pipelines.config import output_settings
from pipelines.ingest import SLIDE_STORE
from pipelines.location import Where, parse_location
from pipelines.runtime import Runtime
from pipelines.stage import Identity, StageOutput, StageResult, record_identity, run_archive
from pipelines.storage import (
    install,
    reconsolidate,
    remove_stale_siblings,
    remove_tree,
    temporary_sibling,
)
from segcore import ngff
from segcore.ngff import grown_region
from segcore.store import (
    TARGET,
    TRAINING_GROUP,
    WEIGHT,
    SlideStore,
    open_group,
    read_checked,
    zarr_location,
)
from segcore.weights import (
    TARGET_CLASSES,
    TargetKind,
    border_halo,
    class_weights_from_counts,
    separate_touching,
    target_of_separated,
    weight_map,
)

#: Bumped when the maps written for the same annotations and settings change.
WEIGHTS_FORMAT = 1
#: Classes of stores written before the target kind was recorded (background / cell).
DEFAULT_CLASSES = TARGET_CLASSES["cells"]
#: The maps' identity is recorded on the `training` group of a store.
WEIGHT_MAPS = StageOutput(TRAINING_GROUP)

Region = tuple[slice, slice]


class WeightsError(ValueError):
    """A store whose weight maps cannot be computed (no annotations, bad shape or dtype)."""


class WeightsConfig(BaseModel):
    """Weight-map settings (Ronneberger et al. 2015: w0=10, sigma=5 px)."""

    model_config = ConfigDict(extra="forbid")

    w0: float = Field(default=10.0, ge=0)
    sigma: float = Field(default=5.0, gt=0)
    # The border term is dropped where it is below this; it sets the halo.
    tolerance: float = Field(default=1e-3, gt=0)
    #: "cells": 0 background, 1 cell (the paper's); "cells+boundaries": 0 background, 1 cell
    #: interior, 2 cell boundary (the cell pixels within `boundary_width` px of anything that
    #: is not the same cell), for separating touching cells from interior seeds.
    target: TargetKind = "cells"
    #: Width of the boundary class, px; only with target "cells+boundaries".
    boundary_width: int = Field(default=2, ge=1)
    #: One weight per class of `target`; None = N / (k N_c) from the whole slide's counts.
    class_weights: tuple[NonNegativeFloat, ...] | None = None
    # Pixels per block side, rounded to a multiple of the store's chunk (or shard) size.
    # Where the work is cut, not what it writes: not part of the output's identity.
    block_size: int = Field(default=2048, ge=1)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _one_weight_per_class(self) -> WeightsConfig:
        classes = self.classes
        if self.class_weights is not None and len(self.class_weights) != len(classes):
            raise ValueError(
                f"class_weights needs one weight per class {list(classes)} of target "
                f"{self.target!r}, got {len(self.class_weights)}"
            )
        return self

    @property
    def classes(self) -> tuple[str, ...]:
        """The target's class names, by class value."""
        return TARGET_CLASSES[self.target]

    @property
    def halo(self) -> int:
        """Context, px, each block needs beyond the one px of the separation."""
        halo = border_halo(self.w0, self.sigma, self.tolerance)
        return max(halo, self.boundary_width) if self.target == "cells+boundaries" else halo

    def settings(self) -> dict:
        """The settings that decide the maps (the boundary width only where there is one)."""
        unused = ("boundary_width",) if self.target == "cells" else ()
        return output_settings(self, "block_size", *unused)


class WeightsResult(StageResult):
    """What `compute_weight_maps` did for one store, with the slide-wide class statistics."""

    halo: int | None = None
    classes: tuple[str, ...] | None = None
    class_weights: tuple[float, ...] | None = None
    class_counts: tuple[int, ...] | None = None


def _open_annotations(path: Where) -> tuple[SlideStore, zarr.Array]:
    slide = SlideStore.open(path)
    annotations = slide.annotations
    if annotations is None:
        raise WeightsError(f"{path}: no annotations (labels/annotations/0) to compute weights from")
    if annotations.ndim != 2 or tuple(annotations.shape) != tuple(slide.shape[1:]):
        raise WeightsError(
            f"{path}: annotations shape {annotations.shape} does not match the image "
            f"{tuple(slide.shape[1:])}"
        )
    if not np.issubdtype(annotations.dtype, np.integer):
        raise WeightsError(f"{path}: annotations must be integer ids, got {annotations.dtype}")
    return slide, slide.verified(annotations)


# --- the block grid ------------------------------------------------------------------------


def _block_side(unit: tuple[int, int], block_size: int) -> tuple[int, int]:
    """About `block_size` px, a multiple of `unit` (at least one unit)."""
    return tuple(max(u, block_size // u * u) for u in unit)


def _blocks(shape: tuple[int, int], side: tuple[int, int]) -> Iterator[Region]:
    for y in range(0, shape[0], side[0]):
        for x in range(0, shape[1], side[1]):
            yield slice(y, min(y + side[0], shape[0])), slice(x, min(x + side[1], shape[1]))


# --- block tasks (run on Dask workers) ------------------------------------------------------


def _scan_block(
    annotations: zarr.Array, region: Region, config: WeightsConfig
) -> tuple[list, np.ndarray]:
    """(chunk index, digest) of every annotation chunk in `region`, and its pixels of each
    class of the target. Outside the image is background to `separate_touching` and
    `weight_map`, as for the whole image, so the grown window is clipped there."""
    shape = tuple(annotations.shape)
    boundary = config.boundary_width if config.target == "cells+boundaries" else 0
    grown, inner = grown_region(region, boundary + 1, shape)
    labels = read_checked(annotations, grown)
    core = labels[inner]
    cy, cx = annotations.chunks
    digests = []
    for y in range(0, core.shape[0], cy):
        for x in range(0, core.shape[1], cx):
            chunk = np.ascontiguousarray(core[y : y + cy, x : x + cx])
            index = ((region[0].start + y) // cy, (region[1].start + x) // cx)
            digests.append((index, hashlib.blake2b(chunk.tobytes(), digest_size=16).digest()))
    target = target_of_separated(separate_touching(labels), config.target, config.boundary_width)
    counts = np.bincount(target[inner].ravel(), minlength=len(config.classes))
    return digests, counts


def _write_block(
    annotations: zarr.Array,
    target: zarr.Array,
    weight: zarr.Array,
    region: Region,
    halo: int,
    config: WeightsConfig,
    class_weights: np.ndarray,
) -> None:
    grown, inner = grown_region(region, halo + 1, annotations.shape)
    separated = separate_touching(read_checked(annotations, grown))
    classes = target_of_separated(separated, config.target, config.boundary_width)
    weights = weight_map(
        separated,
        config.w0,
        config.sigma,
        class_weights,
        classes=classes,
        tolerance=config.tolerance,
    )
    target[region] = classes[inner]
    weight[region] = weights[inner].astype(np.float32)


# --- the stage ------------------------------------------------------------------------------


def _annotations_digest(digests: list, annotations: zarr.Array) -> str:
    """One hash over the chunk digests in raster order (independent of the block grid)."""
    combined = hashlib.blake2b(f"{annotations.shape}{annotations.dtype}".encode(), digest_size=16)
    for _, digest in sorted(digests):
        combined.update(digest)
    return combined.hexdigest()


def _write_unit(slide: SlideStore, annotations: zarr.Array) -> tuple[int, int]:
    """The (y, x) extent blocks align to: level 0's shard (else chunk), which the maps share,
    and the annotations' chunk, which the scan digests whole."""
    image = slide.image(0)
    unit = (image.shards or image.chunks)[1:]
    return tuple(math.lcm(u, c) for u, c in zip(unit, annotations.chunks, strict=True))


def _install_maps(
    slide: SlideStore,
    annotations: zarr.Array,
    blocks: list[Region],
    halo: int,
    config: WeightsConfig,
    class_weights: np.ndarray,
    record: tuple[Identity, dict],
    client: Client | None,
) -> None:
    """Write the maps into a temporary sibling of `training` and install it."""
    final = slide.path / TRAINING_GROUP
    remove_stale_siblings(final)
    tmp = temporary_sibling(final)
    image = slide.image(0)
    chunks = tuple(image.chunks[1:])
    shards = tuple(image.shards[1:]) if image.shards else None
    try:
        group = zarr.open_group(zarr_location(tmp, read_only=False), mode="w", zarr_format=3)
        target, weight = (
            ngff.create_array(
                group, name, annotations.shape, dtype, chunks, shards=shards, dimension_names="yx"
            )
            for name, dtype in ((TARGET, np.uint8), (WEIGHT, np.float32))
        )
        jobs = (
            (region, (annotations, target, weight, region, halo, config, class_weights))
            for region in blocks
        )
        for _ in map_bounded(client, _write_block, jobs, default_in_flight(client)):
            pass
        record_identity(group, *record)
        install(tmp, final)
    finally:
        remove_tree(tmp)
    reconsolidate(slide.path)


def _compute(
    slide: SlideStore,
    annotations: zarr.Array,
    config: WeightsConfig,
    client: Client | None,
    start: float,
) -> WeightsResult:
    halo = config.halo
    shape = tuple(annotations.shape)
    blocks = list(_blocks(shape, _block_side(_write_unit(slide, annotations), config.block_size)))
    digests, counts = [], np.zeros(len(config.classes), dtype=np.int64)
    jobs = ((region, (annotations, region, config)) for region in blocks)
    for _, (block_digests, block_counts) in map_bounded(
        client, _scan_block, jobs, default_in_flight(client)
    ):
        digests.extend(block_digests)
        counts += block_counts
    identity = Identity(
        stage="weights",
        format=WEIGHTS_FORMAT,
        inputs={"annotations": _annotations_digest(digests, annotations)},
        settings=config.settings(),
    )
    result = WeightsResult(
        store=slide.path,
        status="skipped",
        identity=identity.key,
        halo=halo,
        classes=config.classes,
    )
    if WEIGHT_MAPS.is_current(slide.path, identity):
        stored = open_group(WEIGHT_MAPS.node(slide.path), mode="r").attrs["segflow"]
        result.class_weights = tuple(stored["class_weights"])
        result.class_counts = tuple(stored["class_counts"])
        result.seconds = time.perf_counter() - start
        return result
    # Class frequencies of the whole slide, not of each block.
    counts = tuple(int(c) for c in counts)
    class_weights = (
        np.asarray(config.class_weights, dtype=np.float64)
        if config.class_weights is not None
        else class_weights_from_counts(counts)
    )
    metadata = {
        "store": SLIDE_STORE.recorded_key(slide.path),
        "halo": halo,
        # Training sizes the network and reads its classes from this (`recorded_classes`).
        "classes": list(config.classes),
        "class_weights": class_weights.tolist(),
        "class_counts": list(counts),
    }
    _install_maps(
        slide, annotations, blocks, halo, config, class_weights, (identity, metadata), client
    )
    result.status = "written"
    result.class_weights = tuple(class_weights.tolist())
    result.class_counts = counts
    result.seconds = time.perf_counter() - start
    return result


def recorded_classes(store: str | Where) -> tuple[str, ...]:
    """The class names of a store's training target, by class value, as the weights stage
    recorded them (background / cell for maps written before it recorded any)."""
    group = open_group(parse_location(store) / TRAINING_GROUP, mode="r")
    return tuple(group.attrs.get("segflow", {}).get("classes", DEFAULT_CLASSES))


def compute_weight_maps(
    store: str | Where, config: WeightsConfig | None = None, client: Client | None = None
) -> WeightsResult:
    """Write `training/target` and `training/weight` of one slide store; "skipped" when the
    installed maps were made from the same annotations and settings.

    The blocks run on `client`, or on a cluster started from `config.cluster` without one.
    """
    start = time.perf_counter()
    config = config or WeightsConfig()
    slide, annotations = _open_annotations(parse_location(store))
    if client is not None:
        return _compute(slide, annotations, config, client, start)
    with dask_client(config.cluster) as own_client:
        return _compute(slide, annotations, config, own_client, start)


def weights_archive(
    stores: Sequence[str | Where],
    config: WeightsConfig | None = None,
    progress: bool = False,
    runtime: Runtime | None = None,
) -> list[WeightsResult]:
    """Weight maps of many labelled stores on one cluster (on `runtime`'s scheduler when it
    names one); one result per store, a store that fails "failed" with its one-line error
    while the others go on."""
    config = config or WeightsConfig()
    if runtime is not None:
        config = runtime.configure(config)
    if not stores:
        raise WeightsError("no stores given: name at least one labelled slide store")
    with dask_client(config.cluster) as client:
        return run_archive(
            [parse_location(s) for s in stores],
            lambda store, bars: compute_weight_maps(store, config, client),
            lambda store, error, seconds: WeightsResult(
                store=store, status="failed", error=error, seconds=seconds
            ),
            subject=lambda store: store,
            progress=progress,
        )
