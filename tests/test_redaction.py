"""Credentials never leave segflow: the redaction rule, and the places that print or log URIs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from flow_helpers import prefect_api
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from train_stores import disk_store, tiny_config

from flows.cli import main
from pipelines.redaction import redact_text, redact_tree, redact_uri
from pipelines.training.config import TrainConfig
from pipelines.training.tracking import log_run_start
from segcore.synthetic import write_synthetic_slide

SECRET = "s3cr%2Fet"


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("https://alice:s3cret@mlflow.example.org", "https://alice:***@mlflow.example.org"),
        (
            "https://alice:s3cret@mlflow.example.org:8443/prefix/?experiment=1#top",
            "https://alice:***@mlflow.example.org:8443/prefix/?experiment=1#top",
        ),
        (
            "postgresql://mlflow:pw@db:5432/mlflow?sslmode=require",
            "postgresql://mlflow:***@db:5432/mlflow?sslmode=require",
        ),
        (
            "postgresql+psycopg2://user:p%40ss%3Aword@db/mlflow",
            "postgresql+psycopg2://user:***@db/mlflow",
        ),
        # An unencoded "@" in the password: the host is after the last one.
        ("mysql://root:p@ss@db:3306/x", "mysql://root:***@db:3306/x"),
        ("s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/key", "s3://AKIAEXAMPLE:***@bucket/key"),
        ("https://[::1]:5000", "https://[::1]:5000"),
        ("https://u:pw@[::1]:5000/api", "https://u:***@[::1]:5000/api"),
        (
            "https://bucket.s3.amazonaws.com/model.pt?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            "&X-Amz-Credential=AKIA%2F20250101&X-Amz-Signature=abc123&X-Amz-Expires=60",
            "https://bucket.s3.amazonaws.com/model.pt?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            "&X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Expires=60",
        ),
        (
            "https://acct.blob.core.windows.net/c/m.pt?sv=2022-11-02&sig=Zm9v%3D&se=2030",
            "https://acct.blob.core.windows.net/c/m.pt?sv=2022-11-02&sig=***&se=2030",
        ),
        ("http://host/api?token=t0k&a=b%20c", "http://host/api?token=***&a=b%20c"),
        (
            "http://host/?access_token=x&api_key=y&apikey=z",
            "http://host/?access_token=***&api_key=***&apikey=***",
        ),
        ("http://host/?PASSWORD=x&Client_Secret=y", "http://host/?PASSWORD=***&Client_Secret=***"),
        ("http://host/cb#access_token=abc&state=1", "http://host/cb#access_token=***&state=1"),
        (
            "postgresql://db/mlflow?user=u&password=pw&sslpassword=k",
            "postgresql://db/mlflow?user=u&password=***&sslpassword=***",
        ),
        (
            "sqlite:////data/work/mlflow.db?password=x",
            "sqlite:////data/work/mlflow.db?password=***",
        ),
    ],
)
def test_redact_uri_masks_secrets(uri, expected):
    assert redact_uri(uri) == expected
    assert redact_uri(expected) == expected  # idempotent: already redacted stays so


@pytest.mark.parametrize(
    "uri",
    [
        "sqlite:////tmp/work/mlflow.db",  # urlunsplit would drop a slash: returned as given
        "sqlite:///relative.db",
        "http://127.0.0.1:5000",
        "http://alice@mlflow:5000",  # a user name alone is no secret
        "http://alice:@mlflow:5000",  # nor an empty password
        "tcp://dask-scheduler:8786",
        "tls://dask-scheduler:8786",
        "models:/segflow-unet@champion",
        "runs:/0123abcd/model",
        "file:///data/segflow-work/mlartifacts",
        "http://host/?keyword=a&monkey=b&password=",  # empty value: nothing to hide
        "/data/archive/slide 1.svs",
        "segflow-work",
        "",
    ],
)
def test_redact_uri_keeps_what_is_not_secret(uri):
    assert redact_uri(uri) == uri


def test_unreadable_uri_hides_everything_after_the_scheme():
    # urllib refuses an unbalanced IPv6 bracket; what follows may hold a password.
    assert redact_uri("http://user:pw@[::1/x") == "http://***"


def test_redact_text_finds_every_uri_in_a_message():
    message = (
        "cannot reach 'https://alice:s3cret@mlflow:5000/api' nor "
        "postgresql://u:pw@db/mlflow (timeout); see https://docs.example.org/?q=a."
    )
    assert redact_text(message) == (
        "cannot reach 'https://alice:***@mlflow:5000/api' nor "
        "postgresql://u:***@db/mlflow (timeout); see https://docs.example.org/?q=a."
    )
    assert redact_text("no URI here: a=b password") == "no URI here: a=b password"


def test_redact_tree_walks_nested_config():
    tree = {
        "tracking_uri": "https://u:pw@h",
        "stores": ["/a.zarr", "s3://k:sec@b/c.zarr"],
        "model": {"depth": 5, "uri": "http://h/?token=t"},
        "resume": False,
        "lr": 0.01,
        "none": None,
    }
    assert redact_tree(tree) == {
        "tracking_uri": "https://u:***@h",
        "stores": ["/a.zarr", "s3://k:***@b/c.zarr"],
        "model": {"depth": 5, "uri": "http://h/?token=***"},
        "resume": False,
        "lr": 0.01,
        "none": None,
    }
    assert tree["tracking_uri"] == "https://u:pw@h"  # the input is left alone


def test_training_logs_no_credentials(tmp_path):
    """log_run_start, as training calls it, into a real MLflow store: the config it records
    (params and config.yaml) names the credentialed tracking URI without its password."""
    store = disk_store(tmp_path / "train.zarr", size=64, seed=0)
    config = TrainConfig.model_validate(
        {
            **tiny_config(tmp_path, [store], []),
            "tracking_uri": f"https://alice:{SECRET}@mlflow.example.org/?token=t0k3n",
        }
    )
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("redaction", (tmp_path / "mlartifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id

    log_run_start(client, run_id, config, {"tile": {"input": 92}}, resumed=False)

    params = client.get_run(run_id).data.params
    assert params["tracking_uri"] == "https://alice:***@mlflow.example.org/?token=***"
    assert params["tile.input"] == "92"
    local = Path(client.download_artifacts(run_id, "", str(tmp_path / "artifacts")))
    saved = yaml.safe_load((local / "config.yaml").read_text())
    assert saved["tracking_uri"] == params["tracking_uri"]
    assert saved["max_steps"] == config.max_steps  # the rest is the config as given
    logged = json.dumps(params) + "".join(p.read_text() for p in local.iterdir())
    assert SECRET not in logged and "t0k3n" not in logged
    assert config.tracking_uri.startswith(f"https://alice:{SECRET}@")  # training keeps it


@pytest.mark.integration
@pytest.mark.slow  # ~25 s, most of it starting a Prefect server
def test_cli_prints_the_tracking_uri_without_its_password(tmp_path, capsys):
    """`segflow ingest` with a credentialed --tracking-uri (ingest never contacts MLflow): the
    summary names the server, the password appears nowhere on the terminal or in Prefect."""
    archive = tmp_path / "archive"
    archive.mkdir()
    write_synthetic_slide(archive / "s.tif", tmp_path / "truth.tif", 128, 128, seed=1)
    uri = "https://alice:s3cret@mlflow.example.org/?token=t0k3n"
    argv = ["ingest", str(archive), "chunk_size=128", "min_level_size=64"]
    argv += ["cluster.processes=false", "--workdir", str(tmp_path / "w"), "--tracking-uri", uri]
    with prefect_api():
        status = main(argv)
        with get_client(sync_client=True) as client:
            recorded = json.dumps([run.parameters for run in client.read_flow_runs()])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "MLflow: https://alice:***@mlflow.example.org/?token=***" in out.splitlines()
    assert "s3cret" not in out + err and "t0k3n" not in out + err
    # Prefect's own record of the run's parameters (its database, UI and API) neither.
    assert "https://alice:***@mlflow.example.org" in recorded
    assert "s3cret" not in recorded and "t0k3n" not in recorded
