"""One stage of a flow run: submit its tasks (one per slide), wait, and turn states into outcomes.

Shared by every flow. A failed task becomes a "failed" outcome carrying its one-line error and
the other slides go on, unless the Dask scheduler was lost: then no other slide can run, and
the stage ends the flow with that one line. A cached result whose output has since gone
from disk (or from the registry) is recomputed with a refreshed cache instead of being trusted.
A result's URLs come back without credentials (flows.tasks.stored) and are reached again with
the run's object-storage settings (`reached`) before anything reads through them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from mlflow.exceptions import MlflowException
from prefect import Task
from prefect.futures import PrefectFuture, as_completed
from prefect.states import State
from pydantic import BaseModel

from flows import progress
from flows.outcomes import StageOutcome
from flows.tasks import bootstrap_task, infer_task, ingest_slide_task, train_task, weights_task
from pipelines.bootstrap import BOOTSTRAP_OUTPUT, BootstrapConfig, BootstrapResult
from pipelines.cluster import SchedulerLostError, dask_client
from pipelines.infer import SEGMENTATION_OUTPUT, InferConfig, InferResult, Segmenter
from pipelines.inference.report import seam_line
from pipelines.ingest import SLIDE_STORE, IngestConfig, IngestResult
from pipelines.location import ObjectStorageConfig, ObjectUrl, Where
from pipelines.redaction import redact_text
from pipelines.runtime import Runtime
from pipelines.services import mlflow_client
from pipelines.sources import SlideSource, name_clashes
from pipelines.training.config import TrainConfig
from pipelines.training.result import TrainResult
from pipelines.weightmaps import WEIGHT_MAPS, WeightsConfig, WeightsResult
from segcore.errors import one_line

#: The "slide" of the training task's outcome.
TRAINING = "training"


@dataclass(frozen=True)
class Call:
    """One task invocation: the slide it is about and its keyword arguments."""

    slide: str
    kwargs: dict[str, Any]


def failure_line(error: BaseException) -> str:
    """A stage's own message for bad input (it names the file); type and message otherwise.
    Shown in tables, artifacts and logs, so without credentials."""
    text = redact_text(one_line(error))
    if isinstance(error, ValueError) or text == type(error).__name__:
        return text
    return f"{type(error).__name__}: {text}"


def reached(result: Any, storage: ObjectStorageConfig) -> Any:
    """A task's result (or list of results) with each URL in it reaching object storage with
    `storage` for what it lacks (the keys and secrets `flows.tasks.stored` dropped)."""
    if isinstance(result, list):
        return [reached(item, storage) for item in result]
    if not isinstance(result, BaseModel):
        return result
    update = {
        name: replace(value, storage=value.storage.merged(storage))
        for name, value in result
        if isinstance(value, ObjectUrl)
    }
    return result.model_copy(update=update)


def run_tasks(
    stage: str,
    task: Task,
    calls: Sequence[Call],
    still_valid: Callable[[Any], bool],
    refresh: bool = False,
    at_once: int | None = None,
    storage: ObjectStorageConfig | None = None,
) -> list[tuple[StageOutcome, Any]]:
    """Run `task` once per call, up to `at_once` at a time (None: as the task runner allows);
    (outcome, result or None) per call, in order.

    `still_valid(result)` is asked of cached results only: False means their output is gone,
    and the task runs again with the cache refreshed. The URLs in results are reached with
    `storage` (the run's object-storage settings) first.
    """
    progress.stage_started(stage, len(calls))
    queue = [(index, refresh) for index in range(len(calls))]
    pending: dict[PrefectFuture, tuple[int, float]] = {}
    done: dict[int, tuple[StageOutcome, Any]] = {}
    while queue or pending:
        while queue and (at_once is None or len(pending) < at_once):
            index, fresh = queue.pop(0)
            future = task.with_options(refresh_cache=fresh).submit(**calls[index].kwargs)
            pending[future] = (index, time.perf_counter())
        future = next(as_completed(list(pending)))
        index, started = pending.pop(future)
        future.wait()
        state = future.state
        result = state.result(raise_on_failure=False)
        if isinstance(result, SchedulerLostError):
            raise result
        if storage is not None and state.is_completed():
            result = reached(result, storage)
        if state.is_completed() and state.name == "Cached" and not still_valid(result):
            queue.insert(0, (index, True))
            continue
        outcome = _outcome(stage, calls[index].slide, state, result, started)
        done[index] = (outcome, result if state.is_completed() else None)
        progress.task_finished(outcome)
    return [done[index] for index in range(len(calls))]


def _outcome(stage: str, slide: str, state: State, result: Any, started: float) -> StageOutcome:
    if not state.is_completed():
        return StageOutcome(stage, slide, "failed", detail=failure_line(result))
    if state.name == "Cached":
        return StageOutcome(stage, slide, "cached", store=getattr(result, "store", None))
    return StageOutcome(
        stage,
        slide,
        getattr(result, "status", "written"),
        # Stage results time themselves; training's does not, so take the task's wall time.
        seconds=float(getattr(result, "seconds", time.perf_counter() - started)),
        store=getattr(result, "store", None),
    )


def run_ingest(
    sources: Sequence[SlideSource], out_dir: Where, config: IngestConfig, runtime: Runtime
) -> list[tuple[StageOutcome, IngestResult | None]]:
    """Ingest each source into `out_dir`, one task per slide, on one Dask cluster."""

    clashes = name_clashes(sources)
    todo = [s for i, s in enumerate(sources) if i not in clashes]
    failed = {
        i: (StageOutcome("ingest", sources[i].name, "failed", detail=error), None)
        for i, error in clashes.items()
    }
    ran = iter([])
    if todo:
        with dask_client(runtime.configure(config).cluster) as client:
            calls = [
                Call(s.name, {"source": s, "out_dir": out_dir, "config": config, "client": client})
                for s in todo
            ]
            ran = iter(
                run_tasks(
                    "ingest",
                    ingest_slide_task,
                    calls,
                    SLIDE_STORE.holds,
                    config.overwrite,
                    storage=runtime.object_storage,
                )
            )
    return [failed[i] if i in failed else next(ran) for i in range(len(sources))]


def run_weights(
    stores: Sequence[Where], config: WeightsConfig, runtime: Runtime
) -> list[tuple[StageOutcome, WeightsResult | None]]:
    """Weight maps of each labelled store, one task per store, on one Dask cluster."""

    if not stores:
        return []
    with dask_client(runtime.configure(config).cluster) as client:
        calls = [_store_call(s, {"config": config, "client": client}) for s in stores]
        return run_tasks(
            "weights", weights_task, calls, WEIGHT_MAPS.holds, storage=runtime.object_storage
        )


def run_bootstrap(
    stores: Sequence[Where], config: BootstrapConfig, runtime: Runtime
) -> list[tuple[StageOutcome, BootstrapResult | None]]:
    """Bootstrap labels of unlabelled stores: one task for the archive (one network is
    trained on all of them), one outcome per store. A cached result is trusted while every
    store's labels it wrote are still the ones installed."""

    def still_valid(results: list[BootstrapResult]) -> bool:
        return all(r.status == "failed" or BOOTSTRAP_OUTPUT.holds(r) for r in results)

    if not stores:
        return []
    config = runtime.configure(config)
    with dask_client(config.cluster) as client:
        call = Call("archive", {"stores": list(stores), "config": config, "client": client})
        ((outcome, results),) = run_tasks(
            "bootstrap", bootstrap_task, [call], still_valid, storage=runtime.object_storage
        )
    if results is None:  # the archive as a whole failed (e.g. slides of mixed channels)
        return [(replace(outcome, slide=_store_call(s, {}).slide), None) for s in stores]
    cached = outcome.status == "cached"
    return [
        (
            StageOutcome(
                "bootstrap",
                r.name,
                "cached" if cached and r.status != "failed" else r.status,
                seconds=r.seconds,
                store=r.store,
                detail=r.error or "",
            ),
            r,
        )
        for r in results
    ]


def run_train(config: TrainConfig) -> tuple[StageOutcome, TrainResult | None]:
    """One training run (a single task: Lightning parallelises inside it)."""

    def still_valid(result: TrainResult) -> bool:
        return registered(result, config.resolved_tracking_uri)

    (pair,) = run_tasks(
        "train", train_task, [Call(TRAINING, {"config": config})], still_valid, config.resume
    )
    outcome, result = pair
    if result is not None:
        outcome = StageOutcome(
            "train",
            TRAINING,
            outcome.status,
            seconds=outcome.seconds,
            detail=f"MLflow run {result.run_id}, version {result.version}",
        )
    return outcome, result


def registered(result: TrainResult, tracking_uri: str) -> bool:
    """Whether the model version a training result names is still in the registry."""
    if result.registered_name is None or result.version is None:
        return False
    client = mlflow_client(tracking_uri)
    try:
        client.get_model_version(result.registered_name, result.version)
    except MlflowException:
        return False
    return True


def run_infer(
    stores: Sequence[Where], model_uri: str, config: InferConfig, runtime: Runtime
) -> list[tuple[StageOutcome, InferResult | None]]:
    """Segment each store with the (pinned) model, one task per slide, on one Dask cluster
    with one model session: the model is loaded, hashed and put on the workers once per run
    (by the first slide not answered from the cache), not once per slide.

    The stage itself decides whether a store's segmentation is current (its identity: input
    store, model digest and output-changing settings) and redoes it when not; a cached result
    is trusted only while the segmentation it wrote is still the one installed.
    """
    config = config.model_copy(update={"progress": False})

    if not stores:
        return []
    with (
        dask_client(runtime.configure(config).cluster) as client,
        Segmenter(model_uri, config, client) as segmenter,
    ):
        calls = [_store_call(s, {"segmenter": segmenter}) for s in stores]
        # One slide at a time: each already spreads its blocks over the whole cluster.
        pairs = run_tasks(
            "infer",
            infer_task,
            calls,
            SEGMENTATION_OUTPUT.holds,
            config.overwrite,
            at_once=1,
            storage=runtime.object_storage,
        )
    # The seam report of each slide segmented now goes into the tables and the artifact.
    return [
        (replace(o, detail=seam_line(r.seams)) if r is not None and r.seams else o, r)
        for o, r in pairs
    ]


def _store_call(store: Where, kwargs: dict[str, Any]) -> Call:
    return Call(store.name.removesuffix(".zarr"), {"store": store, **kwargs})
