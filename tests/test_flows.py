"""The Prefect flows on real stores, a real Prefect API (a temporary local server), a real
MLflow store (SQLite) and a real Dask cluster: a corrupt slide fails alone, a re-run with
nothing changed does no stage work, and a new champion re-segments every slide."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml
import zarr
from flow_helpers import TINY, prefect_api, tiny_archive
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.states import Failed
from train_stores import synthetic_store

from flows.cache_keys import digest, file_identity, settings_of
from flows.deployments import NIGHTLY, deployments
from flows.outcomes import RunSummary, StageOutcome
from flows.pipeline import (
    PipelineConfig,
    infer_flow,
    ingest_flow,
    labelled_stores,
    pipeline_flow,
    train_flow,
    weights_flow,
)
from flows.runner import run_flow
from flows.tasks import infer_task, ingest_slide_task, is_transient, train_task
from pipelines.config import load_config
from pipelines.infer import SEGMENTATION_OUTPUT
from pipelines.ingest import IngestConfig, IngestError
from pipelines.runtime import Runtime
from pipelines.train import TrainConfig
from segcore.store import SlideStore, StoreError


@pytest.fixture(autouse=True)
def own_tracking_uri(monkeypatch):
    """Each test talks to its own MLflow store: training sets MLFLOW_TRACKING_URI in the
    process environment (mlflow.set_tracking_uri), which must not leak into the next test."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_api():
        yield


def flow_run_state(flow_run_id) -> str:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state.type.value


def artifact_markdown(flow_run_id, key: str) -> str:
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
        )
    assert len(artifacts) == 1
    return artifacts[0].data


def by_stage(summary: RunSummary) -> dict[tuple[str, str], StageOutcome]:
    return {(o.stage, o.slide): o for o in summary.outcomes}


@pytest.mark.integration
def test_pipeline_isolates_a_corrupt_slide_and_reruns_without_work(
    tmp_path, prefect_server, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # anything a library writes to its cwd stays out of the repo
    archive = tiny_archive(tmp_path / "archive")
    runtime = Runtime(workdir=tmp_path / "work").resolved()
    config = load_config(PipelineConfig, None, [f"archive={archive}", *TINY])

    first = run_flow(pipeline_flow, runtime, config=config)
    outcomes = by_stage(first.summary)
    # The corrupt slide fails its own ingest task, and only that.
    assert outcomes["ingest", "broken"].failed
    assert "broken.tif" in outcomes["ingest", "broken"].detail
    assert [o.slide for o in first.summary.failures] == ["broken"]
    # The others go all the way; the unlabelled one is segmented but gets no weight maps.
    for slide in "abc":
        assert outcomes["ingest", slide].status == "written"
        assert outcomes["infer", slide].status == "written"
        store = SlideStore.open(runtime.stores_dir / f"{slide}.zarr")
        assert store.segmentation is not None and store.instances is not None
    assert {s for st, s in outcomes if st == "weights"} == {"a", "b"}
    assert outcomes["train", "training"].status == "written"
    assert first.summary.trained is not None and first.summary.trained.champion
    assert first.summary.segmented_with == f"models:/segflow-unet/{first.summary.trained.version}"
    # The flow run ends Failed, and its artifact lists every slide with the failure.
    assert flow_run_state(first.flow_run_id) == "FAILED"
    markdown = artifact_markdown(first.flow_run_id, "segflow-pipeline")
    assert "| broken | **FAILED**" in markdown
    assert all(f"| {slide} | written" in markdown for slide in "abc")
    assert first.summary.trained.run_id in markdown

    mlflow = MlflowClient(runtime.mlflow_uri)
    experiment = mlflow.get_experiment_by_name("segflow-unet")
    runs_before = mlflow.search_runs([experiment.experiment_id])
    versions_before = mlflow.search_model_versions("name='segflow-unet'")
    segmentation = runtime.stores_dir / "a.zarr" / "labels" / "segmentation"
    written_at = segmentation.stat().st_mtime_ns

    second = run_flow(pipeline_flow, runtime, config=config)
    redone = [o for o in second.summary.outcomes if o.status not in ("cached", "skipped")]
    assert [(o.stage, o.slide) for o in redone] == [("ingest", "broken")]  # failed again
    assert len(mlflow.search_runs([experiment.experiment_id])) == len(runs_before)
    assert len(mlflow.search_model_versions("name='segflow-unet'")) == len(versions_before)
    assert segmentation.stat().st_mtime_ns == written_at

    # A cached result whose output is gone is not trusted: that slide is segmented again.
    shutil.rmtree(runtime.stores_dir / "b.zarr" / "labels" / "segmentation")
    third = by_stage(run_flow(pipeline_flow, runtime, config=config).summary)
    assert third["infer", "b"].status == "written"
    assert SlideStore.open(runtime.stores_dir / "b.zarr").segmentation is not None
    assert third["infer", "a"].status == "cached"


@pytest.mark.integration
def test_infer_flow_resegments_when_the_champion_changes(tmp_path, prefect_server, monkeypatch):
    monkeypatch.chdir(tmp_path)
    archive = tiny_archive(tmp_path / "archive")
    (archive / "broken.tif").unlink()
    runtime = Runtime(workdir=tmp_path / "work").resolved()
    config = load_config(PipelineConfig, None, [f"archive={archive}", *TINY])
    ingest = config.ingest

    nightly = run_flow(infer_flow, runtime, archive=archive, ingest=ingest, infer=config.infer)
    # No model registered yet: every slide fails with the reason, nothing is written.
    assert {o.stage for o in nightly.summary.failures} == {"infer"}
    assert "segflow-unet@champion" in nightly.summary.failures[0].detail

    stores = [runtime.stores_dir / f"{name}.zarr" for name in "ab"]
    run_flow(pipeline_flow, runtime, config=config)
    train = TrainConfig.model_validate({**config.train.model_dump(), "stores": stores, "seed": 7})
    retrained = run_flow(train_flow, runtime, train=train).summary.trained
    MlflowClient(runtime.mlflow_uri).set_registered_model_alias(
        "segflow-unet", "champion", retrained.version
    )

    nightly = run_flow(infer_flow, runtime, archive=archive, ingest=ingest, infer=config.infer)
    outcomes = by_stage(nightly.summary)
    assert nightly.summary.segmented_with == f"models:/segflow-unet/{retrained.version}"
    assert {outcomes["ingest", s].status for s in "abc"} == {"cached"}
    assert {outcomes["infer", s].status for s in "abc"} == {"written"}
    recorded = SlideStore.open(stores[0]).group["labels/segmentation"].attrs["segflow"]
    assert recorded["model_uri"] == f"models:/segflow-unet/{retrained.version}"

    again = run_flow(infer_flow, runtime, archive=archive, ingest=ingest, infer=config.infer)
    assert {o.status for o in again.summary.outcomes} == {"cached"}

    # How the work runs is not an output setting: nothing is redone.
    faster = config.infer.model_copy(update={"max_in_flight": 3})
    again = run_flow(infer_flow, runtime, archive=archive, ingest=ingest, infer=faster)
    assert {o.status for o in again.summary.outcomes} == {"cached"}
    # One that changes the labels written re-segments every slide.
    diagonal = config.infer.model_copy(update={"connectivity": 2})
    redone = run_flow(infer_flow, runtime, archive=archive, ingest=ingest, infer=diagonal)
    assert {by_stage(redone.summary)["infer", s].status for s in "abc"} == {"written"}
    assert SEGMENTATION_OUTPUT.recorded(stores[0]).settings["connectivity"] == 2


def test_cache_keys_follow_inputs_and_settings_only(tmp_path):
    slide = tmp_path / "s.tif"
    slide.write_bytes(b"pixels")
    config = IngestConfig()

    def key(config: IngestConfig) -> str:
        return digest("ingest", file_identity(slide), settings_of(config))

    base = key(config)
    assert key(config.model_copy()) == base
    # Where and how the work runs, and "redo it" switches, are not inputs.
    assert key(config.model_copy(update={"parallel_slides": 7, "overwrite": True})) == base
    cluster = config.cluster.model_copy(update={"n_workers": 9})
    assert key(config.model_copy(update={"cluster": cluster})) == base
    assert key(config.model_copy(update={"chunk_size": 512})) != base
    os.utime(slide, ns=(1, 1))
    assert key(config) != base


def test_summary_markdown_has_a_row_per_slide_and_names_failures():
    summary = RunSummary(
        "infer",
        [
            StageOutcome("infer", "s1", "written", seconds=2.0),
            StageOutcome("infer", "s2", "failed", detail="s2.zarr: model expects 1 channel | 3"),
        ],
        segmented_with="models:/m/3",
    )
    markdown = summary.markdown()
    assert "infer: 2 slide(s), 1 failed (s2)" in markdown
    assert "| s1 | written | 2.0 |" in markdown
    assert "| s2 | **FAILED** |" in markdown
    assert "expects 1 channel \\| 3" in markdown  # a pipe in a message cannot break the table
    assert "models:/m/3" in markdown


def test_deployments_include_a_nightly_infer_with_valid_parameters(tmp_path):
    config = load_config(PipelineConfig, None, [f"archive={tmp_path}"])
    runtime = Runtime(workdir=tmp_path / "work").resolved()
    built = {d.name: d for d in deployments(config, runtime, "30 1 * * *")}
    assert set(built) == {NIGHTLY, "pipeline", "ingest", "weights", "train", "infer"}
    nightly = built[NIGHTLY]
    assert [s.schedule.cron for s in nightly.schedules] == ["30 1 * * *"]
    assert nightly.parameters["model_uri"] == "models:/segflow-unet@champion"
    # The parameters validate against the flows' typed signatures, as Prefect checks them.
    infer_flow.validate_parameters(nightly.parameters)
    pipeline_flow.validate_parameters(built["pipeline"].parameters)
    # Training runs as shipped, on the workdir's stores, without a password in its parameters.
    train = train_flow.validate_parameters(built["train"].parameters)["train"]
    assert train.stores == [runtime.stores_dir] and train.tracking_uri is None


def test_prefect_yaml_deployments_point_at_the_flows_with_valid_parameters():
    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "prefect.yaml").read_text())
    flows = {f.fn.__name__: f for f in (infer_flow, pipeline_flow, train_flow)}
    flows |= {"ingest_flow": ingest_flow, "weights_flow": weights_flow}
    names = set()
    for deployment in spec["deployments"]:
        path, _, name = deployment["entrypoint"].partition(":")
        assert path == "flows/pipeline.py"
        names.add(deployment["name"])
        flows[name].validate_parameters(deployment["parameters"])
    assert names == {NIGHTLY, "pipeline", "ingest", "weights", "train", "infer"}
    (nightly,) = [d for d in spec["deployments"] if d["name"] == NIGHTLY]
    assert nightly["schedules"][0]["cron"] and nightly["work_pool"]["name"] == "segflow"


def test_io_errors_are_retried_bad_input_is_not():
    assert is_transient(ingest_slide_task, None, Failed(data=OSError("stale NFS handle")))
    assert is_transient(infer_task, None, Failed(data=TimeoutError("worker lost")))
    assert not is_transient(ingest_slide_task, None, Failed(data=IngestError("x.tif: corrupt")))
    assert ingest_slide_task.retries == 2 and infer_task.retries == 2
    assert train_task.retries == 0  # a rerun would start a second MLflow run


def test_weight_maps_of_a_folder_are_those_of_its_labelled_stores(tmp_path):
    folder = tmp_path / "stores"
    labelled = synthetic_store(folder / "a.zarr", size=64)
    zarr.open_group(labelled, mode="a").create_array(
        "labels/annotations/0", shape=(64, 64), dtype="uint32"
    )
    plain = synthetic_store(folder / "b.zarr", size=64)  # no annotations
    broken = synthetic_store(folder / "c.zarr", size=64)
    (broken / "zarr.json").write_text("{not json")
    # The unreadable store stays, so its own task fails and names the problem.
    assert labelled_stores([folder]) == [labelled, broken]
    assert labelled_stores([plain]) == [plain]  # named directly: kept, fails in its task
    shutil.rmtree(labelled)
    shutil.rmtree(broken)
    with pytest.raises(StoreError, match=f"^{folder}: none of its 1 store"):
        labelled_stores([folder])
