"""The Prefect tasks: one per slide and stage (ingest, weights, infer), one for training and
one for the label bootstrap of an archive.

Each task calls the stage's library function and nothing else. Around it:
  - retries with exponential backoff for I/O trouble (a shared file system or object store
    hiccup, a Dask worker lost), never for bad input: a ValueError from a stage names a file
    and its problem, and would fail the same way again. Nor for a lost Dask scheduler: a task
    whose client lost it fails with one SchedulerLostError line (a ValueError too), since a
    retry on that client could only wait out its reconnect and fail again;
  - a cache key over the task's inputs (flows.cache_keys), so a re-run with unchanged inputs
    is answered from Prefect's result store without doing the work again. The flows refresh
    the cache where a setting asks for the work to be redone (`overwrite`, `resume`) or where
    a cached result's output is gone;
  - results without object-storage keys and secrets (`stored`): Prefect pickles them into its
    result storage. The flows reach their URLs again with the run's settings (flows.stages).
"""

from __future__ import annotations

from typing import TypeVar

from distributed import Client
from prefect import Task, task
from prefect.client.schemas.objects import TaskRun
from prefect.context import TaskRunContext
from prefect.states import State
from prefect.tasks import exponential_backoff
from pydantic import BaseModel

from flows.cache_keys import digest, file_identity, output_identity, place, settings_of
from pipelines.bootstrap import BootstrapConfig, BootstrapResult, bootstrap_archive
from pipelines.cluster import scheduler_kept
from pipelines.infer import InferResult, Segmenter
from pipelines.ingest import SLIDE_STORE, IngestConfig, IngestResult, SlideSource, ingest_slide
from pipelines.location import ObjectUrl, Where
from pipelines.scribbles import SCRIBBLES_OUTPUT
from pipelines.training.config import TrainConfig
from pipelines.training.result import TrainResult
from pipelines.weightmaps import WEIGHT_MAPS, WeightsConfig, WeightsResult, compute_weight_maps

ResultT = TypeVar("ResultT", bound=BaseModel)


def stored(result: ResultT) -> ResultT:
    """`result` as Prefect may store it: each URL or slide source in it without object-storage
    keys and secrets (endpoint and region kept)."""
    bare = {
        name: value.without_credentials()
        for name, value in result
        if isinstance(value, ObjectUrl | SlideSource)
    }
    return result.model_copy(update=bare)


def is_transient(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry unless the stage rejected its input (a ValueError: bad file, shape, model) or
    the task's Dask client lost its scheduler (SchedulerLostError, a ValueError as well)."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, BaseException) and not isinstance(error, ValueError)


_retrying = {
    "retries": 2,
    "retry_delay_seconds": exponential_backoff(backoff_factor=5),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": is_transient,
    "persist_result": True,
}


def _ingest_key(context: TaskRunContext, parameters: dict) -> str:
    source: SlideSource = parameters["source"]
    return digest(
        "ingest",
        file_identity(source.image),
        file_identity(source.labels),
        source.page,
        place(parameters["out_dir"]),
        settings_of(parameters["config"]),
    )


@task(
    name="ingest-slide", task_run_name="ingest {source.name}", cache_key_fn=_ingest_key, **_retrying
)
def ingest_slide_task(
    source: SlideSource, out_dir: Where, config: IngestConfig, client: Client | None
) -> IngestResult:
    """Ingest one slide into `<out_dir>/<name>.zarr`."""
    with scheduler_kept(client):
        return stored(ingest_slide(source, out_dir, config, client))


def _weights_key(context: TaskRunContext, parameters: dict) -> str:
    config: WeightsConfig = parameters["config"]
    return digest("weights", output_identity([parameters["store"]], SLIDE_STORE), config.settings())


@task(
    name="weight-maps",
    task_run_name="weights {store.name}",
    cache_key_fn=_weights_key,
    **_retrying,
)
def weights_task(store: Where, config: WeightsConfig, client: Client | None) -> WeightsResult:
    """Training target and weight map of one labelled store."""
    with scheduler_kept(client):
        return stored(compute_weight_maps(store, config, client))


def _bootstrap_key(context: TaskRunContext, parameters: dict) -> str:
    config: BootstrapConfig = parameters["config"]
    stores = parameters["stores"]
    return digest(
        "bootstrap",
        output_identity(stores, SLIDE_STORE),
        output_identity(stores, SCRIBBLES_OUTPUT),
        config.settings(),
    )


# One task for the archive: one clustering network is trained on all its slides. Not retried,
# like training: a rerun trains again, and its failures are rarely I/O.
@task(name="bootstrap", task_run_name="bootstrap", cache_key_fn=_bootstrap_key, persist_result=True)
def bootstrap_task(
    stores: list[Where], config: BootstrapConfig, client: Client | None
) -> list[BootstrapResult]:
    """Bootstrap labels of unlabelled stores: train one clustering network, label each store."""
    with scheduler_kept(client):
        return [stored(r) for r in bootstrap_archive(stores, config, client=client)]


def _train_key(context: TaskRunContext, parameters: dict) -> str:
    config: TrainConfig = parameters["config"]
    return digest(
        "train",
        # The store it goes to, however it was named (None and its sqlite URI are one store).
        settings_of(config, "tracking_uri"),
        config.resolved_tracking_uri,
        output_identity([*config.stores, *config.val_stores], WEIGHT_MAPS),
    )


# Training is not retried: a rerun starts a new MLflow run, and its failures are rarely I/O.
@task(name="train", task_run_name="train", cache_key_fn=_train_key, persist_result=True)
def train_task(config: TrainConfig) -> TrainResult:
    """Train, track and register one U-Net (its DDP ranks in a child process of their own)."""
    # Imported here: Lightning takes seconds to import, and only training needs it.
    from pipelines.train import run_training

    return stored(run_training(config))


def _infer_key(context: TaskRunContext, parameters: dict) -> str:
    segmenter: Segmenter = parameters["segmenter"]
    return digest(
        "infer",
        output_identity([parameters["store"]], SLIDE_STORE),
        segmenter.model_uri,
        settings_of(segmenter.config),
    )


@task(name="infer-slide", task_run_name="infer {store.name}", cache_key_fn=_infer_key, **_retrying)
def infer_task(store: Where, segmenter: Segmenter) -> InferResult:
    """Segment one slide store with the run's model session (opened by the first slide that
    is not answered from the cache, then shared by the others)."""
    return stored(segmenter.segment(store))
