"""Loading a model never runs code stored with it: registry and run URIs load only segflow's
torch.export format, and every pickled model is refused before a byte of it is unpickled.

The traps are real: a pickle-format PyTorch model and a cloudpickled python_function model
whose unpickling creates a file, in a real SQLite registry. `test_the_trap_springs_...` proves
that MLflow's own loader does run the payload, so the other tests can fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from test_cli import assert_one_line_error
from test_infer import make_store, smooth_image

from pipelines.models import ModelLoadError, load_model
from pipelines.pt2_weights import Pt2ArchiveError, pt2_state_dict
from pipelines.training.registry import log_and_register
from segcore.checkpoint import save_unet
from segcore.model import UNet
from segcore.store import SlideStore

SEGFLOW = Path(sys.executable).with_name("segflow")
REFUSED = "refused: pickle-serialized model ("


class Trap(torch.nn.Module):
    """A module whose unpickling creates `marker` (what `touch PWNED` would do)."""

    def __init__(self, marker: Path):
        super().__init__()
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


class PyfuncTrap(mlflow.pyfunc.PythonModel):
    """The same payload in a cloudpickled python_function model."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))

    def predict(self, context, model_input):
        return model_input


@dataclass(frozen=True)
class Registry:
    uri: str
    marker: Path
    run_id: str  # holds "evil" (pickled pytorch) and "pyfunc" (cloudpickled) models
    good: UNet  # registered as "unet" in segflow's own format
    good_run_id: str


def _fill(root: Path, uri: str, marker: Path) -> Registry:
    client = MlflowClient(uri)
    experiment = client.create_experiment("safety", artifact_location=str(root / "artifacts"))
    unet_config = UNet(3, 2, base_channels=4, depth=3, dropout=0.0).config.to_dict()
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.pytorch.log_model(
            Trap(marker),
            name="evil",
            serialization_format="pickle",
            metadata={"unet_config": unet_config},
            pip_requirements=["torch"],
            registered_model_name="evil-unet",
        )
        mlflow.pyfunc.log_model(
            name="pyfunc",
            python_model=PyfuncTrap(marker),
            metadata={"unet_config": unet_config},
            pip_requirements=["torch"],
        )
    client.set_registered_model_alias("evil-unet", "champion", "1")

    torch.manual_seed(3)
    good = UNet(3, 2, base_channels=4, depth=3, dropout=0.0).eval()
    weights = root / "good.pt"
    save_unet(good, weights)
    with mlflow.start_run(experiment_id=experiment) as good_run:
        pass
    metadata = {"unet_config": good.config.to_dict()}
    log_and_register(uri, good_run.info.run_id, good, metadata, "unet", 0.5, weights)
    return Registry(uri, marker, run.info.run_id, good, good_run.info.run_id)


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Registry:
    root = tmp_path_factory.mktemp("registry")
    marker = root / "PWNED"
    # The fluent logging API (and log_and_register) reads the process-wide URI, which
    # set_tracking_uri also writes to MLFLOW_TRACKING_URI: both are put back afterwards.
    with mock.patch.dict(os.environ):
        uri = f"sqlite:///{root / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)
        try:
            filled = _fill(root, uri, marker)
        finally:
            mlflow.set_tracking_uri(None)  # back to MLFLOW_TRACKING_URI as it was
    assert not marker.exists()  # logging never unpickles
    return filled


def test_the_trap_springs_in_mlflows_own_loader(registry):
    client = MlflowClient(registry.uri, registry_uri=registry.uri)
    local = client.get_model_version_download_uri("evil-unet", "1")  # a folder under root
    try:
        with pytest.raises(AttributeError):  # the payload ran and returned None, not a module
            mlflow.pytorch.load_model(local)
        assert registry.marker.exists()
    finally:
        registry.marker.unlink(missing_ok=True)


@pytest.mark.slow  # ~30 s: a fresh segflow process with its own Prefect server
def test_segflow_infer_refuses_a_pickled_champion_through_the_cli(registry, tmp_path):
    store = make_store(tmp_path / "s.zarr", smooth_image((64, 64), seed=1))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    done = subprocess.run(
        [
            str(SEGFLOW),
            "infer",
            str(store),
            "--model",
            "models:/evil-unet@champion",
            "--tracking-uri",
            registry.uri,
            "--workdir",
            str(tmp_path / "work"),
            "cluster.processes=false",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode != 0
    # The flow pins the alias to the version it names before any slide starts.
    assert_one_line_error(done.stderr, "models:/evil-unet/1: " + REFUSED)
    assert not registry.marker.exists()
    assert SlideStore.open(store).segmentation is None  # nothing written


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("models:/evil-unet@champion", "pytorch flavour, model.pth"),
        ("models:/evil-unet/1", "pytorch flavour, model.pth"),
        ("runs:/{run}/evil", "pytorch flavour, model.pth"),
        ("runs:/{run}/pyfunc", "python_function flavour"),
    ],
)
def test_pickled_models_are_refused_before_unpickling(registry, uri, fragment):
    uri = uri.format(run=registry.run_id)
    with pytest.raises(ModelLoadError) as refused:
        load_model(uri, tracking_uri=registry.uri)
    assert str(refused.value).startswith(f"{uri}: {REFUSED}")
    assert fragment in str(refused.value)
    assert not registry.marker.exists()


@pytest.mark.parametrize("uri", ["models:/unet/1", "runs:/{run}/model"])
def test_segflows_own_format_loads_its_weights_exactly(registry, uri):
    loaded = load_model(uri.format(run=registry.good_run_id), tracking_uri=registry.uri)
    state = registry.good.state_dict()
    assert loaded.state_dict().keys() == state.keys()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    x = torch.from_numpy(np.random.default_rng(0).uniform(0, 255, (1, 3, 60, 60)).astype("f4"))
    with torch.no_grad():
        assert torch.equal(loaded(x), registry.good(x))
    assert mlflow.get_tracking_uri() != registry.uri  # no process-wide setting changed


def _archive(registry: Registry, tmp_path: Path) -> Path:
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=MlflowClient(
            registry.uri, registry_uri=registry.uri
        ).get_model_version_download_uri("unet", "1")
        + "/data/model.pt2",
        dst_path=str(tmp_path),
        tracking_uri=registry.uri,
    )
    return Path(local)


def _rewritten(source: Path, target: Path, edit) -> Path:
    """A copy of the pt2 archive `source` with its weights config passed through `edit`."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for item in old.infolist():
            data = old.read(item)
            if item.filename.endswith("data/weights/model_weights_config.json"):
                config = json.loads(data)
                edit(config["config"])
                data = json.dumps(config).encode()
            new.writestr(item, data)
    return target


def test_an_archive_weight_stored_as_a_pickle_is_refused(registry, tmp_path):
    archive = _archive(registry, tmp_path)
    assert set(pt2_state_dict(archive)) == set(registry.good.state_dict())

    def pickled(config: dict) -> None:
        next(iter(config.values()))["use_pickle"] = True

    with pytest.raises(Pt2ArchiveError, match="stored as a pickle"):
        pt2_state_dict(_rewritten(archive, tmp_path / "pickled.pt2", pickled))

    def out_of_bounds(config: dict) -> None:
        next(iter(config.values()))["tensor_meta"]["storage_offset"] = {"as_int": 10**6}

    with pytest.raises(Pt2ArchiveError, match="unreadable pt2 archive"):
        pt2_state_dict(_rewritten(archive, tmp_path / "bounds.pt2", out_of_bounds))

    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    with pytest.raises(Pt2ArchiveError, match="unreadable pt2 archive"):
        pt2_state_dict(tmp_path / "junk.pt2")
