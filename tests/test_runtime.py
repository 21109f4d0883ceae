"""The run's runtime: the environment read in one place, one default MLflow store for training
and inference, registry URIs pinned by one rule, and no process state left changed."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import prefect.settings
import pytest
import zarr
from mlflow import MlflowClient
from test_infer import make_store, smooth_image

from flows.console import quiet_logging
from flows.runtime import embedded_prefect_settings, prefect_dir
from pipelines.cluster import ClusterConfig
from pipelines.infer import InferConfig, infer_archive
from pipelines.location import ObjectStorageConfig, ObjectUrl
from pipelines.models import ModelNotFoundError, pin_model_uri
from pipelines.runtime import (
    Runtime,
    artifact_root,
    default_tracking_uri,
    sqlite_database,
)
from pipelines.training.config import TrainConfig
from pipelines.training.registry import log_and_register
from segcore.checkpoint import save_unet
from segcore.model import UNet

VARIABLES = ("MLFLOW_TRACKING_URI", "DASK_SCHEDULER_ADDRESS", "PREFECT_API_URL")
#: MLflow's own: its telemetry thread drops it, at a time of its choosing, when it cannot
#: reach its server.
TELEMETRY_SESSION = "_MLFLOW_TELEMETRY_SESSION_ID"


def _environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != TELEMETRY_SESSION}


@pytest.fixture
def clean_env(monkeypatch):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_the_runtime_reads_the_environment_where_it_is_resolved(clean_env, tmp_path):
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    clean_env.setenv("DASK_SCHEDULER_ADDRESS", "tcp://dask:8786")
    clean_env.setenv("PREFECT_API_URL", "http://prefect:4200/api")
    runtime = Runtime.from_environment(workdir=tmp_path / "work", tracking_uri=None)
    assert runtime.workdir == (tmp_path / "work").resolve()
    assert runtime.mlflow_uri == "http://mlflow:5000"
    assert runtime.scheduler_address == "tcp://dask:8786"
    assert runtime.prefect_api_url == "http://prefect:4200/api"
    given = Runtime.from_environment(workdir=tmp_path, scheduler_address="tcp://other:8786")
    assert given.scheduler_address == "tcp://other:8786"  # what is given wins
    # Built explicitly, a runtime reads nothing.
    explicit = Runtime(workdir=tmp_path)
    assert (explicit.tracking_uri, explicit.scheduler_address, explicit.prefect_api_url) == (
        None,
        None,
        None,
    )
    assert explicit.mlflow_uri == default_tracking_uri(tmp_path)


def test_unset_or_empty_variables_leave_a_run_embedded(clean_env, tmp_path):
    clean_env.setenv("MLFLOW_TRACKING_URI", "")
    runtime = Runtime.from_environment(workdir=tmp_path)
    assert runtime.tracking_uri is None and runtime.scheduler_address is None
    assert runtime.mlflow_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    # The embedded store named explicitly is the embedded store.
    named = Runtime.from_environment(workdir=tmp_path, tracking_uri=runtime.mlflow_uri)
    assert named.tracking_uri is None


def test_train_config_reads_no_environment(clean_env, tmp_path):
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    config = TrainConfig(stores=[tmp_path / "a.zarr"], workdir=tmp_path)
    assert config.tracking_uri is None
    assert config.resolved_tracking_uri == default_tracking_uri(tmp_path)
    assert config.artifact_location == (tmp_path.resolve() / "mlartifacts").as_uri()
    elsewhere = config.model_copy(update={"tracking_uri": f"sqlite:///{tmp_path}/db/x.db"})
    assert elsewhere.artifact_location == (tmp_path.resolve() / "db" / "mlartifacts").as_uri()
    server = config.model_copy(update={"tracking_uri": "http://127.0.0.1:5999"})
    assert server.artifact_location is None


def test_inference_finds_what_training_registers_by_default(clean_env, tmp_path):
    """Neither given a tracking URI, training registers in the default workdir's store and
    inference looks there (not in MLflow's own default), leaving the environment as it was."""
    clean_env.chdir(tmp_path)
    uri = TrainConfig().resolved_tracking_uri
    assert uri == Runtime().mlflow_uri == default_tracking_uri()
    assert uri == f"sqlite:///{tmp_path.resolve() / 'segflow-work/mlflow.db'}"
    before = _environment()
    model = UNet(3, 2, base_channels=4, depth=3, dropout=0.0).eval()
    save_unet(model, tmp_path / "model.pt")
    client = MlflowClient(uri)
    experiment = client.create_experiment("runtime", artifact_location=artifact_root(uri))
    run_id = client.create_run(experiment).info.run_id
    metadata = {"unet_config": model.config.to_dict()}
    log_and_register(uri, run_id, model, metadata, "unet", 0.5, tmp_path / "model.pt")
    store = make_store(tmp_path / "s.zarr", smooth_image((90, 100), seed=1))
    config = InferConfig(
        tile_size=92,
        batch_size=2,
        progress=False,
        cluster=ClusterConfig(n_workers=1, threads_per_worker=1, processes=False),
    )
    assert config.tracking_uri is None
    [result] = infer_archive([store], "models:/unet@champion", config)
    assert result.status == "written", result.error
    meta = zarr.open_group(store / "labels" / "segmentation", mode="r").attrs["segflow"]
    assert meta["model_version"] == "1"
    assert _environment() == before


@pytest.mark.parametrize(
    ("uri", "path"),
    [
        ("sqlite:////abs/x.db?mode=ro", Path("/abs/x.db")),
        ("sqlite:///rel/x.db", Path("rel/x.db")),
        ("sqlite:///x.db?mode=ro&cache=shared", Path("x.db")),
        ("sqlite:///:memory:", None),
        ("sqlite://", None),
        ("postgresql://u:p@db/mlflow", None),
        ("http://mlflow:5000", None),
    ],
)
def test_sqlite_database_of_a_uri(uri, path):
    assert sqlite_database(uri) == path


def test_artifacts_sit_beside_a_relative_database(clean_env, tmp_path):
    clean_env.chdir(tmp_path)
    assert artifact_root("sqlite:///db/x.db?mode=ro") == (tmp_path / "db/mlartifacts").as_uri()


@pytest.fixture
def registry(tmp_path) -> str:
    """A file-backed SQLite registry: model `unet` with versions 1..3, `champion` at 2."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("unet")
    for i in range(3):
        client.create_model_version("unet", source=str(tmp_path / f"m{i}"))
    client.set_registered_model_alias("unet", "champion", "2")
    return uri


def test_registry_uris_are_pinned_to_a_version(registry):
    before = _environment()
    assert pin_model_uri("models:/unet@champion", registry) == ("models:/unet/2", "2")
    assert pin_model_uri("models:/unet/latest", registry) == ("models:/unet/3", "3")
    assert pin_model_uri("models:/unet/1", registry) == ("models:/unet/1", "1")
    assert pin_model_uri("runs:/abc/model", registry) == ("runs:/abc/model", None)
    assert pin_model_uri("work/model.pt", registry) == ("work/model.pt", None)
    with pytest.raises(ModelNotFoundError, match="models:/unet@nobody: no such model version"):
        pin_model_uri("models:/unet@nobody", registry)
    with pytest.raises(ModelNotFoundError, match="models:/absent/latest: no such model version"):
        pin_model_uri("models:/absent/latest", registry)
    assert _environment() == before


def test_a_missing_store_is_not_created_by_a_lookup(clean_env, tmp_path):
    clean_env.chdir(tmp_path)  # the default store: <cwd>/segflow-work/mlflow.db
    with pytest.raises(ModelNotFoundError, match="no MLflow store"):
        pin_model_uri("models:/unet@champion")
    assert not (tmp_path / "segflow-work").exists()


def test_embedded_prefect_keeps_its_home_in_the_workdir(clean_env, tmp_path):
    runtime = Runtime(workdir=tmp_path)
    settings = embedded_prefect_settings(runtime)
    assert settings["PREFECT_HOME"] == str(tmp_path / "prefect")
    assert settings["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] == str(tmp_path / "prefect/storage")
    # What the user set is kept; a server's run has no embedded home or database.
    home = {prefect.settings.PREFECT_HOME: str(tmp_path / "mine")}
    with prefect.settings.temporary_settings(updates=home):
        assert "PREFECT_HOME" not in embedded_prefect_settings(runtime)
    server = Runtime(workdir=tmp_path, prefect_api_url="http://prefect:4200/api")
    assert embedded_prefect_settings(server).keys() == {
        "PREFECT_API_URL",
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH",
    }


@pytest.mark.parametrize("capturing", [False, True])
def test_quiet_logging_leaves_warning_capture_as_it_was(capturing):
    logging.captureWarnings(capturing)
    try:
        with quiet_logging(verbose=False):
            assert logging._warnings_showwarning is not None  # captured inside
        assert (logging._warnings_showwarning is not None) == capturing
    finally:
        logging.captureWarnings(False)


def test_a_runtime_configures_every_stage_by_one_rule(clean_env, tmp_path):
    from pipelines.ingest import IngestConfig
    from pipelines.weightmaps import WeightsConfig

    runtime = Runtime(workdir=tmp_path, scheduler_address="tcp://10.0.0.1:8786")
    infer = runtime.configure(InferConfig(batch_size=2))
    assert infer.tracking_uri == runtime.mlflow_uri == default_tracking_uri(tmp_path)
    assert infer.cluster.scheduler_address == "tcp://10.0.0.1:8786"
    # Only the services change: the stage's own settings, its cluster's included, stay.
    assert infer.batch_size == 2 and not infer.cluster.processes
    for config in (IngestConfig(), WeightsConfig()):
        configured = runtime.configure(config)
        assert configured.cluster.scheduler_address == "tcp://10.0.0.1:8786"
        assert configured.model_copy(update={"cluster": config.cluster}) == config
    train = runtime.configure(TrainConfig(max_steps=3))
    assert (train.workdir, train.resolved_tracking_uri) == (tmp_path, runtime.mlflow_uri)
    assert train.max_steps == 3
    embedded = Runtime(workdir=tmp_path).configure(WeightsConfig())
    assert embedded.cluster == WeightsConfig().cluster


def test_a_workdir_on_object_storage_stays_a_url_and_needs_a_tracking_uri(clean_env, tmp_path):
    clean_env.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    clean_env.setenv("AWS_SECRET_ACCESS_KEY", "from-env")
    given = ObjectStorageConfig(key="k")
    runtime = Runtime.from_environment(workdir="s3://lab/work", object_storage=given)
    assert runtime.workdir == ObjectUrl("s3", "lab/work")  # not resolved into a local path
    # Stores are reached with the run's settings: the given ones, the environment's for the rest.
    reached = runtime.stores_dir.storage
    assert (str(runtime.stores_dir), reached.key, reached.secret) == (
        "s3://lab/work/stores",
        "k",
        "from-env",
    )
    assert reached.endpoint_url == "http://127.0.0.1:9"
    assert runtime.tracking_store is None
    message = (
        "s3://lab/work: a workdir on object storage has no embedded MLflow store; "
        "give --tracking-uri or MLFLOW_TRACKING_URI"
    )
    with pytest.raises(ValueError, match=f"^{message}$"):
        _ = runtime.mlflow_uri
    with pytest.raises(ValueError, match="no embedded MLflow store"):
        runtime.configure(InferConfig())
    tracked = Runtime.from_environment(workdir="s3://lab/work", tracking_uri="http://m:5000")
    assert tracked.configure(InferConfig()).tracking_uri == "http://m:5000"
    # Prefect's database and task cache need a local disk: a folder in Prefect's home, one
    # per workdir URL, and nothing under the current directory.
    clean_env.chdir(tmp_path)
    home = {prefect.settings.PREFECT_HOME: str(tmp_path / "home")}
    with prefect.settings.temporary_settings(updates=home):
        folder = prefect_dir(runtime)
        assert folder.parent == tmp_path / "home" / "segflow"
        assert folder == prefect_dir(tracked) != prefect_dir(Runtime(workdir="s3://lab/other"))
        settings = embedded_prefect_settings(runtime)
    assert settings["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] == str(folder / "storage")
    assert list(tmp_path.iterdir()) == []
