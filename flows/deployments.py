"""Deployments of the flows, served by `segflow serve` (prefect.yaml describes the same ones for a
work pool): every stage and the pipeline on demand, and a nightly segmentation of the archive.

The nightly run is `infer_flow` over the archive folder with the registry's champion: the
champion alias is pinned to its version first, new slides are ingested, and only slides that
are new or whose segmentation came from another model do any work (the rest are answered by
the task cache or the infer stage's run key).
"""

from __future__ import annotations

from prefect import serve as prefect_serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

from flows.pipeline import (
    PipelineConfig,
    infer_flow,
    ingest_flow,
    pipeline_flow,
    train_flow,
    weights_flow,
)
from pipelines.runtime import Runtime

NIGHTLY = "nightly-infer"


def deployments(
    config: PipelineConfig, runtime: Runtime, cron: str, timezone: str = "UTC"
) -> list[RunnerDeployment]:
    """The deployments `segflow serve` offers, parameterised by `config` and `runtime`."""
    # Object-storage keys and secrets are not written into deployments (their JSON form is
    # `***`): a deployment's run takes them from the environment of the process serving it.
    run = runtime.model_dump(mode="json", exclude={"object_storage": {"key", "secret"}})
    champion = f"models:/{config.train.registered_model_name}@champion"
    stores = [str(runtime.stores_dir)]
    return [
        infer_flow.to_deployment(
            NIGHTLY,
            schedules=[Cron(cron, timezone=timezone)],
            parameters={
                "archive": str(config.archive),
                "model_uri": champion,
                "infer": config.infer.model_dump(mode="json"),
                "ingest": config.ingest.model_dump(mode="json"),
                "runtime": run,
            },
            description="Segment new slides of the archive, and all of them when the champion "
            "changed.",
            tags=["segflow", "nightly"],
        ),
        pipeline_flow.to_deployment(
            "pipeline",
            parameters={"config": config.model_dump(mode="json"), "runtime": run},
            description="Ingest, weight maps, train, register, segment.",
            tags=["segflow"],
        ),
        ingest_flow.to_deployment(
            "ingest",
            parameters={
                "sources": [str(config.archive)],
                "ingest": config.ingest.model_dump(mode="json"),
                "runtime": run,
            },
            tags=["segflow"],
        ),
        weights_flow.to_deployment(
            "weights",
            parameters={
                "stores": stores,
                "weights": config.weights.model_dump(mode="json"),
                "runtime": run,
            },
            tags=["segflow"],
        ),
        train_flow.to_deployment(
            "train",
            parameters={"train": _train_parameters(config, stores), "runtime": run},
            description="Train and register a U-Net on the stores with weight maps.",
            tags=["segflow"],
        ),
        infer_flow.to_deployment(
            "infer",
            parameters={
                "stores": stores,
                "model_uri": champion,
                "infer": config.infer.model_dump(mode="json"),
                "runtime": run,
            },
            tags=["segflow"],
        ),
    ]


def _train_parameters(config: PipelineConfig, stores: list[str]) -> dict:
    """The pipeline's training settings, on its stores when it names none: every store of the
    workdir with weight maps, found when the run starts (slides ingested since included). The
    tracking URI is the runtime's, so none (and no password) is stored in the deployment."""
    train = config.train.model_dump(mode="json") | {"tracking_uri": None}
    return train | {"stores": train["stores"] or stores}


def serve(config: PipelineConfig, runtime: Runtime, cron: str, embedded: bool) -> None:
    """Serve the deployments until interrupted; scheduled and manual runs execute here, one at
    a time (two runs segmenting the same stores would only wait on each other's locks).

    `embedded`: Prefect's temporary local server, which stops with this process, so there are
    no schedules to pause on the way out.
    """
    prefect_serve(*deployments(config, runtime, cron), limit=1, pause_on_shutdown=not embedded)
