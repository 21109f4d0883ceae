"""Label bootstrap under the stage contract (`pipelines.stage`): training labels for unlabelled
slide stores by differentiable feature clustering (`segcore.bootstrap`).

For an archive of unlabelled stores (ingested without label images):

  scale     per slide, the Otsu threshold and deviation of its stain feature over tissue
            (haematoxylin for H&E, intensity for fluorescence; `segcore.clustering_input`),
            from the finest pyramid level of at most 4 Mpx: what the network sees is that
            feature centred and scaled per slide
  sample    `n_tiles` tiles of `tile_size` px from the tissue of all slides, a slide's share
            its tissue area (seeded by `clustering.seed`, independent of the order stores are
            named in), so one network sees every slide; where stores hold scribbles
            (`pipelines.scribbles`), half the tiles (rounded up) are centred on stroked pixels
            instead, each stroke value in turn
  train     one clustering network on them (`segcore.bootstrap.fit_clustering`), so a cluster
            id means the same thing on every slide; with scribbles, the strokes under each
            tile pin their pixels to the stroke's cluster (the paper's scribble loss)
  map       which clusters are nuclei: `nucleus` as given (e.g. nucleus=3,7), else the stated
            rule of `segcore.cluster_classes` over the clusters of the training tiles: every
            cluster whose mean standardised feature (haematoxylin for H&E, intensity for
            fluorescence) lies above Otsu's threshold of that feature over the tiles
  write     per store, block by block on Dask (`pipelines.cluster.map_bounded`), each block
            read with a halo of M px (`receptive_halo`) so the blocks equal the whole slide:
              labels/bootstrap     the cluster ids, uint8, an NGFF label with a full pyramid
              labels/annotations   the nucleus clusters' connected components as instance ids,
                                   uint32, full pyramid: what `segflow weights` and `segflow
                                   train` take, as they take an ingested label image
            both built in a hidden work group inside `labels/` and installed
            (`pipelines.storage.install`), in a local store or one on object storage alike.

The identity recorded on `labels/bootstrap` (`BOOTSTRAP_OUTPUT`) holds the ingest identity of
every store trained on, the identity of their scribbles where they have some, and the
settings: a rerun on the same archive is "skipped" without training, and a changed setting,
new strokes or another set of slides redoes every store. A store ingested
with a label image is refused (its annotations are real ones, never overwritten).

Worked example, two 6000 x 4000 slides in 1024 px chunks, defaults: 32 tiles of 256 px from
their tissue train one network (M = 2); each slide is cut into 1024 px blocks, the block at
rows 1024..2047 reads rows 1022..2049, and writes its clusters and nucleus mask there.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from distributed import Client
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from skimage.filters import threshold_otsu

from pipelines.cluster import ClusterConfig, dask_client, default_in_flight, map_bounded
from pipelines.components import label_foreground
from pipelines.config import output_settings
from pipelines.ingest import SLIDE_STORE
from pipelines.location import Where, parse_location
from pipelines.runtime import Runtime
from pipelines.scribbles import StrokeIndex, recorded_strokes, scribbles_key, stroke_index
from pipelines.stage import (
    Identity,
    StageOutput,
    StageResult,
    error_line,
    record_identity,
    run_archive,
)
from pipelines.storage import (
    install,
    reconsolidate,
    remove_stale_siblings,
    remove_tree,
    temporary_sibling,
)
from segcore import ngff
from segcore.bootstrap import (
    UNSTROKED,
    ClusteringConfig,
    ClusteringNetwork,
    ClusteringRun,
    fit_clustering,
    predict_clusters,
    receptive_halo,
)
from segcore.cluster_classes import (
    cluster_means,
    foreground,
    parse_cluster_ids,
    propose_nuclei,
    stain_feature,
)
from segcore.clustering_input import SlideScale, clustering_input
from segcore.store import (
    ANNOTATIONS,
    LABELS_GROUP,
    SlideStore,
    open_group,
    read_checked,
    zarr_location,
)

#: Bumped when the labels written for the same slides and settings change (3: the network
#: sees the stain feature centred and scaled per slide, not RGB; nuclei are the clusters
#: above Otsu's threshold).
BOOTSTRAP_FORMAT = 3
#: The most pixels of the pyramid level a slide's stain scale is computed from.
SCALE_PIXELS = 4 << 20
BOOTSTRAP = "bootstrap"
#: The stage's identity is recorded on the cluster label of each store.
BOOTSTRAP_OUTPUT = StageOutput(f"{LABELS_GROUP}/{BOOTSTRAP}")
_IMAGE_DTYPES = ("uint8", "uint16")

Region = tuple[slice, slice]


class BootstrapError(ValueError):
    """Stores or settings the bootstrap cannot work with."""


class BootstrapConfig(BaseModel):
    """Label-bootstrap settings: the clustering (Kim, Kanezaki & Tanaka 2020 defaults), the
    tiles it trains on, and which clusters are nuclei."""

    model_config = ConfigDict(extra="forbid")

    clustering: ClusteringConfig = Field(default_factory=ClusteringConfig)
    #: Side of each training tile, px (smaller where a slide is smaller).
    tile_size: int = Field(default=256, ge=8)
    #: Training tiles drawn from the tissue of all slides together.
    n_tiles: int = Field(default=32, ge=1)
    #: The nucleus clusters (e.g. 3,7); None: proposed by the stated rule
    #: (segcore.cluster_classes.propose_nuclei: the clusters whose mean haematoxylin, or
    #: intensity for fluorescence, lies above Otsu's threshold).
    nucleus: tuple[int, ...] | None = None
    #: When no cluster's mean is above the threshold, the rule takes the darkest of those
    #: holding at least this fraction of the tiles' pixels.
    min_cluster_fraction: float = Field(default=0.01, ge=0, lt=1)
    #: Where the network trains and runs ("cpu", "cuda", "cuda:1", "mps").
    device: str = "cpu"
    #: MLflow tracking URI for the run's parameters, loss curve and overlay; None: untracked.
    tracking_uri: str | None = None
    #: Level-0 px per block side, rounded to whole chunks: where the work is cut, not what it
    #: writes, so not part of the output's identity.
    block_size: int = Field(default=1024, ge=1)
    #: Px per side the network runs on at once inside a block (memory, not output).
    predict_tile: int = Field(default=512, ge=16)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @field_validator("nucleus", mode="before")
    @classmethod
    def _cluster_ids(cls, value: object) -> object:
        return None if value is None else parse_cluster_ids(value)

    @model_validator(mode="after")
    def _nucleus_clusters_exist(self) -> BootstrapConfig:
        n_clusters = self.clustering.n_clusters
        outside = [c for c in self.nucleus or () if c >= n_clusters]
        if outside:
            raise ValueError(
                f"nucleus clusters {outside} do not exist: the network has {n_clusters} "
                f"(ids 0..{n_clusters - 1})"
            )
        return self

    def settings(self) -> dict:
        """The settings that decide the labels."""
        return output_settings(self, "block_size", "predict_tile", "tracking_uri")


class BootstrapResult(StageResult):
    """What the bootstrap did for one store."""

    nucleus: tuple[int, ...] | None = None
    #: How the nucleus clusters were chosen: "given", or the automatic rule's name.
    rule: str | None = None
    iterations: int | None = None
    n_instances: int | None = None
    #: Fraction of the slide's pixels in the nucleus clusters.
    foreground_fraction: float | None = None


# --- the archive: open, identify, sample, train, map ---------------------------------------


def _open_unlabelled(path: Where, n_clusters: int) -> SlideStore:
    slide = SlideStore.open(path)
    if slide.metadata.get("labels") is not None:
        raise BootstrapError(
            f"{path}: was ingested with a label image; the bootstrap labels unlabelled stores "
            "only and never replaces real annotations"
        )
    image = slide.verified(slide.image(0))
    if image.dtype.name not in _IMAGE_DTYPES:
        raise BootstrapError(f"{path}: image pixel type {image.dtype} (uint8 or uint16)")
    strokes = recorded_strokes(path)  # strokes the stage cannot identify fail the store here
    if strokes and max(strokes) >= n_clusters:
        raise BootstrapError(
            f"{path}: stroke value {max(strokes)} has no cluster: the network has {n_clusters} "
            f"(strokes 1..{n_clusters - 1}, 0 = no stroke)"
        )
    return slide


def is_unlabelled(store: Where) -> bool:
    """Whether a store was ingested without a label image (the stores the bootstrap labels;
    its own annotations do not make a store labelled)."""
    return SlideStore.open(store).metadata.get("labels") is None


def archive_identity(slides: Sequence[SlideStore], config: BootstrapConfig) -> Identity:
    """The slides trained on (their ingest identities, in sorted order), the identities of
    their scribbles (only where some have them) and the settings."""
    keys = {slide.path: SLIDE_STORE.recorded_key(slide.path) or slide.name for slide in slides}
    inputs: dict = {"stores": sorted(keys.values())}
    strokes = sorted(
        [keys[slide.path], key] for slide in slides if (key := scribbles_key(slide.path))
    )
    if strokes:
        inputs["scribbles"] = strokes
    return Identity(
        stage="bootstrap", format=BOOTSTRAP_FORMAT, inputs=inputs, settings=config.settings()
    )


def _tissue_cells(slide: SlideStore) -> tuple[np.ndarray, int, int]:
    """(flat indices of the tissue-mask cells on tissue, the mask's columns, level-0 px per
    cell side); (empty, 0, 0) when the slide has no tissue mask or no tissue (it is then
    sampled uniformly)."""
    tissue = slide.tissue
    if tissue is not None:
        mask = read_checked(tissue, (slice(None), slice(None))) > 0
        if mask.any():
            return np.flatnonzero(mask.ravel()), mask.shape[1], slide.tissue_downsample
    return np.empty(0, dtype=np.int64), 0, 0


def slide_scale(slide: SlideStore) -> SlideScale:
    """The slide's stain scale (`segcore.clustering_input`) over its tissue, from the finest
    pyramid level of at most `SCALE_PIXELS` px (all of that level where there is no tissue
    mask or no tissue)."""
    sizes = [int(np.prod(slide.image(k).shape[1:])) for k in range(slide.n_levels)]
    level = next((k for k, n in enumerate(sizes) if n <= SCALE_PIXELS), slide.n_levels - 1)
    feature = stain_feature(read_checked(slide.image(level), (slice(None),) * 3))
    on, columns, k = _tissue_cells(slide)
    if not k:
        return SlideScale.of(feature)
    # Level px (r, c) lies in tissue cell (r * 2^level // k, c * 2^level // k).
    rows = np.arange(feature.shape[0]) * 2**level // k
    cols = np.arange(feature.shape[1]) * 2**level // k
    cells = rows[:, None] * columns + np.minimum(cols, columns - 1)[None, :]
    tissue = np.isin(cells, on)
    return SlideScale.of(feature[tissue] if tissue.any() else feature)


@dataclass(frozen=True)
class SampledTiles:
    """Training tiles (N, C, t, t) as read from level 0, the slide each came from, and the
    strokes under each (N, t, t; `UNSTROKED` everywhere without scribbles: then None)."""

    tiles: np.ndarray
    owners: list[SlideStore]
    scribbles: np.ndarray | None


def _tissue_centre(
    slide: SlideStore, cells: tuple[np.ndarray, int, int], rng: np.random.Generator
) -> tuple[int, int]:
    on_tissue, columns, k = cells
    if k:
        cy, cx = divmod(int(rng.choice(on_tissue)), columns)
        return cy * k + int(rng.integers(k)), cx * k + int(rng.integers(k))
    height, width = slide.shape[1:]
    return int(rng.integers(height)), int(rng.integers(width))


def _stroke_centres(
    slides: Sequence[SlideStore], strokes: dict[Where, StrokeIndex], n_tiles: int, seed: int
) -> list[tuple[int, int, int]]:
    """(slide index, y, x) on stroked pixels for half of `n_tiles` (rounded up, at least one
    per stroke value where the tiles allow; none without strokes): the stroke values in turn
    (so a value drawn on a few pixels is trained on as often as one drawn on many), a slide by
    its pixels of that value, then one of those pixels, each equally likely."""
    values = sorted({v for index in strokes.values() for v in index.counts})
    if not values:
        return []
    # Per value, each slide's chance: its share of that value's pixels.
    chances = {}
    for value in values:
        totals = np.array(
            [strokes[s.path].total(value) if s.path in strokes else 0 for s in slides]
        )
        chances[value] = totals / totals.sum()
    rng = np.random.default_rng([seed, 1])  # apart from the tissue draws' generator
    centres = []
    for k in range(min(n_tiles, max((n_tiles + 1) // 2, len(values)))):
        value = values[k % len(values)]
        i = int(rng.choice(len(slides), p=chances[value]))
        centres.append((i, *strokes[slides[i].path].draw(value, rng)))
    return centres


def sample_tiles(
    slides: Sequence[SlideStore],
    tile_size: int,
    n_tiles: int,
    seed: int,
    strokes: dict[Where, StrokeIndex] | None = None,
) -> SampledTiles:
    """`n_tiles` level-0 tiles of side t (`tile_size`, or the smallest slide side when
    smaller): centred on tissue, each slide drawn in proportion to its tissue area; with
    `strokes` (by store), half of them (rounded up, at least one per stroke value where the
    tiles allow) centred on stroked pixels instead (`_stroke_centres`)."""
    slides = sorted(
        slides, key=lambda s: str(s.path.resolve() if isinstance(s.path, Path) else s.path)
    )
    strokes = strokes or {}
    side = min(tile_size, *(min(s.shape[1:]) for s in slides))
    cells = [_tissue_cells(s) for s in slides]
    area = np.array(
        [
            len(on) * k * k if k else float(np.prod(s.shape[1:]))
            for (on, _, k), s in zip(cells, slides, strict=True)
        ]
    )
    centres = _stroke_centres(slides, strokes, n_tiles, seed)
    rng = np.random.default_rng(seed)
    for index in rng.choice(len(slides), size=n_tiles - len(centres), p=area / area.sum()):
        centres.append((int(index), *_tissue_centre(slides[index], cells[index], rng)))
    tiles, owners, windows = [], [], []
    for index, y, x in centres:
        slide = slides[index]
        height, width = slide.shape[1:]
        y0 = int(np.clip(y - side // 2, 0, height - side))
        x0 = int(np.clip(x - side // 2, 0, width - side))
        region = (slice(y0, y0 + side), slice(x0, x0 + side))
        tiles.append(read_checked(slide.image(0), (slice(None), *region)))
        owners.append(slide)
        if strokes:
            index_of = strokes.get(slide.path)
            windows.append(
                index_of.window(y0, x0, side)
                if index_of is not None
                else np.full((side, side), UNSTROKED, np.uint8)
            )
    return SampledTiles(np.stack(tiles), owners, np.stack(windows) if windows else None)


def choose_nucleus(
    network: ClusteringNetwork, inputs: np.ndarray, config: BootstrapConfig, stained: bool
) -> tuple[tuple[int, ...], str, list[float]]:
    """(nucleus cluster ids, how they were chosen, each cluster's share of the tiles' px),
    from the network's `inputs` (N, 1, t, t: the standardised stain feature of H&E tiles when
    `stained`, of fluorescence tiles otherwise)."""
    n_clusters = config.clustering.n_clusters
    clusters = np.stack([predict_clusters(network, x, config.predict_tile) for x in inputs])
    counts = np.bincount(clusters.ravel(), minlength=n_clusters)
    shares = (counts / counts.sum()).tolist()
    if config.nucleus is not None:
        return config.nucleus, "given", shares
    feature = inputs[:, 0]
    means, counts = cluster_means(clusters, feature, n_clusters)
    rule = "haematoxylin above Otsu" if stained else "intensity above Otsu"
    threshold = float(threshold_otsu(feature)) if np.ptp(feature) > 0 else float(feature.max())
    nucleus = propose_nuclei(means, counts, threshold, config.min_cluster_fraction)
    return nucleus, rule, shares


# --- one store: cluster block by block, label, build pyramids, install ---------------------


def _block_side(chunk: int, block_size: int) -> int:
    return max(chunk, block_size // chunk * chunk)


def _cluster_block(
    image: zarr.Array,
    clusters_out: zarr.Array,
    nucleus_out: zarr.Array,
    region: Region,
    network: ClusteringNetwork,
    scale: SlideScale,
    nucleus: tuple[int, ...],
    config: BootstrapConfig,
) -> np.ndarray:
    """Cluster one block (read with the network's halo, scaled as its slide) into
    `clusters_out` and its nucleus mask into `nucleus_out`; returns the block's pixels per
    cluster."""
    halo = receptive_halo(config.clustering)
    grown, inner = ngff.grown_region(region, halo, image.shape)
    pixels = clustering_input(read_checked(image, (slice(None), *grown)), scale)
    clusters = predict_clusters(network.to(config.device), pixels, config.predict_tile)[inner]
    ngff.writable(clusters_out)[region] = clusters
    ngff.writable(nucleus_out)[region] = foreground(clusters, nucleus).astype(np.uint32)
    return np.bincount(clusters.ravel(), minlength=config.clustering.n_clusters)


def _fill_pyramid(levels: list[zarr.Array], chunk: int, client: Client | None) -> None:
    for src, dst in zip(levels, levels[1:], strict=False):
        jobs = (
            (region, (src, dst, region, "nearest"))
            for region in ngff.level_regions(dst.shape, chunk)
        )
        for _ in map_bounded(client, ngff.downsample_region, jobs, default_in_flight(client)):
            pass


def write_bootstrap_labels(
    slide: SlideStore,
    network: ClusteringNetwork,
    scale: SlideScale,
    nucleus: tuple[int, ...],
    config: BootstrapConfig,
    record: tuple[Identity, dict],
    client: Client | None,
) -> tuple[int, float]:
    """Write `labels/bootstrap` and `labels/annotations` of one store (see the module
    docstring); returns (nucleus instances, nucleus fraction of the slide)."""
    image = slide.verified(slide.image(0))
    shape = tuple(image.shape[1:])
    chunk = int(image.chunks[-1])
    mpp = slide.metadata.get("mpp")
    final = slide.path / LABELS_GROUP / BOOTSTRAP
    remove_stale_siblings(final)
    work = temporary_sibling(final)
    try:
        root = zarr.open_group(zarr_location(work, read_only=False), mode="w", zarr_format=3)
        properties = [{"label-value": c, "class": "nucleus"} for c in nucleus]
        clusters = ngff.create_label(
            root, BOOTSTRAP, shape, np.uint8, slide.n_levels, chunk, mpp=mpp,
            properties=properties,
        )  # fmt: skip
        instances = ngff.create_label(
            root, ANNOTATIONS, shape, np.uint32, slide.n_levels, chunk, mpp=mpp
        )
        side = _block_side(chunk, config.block_size)
        regions = ngff.level_regions(shape, side)
        jobs = (
            (region, (image, clusters[0], instances[0], region, network, scale, nucleus, config))
            for region in regions
        )
        counts = np.zeros(config.clustering.n_clusters, dtype=np.int64)
        for _, block_counts in map_bounded(client, _cluster_block, jobs, default_in_flight(client)):
            counts += block_counts
        # The nucleus mask becomes instance ids in place, as ingest does with a binary mask.
        n_instances = label_foreground(instances[0], instances[0], client).n_components
        for levels in (clusters, instances):
            _fill_pyramid(levels, chunk, client)
        fraction = float(counts[list(nucleus)].sum() / max(counts.sum(), 1))
        identity, metadata = record
        metadata = {
            **metadata,
            "store": SLIDE_STORE.recorded_key(slide.path),
            "stain_scale": {"centre": scale.centre, "std": scale.std},
            "n_instances": n_instances,
            "foreground_fraction": fraction,
            "slide_cluster_fractions": (counts / max(counts.sum(), 1)).tolist(),
        }
        record_identity(open_group(work / LABELS_GROUP / BOOTSTRAP, mode="r+"), identity, metadata)
        # The annotations first, the label holding the identity last: a store whose identity
        # says "current" holds both.
        for name in (ANNOTATIONS, BOOTSTRAP):
            target = slide.path / LABELS_GROUP / name
            remove_stale_siblings(target)
            install(work / LABELS_GROUP / name, target)
        ngff.list_labels(open_group(slide.path / LABELS_GROUP, mode="r+"), (ANNOTATIONS, BOOTSTRAP))
    finally:
        remove_tree(work)
    reconsolidate(slide.path)
    return n_instances, fraction


# --- the stage --------------------------------------------------------------------------------


def _skipped(store: Where, identity: Identity, seconds: float) -> BootstrapResult:
    stored = open_group(BOOTSTRAP_OUTPUT.node(store), mode="r").attrs["segflow"]
    return BootstrapResult(
        store=store,
        status="skipped",
        identity=identity.key,
        seconds=seconds,
        nucleus=tuple(stored.get("nucleus", ())),
        rule=stored.get("rule"),
        iterations=stored.get("iterations"),
        n_instances=stored.get("n_instances"),
        foreground_fraction=stored.get("foreground_fraction"),
    )


@dataclass(frozen=True)
class BootstrapTraining:
    """One trained clustering: the run, its tiles as read and as the network saw them, and
    the nucleus clusters with how they were chosen and each cluster's share of the tiles."""

    run: ClusteringRun
    tiles: np.ndarray
    inputs: np.ndarray
    scribbles: np.ndarray | None
    nucleus: tuple[int, ...]
    rule: str
    shares: list[float]


def train_bootstrap(
    slides: Sequence[SlideStore],
    scales: dict[Where, SlideScale],
    config: BootstrapConfig,
    on_iteration: Callable[[int, float, int], None] | None = None,
) -> BootstrapTraining:
    """Sample the tiles, train the network on their stain feature scaled per slide (`scales`,
    by store), guided by the slides' scribbles where they have some, and choose the nucleus
    clusters."""
    channels = {slide.shape[0] for slide in slides}
    if len(channels) > 1:
        raise BootstrapError(
            f"{', '.join(str(s.path) for s in slides)}: slides with {sorted(channels)} "
            "channels; one network clusters slides of one kind (bootstrap them separately)"
        )
    strokes = {s.path: index for s in slides if (index := stroke_index(s.path)) is not None}
    sampled = sample_tiles(
        slides, config.tile_size, config.n_tiles, config.clustering.seed, strokes
    )
    inputs = np.stack(
        [
            clustering_input(tile, scales[slide.path])
            for tile, slide in zip(sampled.tiles, sampled.owners, strict=True)
        ]
    )
    run = fit_clustering(
        inputs,
        config.clustering,
        scribbles=sampled.scribbles,
        device=config.device,
        on_iteration=on_iteration,
    )
    run.network.to("cpu")
    stained = sampled.tiles.shape[1] == 3
    nucleus, rule, shares = choose_nucleus(run.network, inputs, config, stained)
    return BootstrapTraining(run, sampled.tiles, inputs, sampled.scribbles, nucleus, rule, shares)


def _bootstrap(
    stores: list[Where], config: BootstrapConfig, client: Client | None, progress: bool
) -> list[BootstrapResult]:
    start = time.perf_counter()
    results: dict[Where, BootstrapResult] = {}
    slides: dict[Where, SlideStore] = {}
    for store in stores:
        try:
            slides[store] = _open_unlabelled(store, config.clustering.n_clusters)
        except Exception as exc:
            line = error_line(store, exc)
            results[store] = BootstrapResult(store=store, status="failed", error=line)
    if not slides:
        return [results[s] for s in stores]
    identity = archive_identity(list(slides.values()), config)
    todo = [s for s in slides if not BOOTSTRAP_OUTPUT.is_current(s, identity)]
    for store in slides:
        if store not in todo:
            results[store] = _skipped(store, identity, time.perf_counter() - start)
    if todo:
        scales = {store: slide_scale(slide) for store, slide in slides.items()}
        trained = train_bootstrap(list(slides.values()), scales, config)
        run, nucleus, rule = trained.run, trained.nucleus, trained.rule
        mlflow_run = None
        if config.tracking_uri is not None:
            # Imported only when tracked: MLflow takes seconds to import.
            from pipelines.bootstrap_tracking import track_bootstrap

            mlflow_run = track_bootstrap(config.tracking_uri, config.settings(), trained)
        metadata = {
            "nucleus": list(nucleus),
            "rule": rule,
            "iterations": run.iterations,
            "final_labels": run.label_counts[-1],
            "stroked_pixels": (
                0 if trained.scribbles is None else int((trained.scribbles != UNSTROKED).sum())
            ),
            "tile_cluster_fractions": trained.shares,
            "mlflow_run_id": mlflow_run,
        }

        def one(store: Where, bars: object) -> BootstrapResult:
            began = time.perf_counter()
            n_instances, fraction = write_bootstrap_labels(
                slides[store],
                run.network,
                scales[store],
                nucleus,
                config,
                (identity, metadata),
                client,
            )
            return BootstrapResult(
                store=store,
                status="written",
                identity=identity.key,
                seconds=time.perf_counter() - began,
                nucleus=nucleus,
                rule=rule,
                iterations=run.iterations,
                n_instances=n_instances,
                foreground_fraction=fraction,
            )

        written = run_archive(
            todo,
            one,
            lambda store, error, seconds: BootstrapResult(
                store=store, status="failed", error=error, seconds=seconds
            ),
            subject=lambda store: store,
            progress=progress,
        )
        results.update(zip(todo, written, strict=True))
    return [results[s] for s in stores]


def bootstrap_archive(
    stores: Sequence[str | Where],
    config: BootstrapConfig | None = None,
    progress: bool = False,
    runtime: Runtime | None = None,
    client: Client | None = None,
) -> list[BootstrapResult]:
    """Bootstrap labels for unlabelled stores with one clustering network (see the module
    docstring); one result per store, in order: "written", "skipped" (its labels were made
    from the same slides and settings) or "failed" with its one-line error. A store that
    cannot be read, or that has real annotations, fails alone; the others are trained on.

    The blocks run on `client`, or on a cluster started from `config.cluster` without one.
    """
    config = config or BootstrapConfig()
    if runtime is not None:
        config = runtime.configure(config)
    if not stores:
        raise BootstrapError("no stores given: name at least one unlabelled slide store")
    paths = [parse_location(s) for s in stores]
    if client is not None:
        return _bootstrap(paths, config, client, progress)
    with dask_client(config.cluster) as own_client:
        return _bootstrap(paths, config, own_client, progress)
