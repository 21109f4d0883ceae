"""Stage 4: distributed overlap-tile inference of ingested slides, written back to OME-Zarr.

    results = infer_archive(Path("archive/"), "models:/unet@champion", InferConfig())

One model session per call (a `Segmenter`): the model is resolved, hashed and put on the
cluster's workers once, and every slide reuses it. Per slide: plan blocks on the output chunk
grid (pipelines.inference.plan), run each block as a Dask task on a worker that holds the
model (pipelines.inference.blocks/.model), record each finished block in the store's journal
(pipelines.inference.journal), then derive the pyramid and the instances and move the
finished labels into the store (pipelines.inference.outputs).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import dask.array as da
import numpy as np
import zarr
from distributed import Client
from pydantic import BaseModel, ConfigDict, Field

from pipelines.cluster import (
    ClusterConfig,
    SchedulerLostError,
    dask_client,
    default_in_flight,
    map_bounded,
    scheduler_kept,
)
from pipelines.export import Format, export_paths, export_store
from pipelines.inference.blocks import BlockJob, run_block
from pipelines.inference.journal import Journal, run_lock
from pipelines.inference.model import (
    ModelPlugin,
    ModelSource,
    common_layout,
    use_layout,
    worker_profiles,
    workers_per_host,
)
from pipelines.inference.outputs import (
    InstanceRule,
    WorkGroup,
    built_instances,
    check_output,
    class_fractions,
    create_work_group,
    finish,
    install_run,
    record_run,
)
from pipelines.inference.plan import SlidePlan, plan_slide
from pipelines.inference.report import print_summary
from pipelines.inference.source import resolve_model
from pipelines.ingest import SLIDE_STORE
from pipelines.location import Location, ObjectUrl, Where, parse_location
from pipelines.numerics import NumericLayout
from pipelines.progress import RunProgress
from pipelines.redaction import RedactedUri
from pipelines.runtime import Runtime
from pipelines.sources import find_stores
from pipelines.stage import Identity, StageOutput, StageResult, error_line, run_archive
from pipelines.storage import exists, writable_folder
from segcore.geometry import UNetGeometry
from segcore.normalization import INPUT_DTYPE
from segcore.orientation import OrientationSet, orientations
from segcore.stain import StainInputError
from segcore.stain_standardization import StainMoments, StainStandardization, slide_stain_moments
from segcore.store import LABELS_GROUP, SEGMENTATION, SlideStore
from segcore.weights import target_classes

#: Bumped when the bytes a run writes change for the same model and settings.
OUTPUT_FORMAT = 2
#: A segmentation's identity is recorded on its label group in the output store.
SEGMENTATION_OUTPUT = StageOutput(f"{LABELS_GROUP}/{SEGMENTATION}")


class InferError(ValueError):
    """A slide could not be segmented; the message names the slide (and model) and the problem."""


def _default_cluster() -> ClusterConfig:
    # One in-process worker by default: torch and the Zarr codecs release the GIL, so threads
    # lose nothing to processes here, and there is no worker start (seconds) or model copy.
    # Its torch threads take all cores for the forward pass while its second Dask thread
    # reads and writes the next block. A scheduler address moves the work to a real cluster.
    return ClusterConfig(n_workers=1, threads_per_worker=2, processes=False)


class InferConfig(BaseModel):
    """Inference settings; None means chosen from the model and the workers' hardware."""

    model_config = ConfigDict(extra="forbid")

    tile_size: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=4, ge=1)
    block_size: int | None = Field(default=None, ge=1)
    device: str = "auto"
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    channels_last: bool = True
    compile: bool = False
    probabilities: Literal["uint8", "float16"] | None = None
    #: Where each slide's labels go (`<output_dir>/<slide>.zarr`) instead of into its own
    #: store: a folder, or a prefix on object storage in the slide store's bucket.
    output_dir: Location | None = None
    skip_background: bool = True
    #: Test-time averaging of the softmax over oriented passes (each an exact overlap-tile
    #: pass): "flips" (4 passes), "dihedral" (8: flips and 90-degree rotations).
    test_time_augmentation: OrientationSet = "none"
    #: Foreground where the probability of not being background exceeds this (None: argmax,
    #: the same as 0.5 for two classes); 0.6 suits the MoNuSeg model (benchmarks/monuseg.py).
    foreground_threshold: float | None = Field(default=None, gt=0, lt=1)
    connectivity: Literal[1, 2] = 1
    #: Instances: the foreground's (class > 0) connected components ("none"), or after
    #: touching objects are cut apart by a watershed, each chunk seeing `separation_halo` px
    #: around it (set it to at least an object's diameter): "watershed" floods from the
    #: distance transform's h-maxima of at least `separation_depth` px; "boundary", for a
    #: model with a boundary class (trained on target "cells+boundaries"), from the
    #: components of its interior class, each taking its own ring of boundary.
    separation: Literal["none", "watershed", "boundary"] = "none"
    separation_depth: float = Field(default=2.0, gt=0)
    separation_halo: int = Field(default=32, ge=1)
    #: Instances of fewer level-0 px are dropped (specks); 0 keeps every one. Judged with
    #: `separation_halo` px of context, which should be at least this.
    min_object_size: int = Field(default=0, ge=0)
    #: Exports written beside each segmented store as it finishes (`pipelines.export`): a
    #: QuPath GeoJSON of the instances and/or their measurement table. Not part of the
    #: segmentation's identity; a current slide is exported again only when a file is missing.
    export: list[Format] = []
    max_in_flight: int | None = Field(default=None, ge=1)
    cluster: ClusterConfig = Field(default_factory=_default_cluster)
    overwrite: bool = False
    progress: bool = True
    #: MLflow store of registry and run URIs; None = the default workdir's, as training's
    #: (pipelines.runtime.default_tracking_uri).
    tracking_uri: RedactedUri = None


class InferResult(StageResult):
    """Outcome for one slide; `output` is the store its labels went to."""

    shape: tuple[int, int] | None = None
    tissue_fraction: float | None = None
    mpx_per_s: float | None = None
    class_fractions: list[float] | None = None
    n_instances: int | None = None
    #: How the instances met the chunk (= block) grid: `pipelines.components.Labelling`.
    seams: dict[str, int] | None = None
    #: Files `config.export` wrote (or found current) beside the output store.
    exports: list[Path] = []
    blocks: dict[str, int] = {}


@dataclass(frozen=True)
class _Session:
    """What every slide of one run shares: the cluster, the model on its workers."""

    client: Client
    source: ModelSource
    plugin: str
    tile_size: int
    max_in_flight: int
    #: What every block of the session is computed under (part of each output's identity).
    numerics: NumericLayout


@contextmanager
def _session(
    model_uri: str | Path, config: InferConfig, client: Client | None
) -> Iterator[_Session]:
    source = resolve_model(model_uri, config.tracking_uri)
    with ExitStack() as stack:
        if client is None:
            client = stack.enter_context(dask_client(config.cluster))
        # Unique per session: sessions sharing a cluster never unregister each other's model.
        name = f"segflow-infer-{source.digest[:12]}-{uuid.uuid4().hex[:8]}"
        with scheduler_kept(client):
            plugin = ModelPlugin(
                source,
                config.device,
                config.channels_last,
                config.compile,
                workers_per_host(client),
            )
            client.register_plugin(plugin, name=name)
            stack.callback(_unregister, client, name)
            profiles = worker_profiles(client, name, config.batch_size)
            precision = config.precision
            if precision == "auto":
                precision = "bfloat16" if profiles[0].device == "cuda" else "float32"
            try:
                numerics = common_layout(profiles, precision)
            except ValueError as exc:
                raise InferError(str(exc)) from None
            use_layout(client, name, numerics)
        yield _Session(
            client=client,
            source=source,
            plugin=name,
            tile_size=config.tile_size or min(p.tile_size for p in profiles),
            max_in_flight=config.max_in_flight or default_in_flight(client),
            numerics=numerics,
        )


def _unregister(client: Client, name: str) -> None:
    # A client that lost its scheduler cannot reach the workers (it would wait out its
    # reconnect and raise over the error that ended the run).
    if client.status == "running":
        client.unregister_worker_plugin(name)


class Segmenter:
    """Segments slides one at a time with one model session: the first slide resolves the
    model, hashes it and registers it on the cluster's workers; every later slide reuses it
    until `close`. Safe to call from several threads (one session is opened)."""

    def __init__(
        self, model_uri: str | Path, config: InferConfig, client: Client | None = None
    ) -> None:
        self.model_uri = str(model_uri)
        self.config = config
        self._client = client
        self._stack = ExitStack()
        self._session: _Session | None = None
        self._lock = threading.Lock()

    def open(self) -> _Session:
        """The session, opened on first use; a model or cluster problem raises as it is."""
        with self._lock:
            if self._session is None:
                session = _session(self.model_uri, self.config, self._client)
                self._session = self._stack.enter_context(session)
            return self._session

    def segment(self, store: str | Where, progress: RunProgress | None = None) -> InferResult:
        """Segment one slide store (a folder, or a prefix on object storage); raises
        InferError naming it, or SchedulerLostError when the cluster is gone (no later slide
        could run either)."""
        session = self.open()
        where = parse_location(store)
        with scheduler_kept(session.client):
            try:
                result = _segment(where, session, self.config, progress or RunProgress(None, 1))
                if self.config.export:
                    result.exports = _export(result, self.config.export, session)
                return result
            except (InferError, SchedulerLostError):
                raise
            except Exception as exc:
                raise InferError(error_line(where, exc)) from exc

    def close(self) -> None:
        """Take the model off the workers (and stop a cluster the session started)."""
        with self._lock:
            self._stack.close()
            self._session = None

    def __enter__(self) -> Segmenter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _export(result: InferResult, formats: list[Format], session: _Session) -> list[Path]:
    """The exports of a segmented slide: written when it was segmented now, or when one of
    them is missing beside a slide that was current."""
    output = result.where()
    wanted = export_paths(output, formats)
    if result.status == "skipped" and all(path.exists() for path in wanted):
        return wanted
    return export_store(output, None, formats, session.client, session.max_in_flight).files


def _settings(session: _Session, plan: SlidePlan, config: InferConfig) -> dict:
    """Every setting that changes the bytes written, resolved; device and precision are in
    the session's numeric layout, which the identity records beside these."""
    return {
        "tile_size": plan.tiles.tile_size[0],
        "batch_size": config.batch_size,
        "block_size": plan.chunk_side,
        "channels_last": config.channels_last,
        "compile": config.compile,
        "probabilities": config.probabilities,
        "skip_background": config.skip_background,
        "test_time_augmentation": config.test_time_augmentation,
        "connectivity": config.connectivity,
        "separation": config.separation,
        "separation_depth": config.separation_depth,
        "separation_halo": config.separation_halo,
        "min_object_size": config.min_object_size,
        # Recorded only when set, so outputs computed by argmax keep their identity.
        **(
            {"foreground_threshold": config.foreground_threshold}
            if config.foreground_threshold is not None
            else {}
        ),
    }


def _stain_standardization(
    slide: SlideStore, image: zarr.Array, model: ModelSource
) -> StainStandardization | None:
    """The slide's map to the stain moments the model was trained on, for a model trained
    with stain standardisation (its config's `stain_reference`); None for others."""
    reference = model.config.get("stain_reference")
    if reference is None:
        return None
    try:
        return StainStandardization(slide_stain_moments(image), StainMoments.from_dict(reference))
    except StainInputError as exc:
        raise InferError(
            f"{slide.path}: model {model.uri} standardises stains, but this slide's cannot be "
            f"measured ({exc})"
        ) from exc


def _tissue_fraction(slide: SlideStore) -> float:
    """Share of the slide covered by its tissue mask (streamed chunk by chunk)."""
    mask = slide.tissue
    if mask is None:
        return 1.0
    return float((da.from_zarr(mask) != 0).mean().compute(scheduler="synchronous"))


def _jobs(
    slide: SlideStore,
    plan: SlidePlan,
    journal: Journal,
    done: dict[str, dict],
    work: WorkGroup,
    session: _Session,
    config: InferConfig,
    stain: StainStandardization | None,
) -> Iterator[tuple[str, tuple[BlockJob]]]:
    """One job per block not yet `done`, in raster order."""
    # Read from the store once (each read of a store's metadata is a request on S3).
    mask = slide.tissue
    tissue = slide.path / mask.path if mask is not None else None
    tissue_downsample = slide.tissue_downsample if mask is not None else 1
    for block in plan.blocks:
        if block.name in done:
            continue
        job = BlockJob(
            plugin=session.plugin,
            block=block,
            slide_shape=plan.shape,
            image=slide.path / "0",
            tissue=tissue,
            tissue_downsample=tissue_downsample,
            segmentation=work.label_path("segmentation"),
            probabilities=work.probabilities_path if config.probabilities else None,
            probability_format=config.probabilities,
            marker=journal.marker(block.name),
            batch_size=config.batch_size,
            precision=session.numerics.precision,
            skip_background=config.skip_background,
            foreground_threshold=config.foreground_threshold,
            stain=stain,
        )
        yield block.name, (job,)


def _segment(
    store: Where, session: _Session, config: InferConfig, progress: RunProgress
) -> InferResult:
    """Segment one slide, resuming its journal; raises on any problem."""
    start, started_at = time.perf_counter(), datetime.now(UTC).isoformat()
    slide = SlideStore.open(store)
    # Every chunk the blocks will read is on disk (a missing one would read as zeros).
    image = slide.verified(slide.image(0))
    if slide.tissue is not None:
        slide.verified(slide.tissue)
    channels, height, width = image.shape
    model = session.source
    if image.dtype != INPUT_DTYPE:
        low, high = slide.metadata.get("value_range") or ("?", "?")
        raise InferError(
            f"{slide.path}: image is {image.dtype} (values {low}..{high}) but model {model.uri} "
            f"takes {INPUT_DTYPE} pixels (0..255); segflow does not rescale it silently"
        )
    if model.config["in_channels"] != channels:
        raise InferError(
            f"{slide.path}: model {model.uri} expects {model.config['in_channels']} channels, "
            f"the slide has {channels}"
        )
    stain = _stain_standardization(slide, image, model)
    classes = target_classes(model.config["n_classes"])
    if config.separation == "boundary" and "boundary" not in classes:
        raise InferError(
            f"{slide.path}: separation 'boundary' needs a model with a boundary class, but "
            f"{model.uri} predicts {list(classes)}; train on target 'cells+boundaries' or use "
            "separation 'watershed'"
        )
    geometry = UNetGeometry(model.config["depth"], model.config["padding"])
    plan = plan_slide(
        (height, width),
        geometry,
        session.tile_size,
        config.block_size,
        orientations(config.test_time_augmentation),
    )
    identity = Identity(
        stage="infer",
        format=OUTPUT_FORMAT,
        inputs={"store": SLIDE_STORE.recorded_key(slide.path), "shape": list(plan.shape)},
        settings=_settings(session, plan, config),
        model=model.digest,
        numerics=session.numerics,
    )
    key = identity.key
    output = slide.path if config.output_dir is None else config.output_dir / slide.path.name
    result = InferResult(
        store=slide.path, status="written", output=output, identity=key, shape=plan.shape
    )
    check_output(output, slide.path)
    if config.export and isinstance(output, ObjectUrl):
        raise InferError(
            f"{output}: exports ({', '.join(config.export)}) beside a store on object storage "
            "are not supported yet; export it with a local output folder"
        )
    writable_folder(output)
    with run_lock(output):
        journal = Journal.of(output, key)
        # Current = made from this store by this model with these output-changing settings;
        # anything else replaces it, as ingest and weights redo theirs.
        current = SEGMENTATION_OUTPUT.is_current(output, identity)
        if current and not exists(journal.root) and not config.overwrite:
            result.status = "skipped"
            result.error = "already segmented with this model and settings"
            return result
        journal.start()
        mpp = slide.metadata.get("mpp")
        work = create_work_group(
            journal.root / "out",
            plan.shape,
            plan.chunk_side,
            slide.n_levels,
            mpp,
            model.config["n_classes"],
            config.probabilities,
            classes,
        )
        # Read once (on object storage a marker is a request): this run's outcomes join them.
        outcomes = journal.done()
        resumed = len(outcomes)
        task = progress.slide(slide.name, len(plan.blocks), resumed)
        jobs = _jobs(slide, plan, journal, outcomes, work, session, config, stain)
        ran: Counter[str] = Counter()  # this run's blocks only: resumed ones ran before
        for name, outcome in _run_blocks(session, jobs, slide.path):
            outcomes[name] = outcome
            ran[outcome["status"]] += 1
            progress.advance(task)
        counts = np.sum([o["class_counts"] for o in outcomes.values()], axis=0)
        if not work.is_built:
            labelling = finish(
                work,
                session.client,
                plan.chunk_side,
                slide.n_levels,
                mpp,
                InstanceRule(
                    config.connectivity,
                    config.separation_depth if config.separation == "watershed" else None,
                    config.separation_halo,
                    config.min_object_size,
                    seeded=config.separation == "boundary",
                ),
                session.max_in_flight,
                identity,
            )
        else:
            labelling = built_instances(work)
        result.seconds = time.perf_counter() - start
        result.mpx_per_s = height * width / 1e6 / result.seconds
        result.tissue_fraction = _tissue_fraction(slide)
        result.class_fractions = class_fractions(counts)
        result.n_instances = labelling.n_components
        result.seams = asdict(labelling)
        # Each block once: total = resumed + computed + background.
        result.blocks = {
            "total": len(plan.blocks),
            "resumed": resumed,
            "computed": ran["computed"],
            "background": ran["background"],
        }
        record_run(
            work,
            identity,
            {
                "model_uri": model.uri,
                "model_version": model.version,
                "model_digest": model.digest,
                "started": started_at,
                "finished": datetime.now(UTC).isoformat(),
                "seconds": result.seconds,
                "mpx_per_s": result.mpx_per_s,
                "tissue_fraction": result.tissue_fraction,
                "class_fractions": result.class_fractions,
                "n_instances": result.n_instances,
                "seams": result.seams,
                "blocks": result.blocks,
                # The slide's own stain moments, where the model standardises them: how far
                # its staining was from the model's reference.
                "stain_moments": stain.slide.to_dict() if stain is not None else None,
            },
        )
        install_run(work, output, slide.path, config.probabilities is not None)
        journal.remove()
        progress.slide_done(task)
    return result


def _run_blocks(
    session: _Session, jobs: Iterator[tuple[str, tuple[BlockJob]]], store: Where
) -> Iterator[tuple[str, dict]]:
    """Run block jobs on the cluster; a failure names the slide and the block."""
    results = map_bounded(session.client, run_block, jobs, session.max_in_flight)
    while True:
        try:
            yield next(results)
        except StopIteration:
            return
        except Exception as exc:
            raise InferError(f"{store}: {exc}") from exc


def _infer_all(
    stores: Sequence[Where], model_uri: str | Path, config: InferConfig, client: Client | None
) -> list[InferResult]:
    with Segmenter(model_uri, config, client) as segmenter:
        segmenter.open()  # a model or cluster problem ends the call before any slide
        return run_archive(
            stores,
            segmenter.segment,
            lambda store, error, seconds: InferResult(
                store=store, status="failed", error=error, seconds=seconds
            ),
            subject=lambda store: store,
            progress=config.progress,
        )


def infer_slide(
    store: str | Where, model_uri: str | Path, config: InferConfig, client: Client | None = None
) -> InferResult:
    """Segment one slide store (a folder or an object-storage prefix, e.g. an `ObjectUrl`
    parsed with its storage settings); raises InferError with a one-line message when it
    fails."""
    (result,) = _infer_all([parse_location(store)], model_uri, config, client)
    if result.status == "failed":
        raise InferError(result.error)
    return result


def infer_archive(
    stores: Sequence[str | Where] | str | Where,
    model_uri: str | Path,
    config: InferConfig,
    client: Client | None = None,
    runtime: Runtime | None = None,
) -> list[InferResult]:
    """Segment many slide stores (or every store in a folder); failures are reported per slide
    and do not stop the others. Prints a summary table when `config.progress` is set. A
    `runtime` supplies the MLflow store and the Dask scheduler (`Runtime.configure`)."""
    if runtime is not None:
        config = runtime.configure(config)
    paths = find_stores([stores] if isinstance(stores, str | Path | ObjectUrl) else stores)
    results = _infer_all(paths, model_uri, config, client)
    if config.progress:
        print_summary(results)
    return results
