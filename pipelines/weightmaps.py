"""Stage 2: a slide store's training target and U-Net loss weight map, chunk by chunk with Dask.

Reads `labels/annotations/0`, writes `training/target` (uint8, 1 = cell) and `training/weight`
(float32) chunked like image level 0. The result equals `segcore.weights.weight_map` of the
whole image (see `compute_weight_maps`); class frequencies are counted over the whole slide.
"""

from __future__ import annotations

import hashlib
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import dask
import dask.array as da
import numpy as np
import zarr
from dask.delayed import Delayed
from distributed import Client, futures_of
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat

from pipelines.cluster import ClusterConfig, dask_client
from segcore import ngff
from segcore.store import TARGET, TRAINING_GROUP, WEIGHT, CheckedArray, SlideStore
from segcore.weights import border_halo, class_weights_from_counts, separate_touching, weight_map

ATTRS_KEY = "weights"
TMP_PREFIX = f".{TRAINING_GROUP}-tmp-"
OLD_PREFIX = f".{TRAINING_GROUP}-old-"


class WeightsError(ValueError):
    """A store whose weight maps cannot be computed (no annotations, bad shape or dtype)."""


class WeightsConfig(BaseModel):
    """Weight-map settings (Ronneberger et al. 2015: w0=10, sigma=5 px)."""

    model_config = ConfigDict(extra="forbid")

    w0: float = Field(default=10.0, ge=0)
    sigma: float = Field(default=5.0, gt=0)
    # The border term is dropped where it is below this; it sets the Dask halo.
    tolerance: float = Field(default=1e-3, gt=0)
    # (background, cell); None = N / (2 N_c) from the whole slide's class counts.
    class_weights: tuple[NonNegativeFloat, NonNegativeFloat] | None = None
    # Pixels per Dask block side, rounded to a multiple of the store's chunk (or shard) size.
    block_size: int = Field(default=2048, ge=1)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)


@dataclass(frozen=True)
class WeightsResult:
    """What `compute_weight_maps` did for one store, with the slide-wide class statistics."""

    store: Path
    status: Literal["written", "skipped"]
    seconds: float
    halo: int
    class_weights: tuple[float, float]
    class_counts: tuple[int, int]


def _open_annotations(path: Path) -> tuple[SlideStore, zarr.Array]:
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


def _write_unit(image: zarr.Array) -> tuple[int, int]:
    """The (y, x) extent a writer must align to: level 0's shard, else its chunk."""
    return tuple((image.shards or image.chunks)[1:])


def _block_chunks(shape: tuple[int, ...], unit: tuple[int, ...], block_size: int) -> tuple:
    """Dask chunks: blocks of about `block_size` px, a multiple of `unit` so no two blocks write
    the same stored chunk."""
    sides = (max(u, block_size // u * u) for u in unit)
    return tuple(min(side, n) for side, n in zip(sides, shape, strict=True))


def _depth(chunks: tuple[tuple[int, ...], ...], halo: int) -> dict[int, int]:
    """Overlap per axis: none along an axis held in one block (nothing beyond it but background,
    which is what the whole-image computation sees there too)."""
    return {axis: (halo if len(c) > 1 else 0) for axis, c in enumerate(chunks)}


def _digest(block: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(block).tobytes(), digest_size=16).digest()


def _combine(digests: list[bytes], shape: tuple[int, ...], dtype: str) -> str:
    combined = hashlib.blake2b(f"{shape}{dtype}".encode(), digest_size=16)
    for digest in digests:
        combined.update(digest)
    return combined.hexdigest()


def _annotations_checksum(annotations: zarr.Array) -> Delayed:
    """Content hash of the annotations, read chunk by chunk in parallel."""
    labels = _read_lazily(annotations, annotations.chunks)
    digests = [dask.delayed(_digest)(block) for block in labels.to_delayed().ravel()]
    return dask.delayed(_combine)(digests, tuple(annotations.shape), str(annotations.dtype))


def _read_lazily(annotations: zarr.Array, chunks: tuple) -> da.Array:
    """The annotations as a Dask array whose reads name a chunk that fails to decode."""
    return da.from_array(CheckedArray(annotations), chunks=chunks, name=False, asarray=True)


def _weight_block(
    separated: np.ndarray, w0: float, sigma: float, tolerance: float, class_weights: np.ndarray
) -> np.ndarray:
    return weight_map(separated, w0, sigma, class_weights, tolerance=tolerance)


def _stored_attrs(slide: SlideStore) -> dict | None:
    target, weight = slide.target, slide.weight
    if target is None or weight is None or ATTRS_KEY not in weight.attrs:
        return None
    if tuple(weight.shape) != tuple(slide.shape[1:]) or tuple(target.shape) != tuple(weight.shape):
        return None
    return dict(weight.attrs[ATTRS_KEY])


def _swap_into_place(root: Path, tmp_name: str) -> None:
    """Replace `training` by the finished temporary group: two renames, never a half map."""
    final = root / TRAINING_GROUP
    old = root / f"{OLD_PREFIX}{uuid.uuid4().hex[:8]}"
    if final.exists():
        final.rename(old)
    (root / tmp_name).rename(final)
    shutil.rmtree(old, ignore_errors=True)
    # Readers that trust consolidated metadata would not see the new arrays otherwise.
    if zarr.open_group(root, mode="r").metadata.consolidated_metadata is not None:
        with warnings.catch_warnings():
            # The store chose consolidation already; zarr's "not in the v3 spec" note is noise.
            warnings.simplefilter("ignore", zarr.errors.ZarrUserWarning)
            zarr.consolidate_metadata(root)


def _remove_leftovers(root: Path) -> None:
    """Temporary groups of runs that crashed (one run per store at a time is assumed)."""
    for leftover in root.iterdir():
        if leftover.name.startswith((TMP_PREFIX, OLD_PREFIX)):
            shutil.rmtree(leftover, ignore_errors=True)


def _write_maps(
    slide: SlideStore,
    separated: da.Array,
    config: WeightsConfig,
    halo: int,
    class_weights: np.ndarray,
    attrs: dict,
    client: Client,
) -> None:
    image = slide.image(0)
    chunks, shards = tuple(image.chunks[1:]), (tuple(image.shards[1:]) if image.shards else None)
    _remove_leftovers(slide.path)
    tmp_name = f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}"
    root = zarr.open_group(slide.path, mode="r+", use_consolidated=False)
    try:
        tmp = root.create_group(tmp_name)
        arrays = [
            ngff.create_array(
                tmp, name, separated.shape, dtype, chunks, shards=shards, dimension_names="yx"
            )
            for name, dtype in ((TARGET, np.uint8), (WEIGHT, np.float32))
        ]
        weight = da.map_overlap(
            partial(
                _weight_block,
                w0=config.w0,
                sigma=config.sigma,
                tolerance=config.tolerance,
                class_weights=class_weights,
            ),
            separated,
            depth=_depth(separated.chunks, halo),
            boundary=0,
            dtype=np.float32,
            meta=np.empty((0, 0), np.float32),
        )
        # map_overlap may rechunk when a block is thinner than the halo; writes must stay
        # aligned to stored chunks.
        target = (separated > 0).astype(np.uint8)
        weight = weight.rechunk(separated.chunks)
        # Each store task writes its block and returns None: nothing large comes back here.
        written = futures_of(
            client.persist(list(da.store([target, weight], arrays, lock=False, compute=False)))
        )
        try:
            client.gather(written)
        except BaseException:
            client.cancel(written)  # stop writing a map that is being thrown away
            raise
        for array in arrays:
            array.attrs[ATTRS_KEY] = attrs
        _swap_into_place(slide.path, tmp_name)
    finally:
        shutil.rmtree(slide.path / tmp_name, ignore_errors=True)


def _compute(
    slide: SlideStore,
    annotations: zarr.Array,
    config: WeightsConfig,
    client: Client,
    start: float,
) -> WeightsResult:
    halo = border_halo(config.w0, config.sigma, config.tolerance)
    requested = list(config.class_weights) if config.class_weights is not None else None
    inputs = {
        "w0": config.w0,
        "sigma": config.sigma,
        "tolerance": config.tolerance,
        "requested_class_weights": requested,
        "annotations_checksum": client.compute(_annotations_checksum(annotations), sync=True),
    }
    stored = _stored_attrs(slide)
    if stored is not None and all(stored.get(key) == value for key, value in inputs.items()):
        return WeightsResult(
            store=slide.path,
            status="skipped",
            seconds=time.perf_counter() - start,
            halo=halo,
            class_weights=tuple(stored["class_weights"]),
            class_counts=tuple(stored["class_counts"]),
        )

    labels = _read_lazily(
        annotations,
        _block_chunks(annotations.shape, _write_unit(slide.image(0)), config.block_size),
    )
    separated = da.map_overlap(
        separate_touching,
        labels,
        depth=_depth(labels.chunks, 1),
        boundary=0,
        dtype=labels.dtype,
        meta=np.empty((0, 0), labels.dtype),
    )
    # Class frequencies of the whole slide (one reduction), not of each block.
    n_cell = int(client.compute(da.count_nonzero(separated), sync=True))
    counts = (int(np.prod(labels.shape)) - n_cell, n_cell)
    class_weights = (
        np.asarray(requested, dtype=np.float64)
        if requested is not None
        else class_weights_from_counts(counts)
    )
    attrs = {
        **inputs,
        "store_checksum": slide.metadata.get("checksum"),
        "halo": halo,
        "class_weights": class_weights.tolist(),
        "class_counts": list(counts),
    }
    _write_maps(slide, separated, config, halo, class_weights, attrs, client)
    return WeightsResult(
        store=slide.path,
        status="written",
        seconds=time.perf_counter() - start,
        halo=halo,
        class_weights=tuple(class_weights.tolist()),
        class_counts=counts,
    )


def compute_weight_maps(
    store: Path, config: WeightsConfig | None = None, client: Client | None = None
) -> WeightsResult:
    """Write `training/target` and `training/weight` of one slide store; skip when current.

    Each Dask block sees `border_halo(w0, sigma, tolerance)` px of its neighbours (1 more for
    `separate_touching`) and the slide-wide class weights, so the map equals
    `weight_map(separate_touching(annotations), tolerance=tolerance)` of the whole image.
    Maps are written into a temporary group and renamed into place when complete. "skipped"
    when the stored maps' settings and annotations checksum match.
    """
    start = time.perf_counter()
    config = config or WeightsConfig()
    slide, annotations = _open_annotations(Path(store))
    if client is not None:
        return _compute(slide, annotations, config, client, start)
    with dask_client(config.cluster) as own_client:
        return _compute(slide, annotations, config, own_client, start)
