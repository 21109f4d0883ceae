"""The Prefect flows: each stage alone, and `pipeline_flow` end to end.

    ingest_flow    slides (files or folders) -> one OME-Zarr store per slide
    bootstrap_flow unlabelled stores (+ stroke images) -> labels/bootstrap + labels/annotations
    weights_flow   labelled stores -> training/target + training/weight
    train_flow     stores -> MLflow run + registered version (champion if it validates better)
    infer_flow     stores (and/or new slides) -> labels/segmentation with the pinned champion
    pipeline_flow  all of it: ingest -> weights -> train -> register -> segment every slide

Parameters are the stages' typed configurations plus a `Runtime` (where outputs go, which
servers to use), so the Prefect UI shows and validates them. Each flow publishes a markdown
artifact with a row per slide. A slide that fails fails its own task; the others go on, and
the flow run then ends **Failed** with a message listing the failed slides (so alerting on
failed runs catches it), its artifact still showing every slide.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.states import Failed, State
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict, Field

from flows.outcomes import RunSummary, SlideFailures, StageOutcome, TrainedModel
from flows.stages import TRAINING, run_bootstrap, run_infer, run_ingest, run_train, run_weights
from pipelines.bootstrap import BootstrapConfig, is_unlabelled
from pipelines.infer import InferConfig
from pipelines.ingest import IngestConfig
from pipelines.location import Location, Where
from pipelines.models import pin_model_uri
from pipelines.redaction import redact_text, redact_uri
from pipelines.runtime import Runtime
from pipelines.scribbles import import_scribble_folder
from pipelines.sources import SlideSource, find_slides, find_stores, ready_stores
from pipelines.training.config import DEFAULT_MODEL_NAME, TrainConfig
from pipelines.training.result import TrainResult
from pipelines.training.stores import training_stores
from pipelines.weightmaps import WeightsConfig
from segcore.store import SlideStore

#: Slides in flight at once per stage; chunk-level parallelism is Dask's, inside each task.
SLIDES_AT_ONCE = 2
CHAMPION = f"models:/{DEFAULT_MODEL_NAME}@champion"


class TrainSettings(TrainConfig):
    """TrainConfig whose stores the pipeline fills in with the labelled slides it ingested."""

    stores: list[Location] = Field(default_factory=list)


class PipelineConfig(BaseModel):
    """Everything `pipeline_flow` does to an archive of slides."""

    model_config = ConfigDict(extra="forbid")

    #: A folder of slides (local or on object storage), or a local `.csv` manifest of
    #: image/label pairs (pipelines.sources).
    archive: Location
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    weights: WeightsConfig = Field(default_factory=WeightsConfig)
    train: TrainSettings = Field(default_factory=TrainSettings)
    infer: InferConfig = Field(default_factory=InferConfig)
    #: Labelled slides (the last by name) held out of training to validate on and pick the
    #: champion by, when `train.val_stores` is empty and more than this many are labelled.
    holdout: int = Field(default=1, ge=0)
    #: A line for the run's artifact, e.g. what its scores mean.
    note: str | None = None


# Defaults shown in the Prefect UI; never mutated (flows derive copies).
DEFAULT_INGEST = IngestConfig()
DEFAULT_WEIGHTS = WeightsConfig()
DEFAULT_BOOTSTRAP = BootstrapConfig()
DEFAULT_INFER = InferConfig()
DEFAULT_RUNTIME = Runtime()


def _runner() -> ThreadPoolTaskRunner:
    return ThreadPoolTaskRunner(max_workers=SLIDES_AT_ONCE)


def is_labelled(store: Where) -> bool:
    """Whether a store has annotations to train on."""
    return SlideStore.open(store).annotations is not None


def labelled_stores(paths: list[Where]) -> list[Where]:
    """Stores named directly, and the labelled ones of named folders (the rule is
    `pipelines.sources.ready_stores`; training's is `pipelines.training.stores`)."""
    return ready_stores(paths, is_labelled, "has annotations to compute weight maps from")


def _finish(summary: RunSummary) -> RunSummary | State:
    """Publish the summary artifact; a run with failed slides ends Failed, carrying it."""
    create_markdown_artifact(
        summary.markdown(), key=f"segflow-{summary.flow}", description=summary.headline()
    )
    if summary.failures:
        return Failed(message=summary.headline(), data=SlideFailures(summary))
    return summary


def _trained(result: TrainResult) -> TrainedModel:
    return TrainedModel(
        name=result.registered_name or "",
        version=result.version or "",
        run_id=result.run_id or "",
        champion=result.became_champion,
        metrics=dict(result.metrics),
        experiment_id=result.experiment_id or "",
        aliases=tuple(result.aliases),
    )


def _ingest_stage(
    sources: list[Where | SlideSource],
    config: IngestConfig,
    runtime: Runtime,
    summary: RunSummary,
) -> list[Where]:
    found = find_slides(sources)
    summary.notes += found.notes  # label files that pair with no slide: left out, said so
    pairs = run_ingest(found.sources, runtime.stores_dir, config, runtime)
    summary.outcomes += [outcome for outcome, _ in pairs]
    return [result.store for _, result in pairs if result is not None]


def _train_stage(config: TrainConfig, summary: RunSummary) -> TrainResult | None:
    outcome, result = run_train(config)
    summary.outcomes.append(outcome)
    if result is not None:
        summary.trained = _trained(result)
    return result


def _infer_stage(
    stores: list[Where], model_uri: str, config: InferConfig, runtime: Runtime, summary: RunSummary
) -> None:
    config = runtime.configure(config)
    try:
        pinned, _ = pin_model_uri(model_uri, runtime.mlflow_uri)
    except ValueError as exc:  # no such model or alias: every slide fails with that reason
        detail = redact_text(str(exc))
        summary.outcomes += [
            StageOutcome("infer", s.name.removesuffix(".zarr"), "failed", detail=detail)
            for s in stores
        ]
        return
    summary.segmented_with = redact_uri(pinned)  # shown, not used
    summary.outcomes += [o for o, _ in run_infer(stores, pinned, config, runtime)]


@flow(name="segflow-ingest", task_runner=_runner())
def ingest_flow(
    sources: list[Location | SlideSource],
    ingest: IngestConfig = DEFAULT_INGEST,
    runtime: Runtime = DEFAULT_RUNTIME,
) -> RunSummary:
    """Ingest slides (files, folders of slides, `.csv` manifests of image/label pairs, or
    explicit pairs) into `<workdir>/stores`."""
    runtime = runtime.resolved()
    summary = RunSummary("ingest")
    _ingest_stage(sources, ingest, runtime, summary)
    return _finish(summary)


@flow(name="segflow-weights", task_runner=_runner())
def weights_flow(
    stores: list[Location],
    weights: WeightsConfig = DEFAULT_WEIGHTS,
    runtime: Runtime = DEFAULT_RUNTIME,
) -> RunSummary:
    """Weight maps of labelled stores (store paths, or folders of stores)."""
    runtime = runtime.resolved()
    summary = RunSummary("weights")
    labelled = labelled_stores(stores)
    summary.outcomes += [o for o, _ in run_weights(labelled, weights, runtime)]
    return _finish(summary)


@flow(name="segflow-bootstrap", task_runner=_runner())
def bootstrap_flow(
    stores: list[Location],
    bootstrap: BootstrapConfig = DEFAULT_BOOTSTRAP,
    runtime: Runtime = DEFAULT_RUNTIME,
    scribbles: Path | None = None,
) -> RunSummary:
    """Training labels for unlabelled stores (store paths, or folders of stores, of which the
    unlabelled ones), by one clustering network trained on all of them; guided by the stroke
    images in the folder `scribbles`, named after their stores (pipelines.scribbles)."""
    runtime = runtime.resolved()
    summary = RunSummary("bootstrap")
    unlabelled = ready_stores(stores, is_unlabelled, "is unlabelled (ingested without labels)")
    if scribbles is not None:
        imported = import_scribble_folder(scribbles, unlabelled)
        summary.outcomes += [
            StageOutcome("scribbles", r.name, r.status, r.seconds, r.store) for r in imported
        ]
    summary.outcomes += [o for o, _ in run_bootstrap(unlabelled, bootstrap, runtime)]
    return _finish(summary)


@flow(name="segflow-train", task_runner=_runner())
def train_flow(train: TrainConfig, runtime: Runtime = DEFAULT_RUNTIME) -> RunSummary:
    """Train, track and register a U-Net on the stores `train` names: stores, or folders of
    stores of which those with weight maps (and not named for validation) are trained on,
    by default those of `<workdir>/stores` (pipelines.training.stores)."""
    runtime = runtime.resolved()
    config = runtime.configure(train).with_storage(runtime.object_storage)
    # Expanded here too (training does it itself), so that the task's cache key names them.
    config = config.model_copy(update={"stores": training_stores(config)})
    summary = RunSummary("train")
    _train_stage(config, summary)
    return _finish(summary)


@flow(name="segflow-infer", task_runner=_runner())
def infer_flow(
    stores: list[Location] | None = None,
    archive: Location | None = None,
    model_uri: str = CHAMPION,
    infer: InferConfig = DEFAULT_INFER,
    ingest: IngestConfig = DEFAULT_INGEST,
    runtime: Runtime = DEFAULT_RUNTIME,
) -> RunSummary:
    """Segment stores with the model at `model_uri`, pinned to one version for the whole run.

    With `archive` (a folder of slides or a `.csv` manifest of image/label pairs), its slides
    are ingested first (only new or changed ones do any work), so a nightly run over an
    archive folder segments the slides that are new, and re-segments all of them when the
    champion has moved; every other slide is answered from the cache or the stage's own run
    key.
    """
    runtime = runtime.resolved()
    summary = RunSummary("infer")
    targets = find_stores(stores or [runtime.stores_dir]) if stores or archive is None else []
    if archive is not None:
        targets += _ingest_stage([archive], ingest, runtime, summary)
    _infer_stage(targets, model_uri, infer, runtime, summary)
    return _finish(summary)


def _split(labelled: list[Where], config: PipelineConfig) -> tuple[list[Where], list[Where]]:
    """(train, validation) stores: the configured ones, else the last `holdout` held out."""
    if config.train.stores or config.train.val_stores:
        return list(config.train.stores) or labelled, list(config.train.val_stores)
    if len(labelled) > config.holdout > 0:
        return labelled[: -config.holdout], labelled[-config.holdout :]
    return labelled, []


@flow(name="segflow-pipeline", task_runner=_runner())
def pipeline_flow(config: PipelineConfig, runtime: Runtime = DEFAULT_RUNTIME) -> RunSummary:
    """Ingest an archive, compute weight maps of its labelled slides, train and register a
    U-Net, and segment every slide with the champion that results."""
    runtime = runtime.resolved()
    summary = RunSummary("pipeline")
    if config.note:
        summary.notes.append(config.note)
    stores = _ingest_stage([config.archive], config.ingest, runtime, summary)
    labelled = sorted((s for s in stores if is_labelled(s)), key=str)
    pairs = run_weights(labelled, config.weights, runtime)
    summary.outcomes += [outcome for outcome, _ in pairs]
    weighted = [result.store for _, result in pairs if result is not None]
    train_stores, val_stores = _split(weighted, config)
    if train_stores:
        train = runtime.configure(
            config.train.model_copy(update={"stores": train_stores, "val_stores": val_stores})
        ).with_storage(runtime.object_storage)
        _train_stage(train, summary)
    else:
        note = "no labelled slide to train on; segmenting with the current champion"
        summary.outcomes.append(StageOutcome("train", TRAINING, "skipped", detail=note))
    champion = f"models:/{config.train.registered_model_name}@champion"
    _infer_stage(stores, champion, config.infer, runtime, summary)
    return _finish(summary)
