"""End to end: a few steps of a tiny U-Net, checked through the MLflow client and the loaders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from mlflow.tracking import MlflowClient
from scipy import ndimage
from train_stores import disk_store, synthetic_store, tiny_config

from pipelines.models import ModelLoadError, load_model
from pipelines.train import TrainConfig, TrainError, TrainResult, train
from pipelines.training.registry import CANDIDATE, CHAMPION, promote
from segcore.metrics import segmentation_scores
from segcore.store import SlideStore
from segcore.tiling import predict_tiled
from segcore.weights import target_of_separated


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[TrainConfig, TrainResult]:
    tmp = tmp_path_factory.mktemp("e2e")
    train_store = disk_store(tmp / "train.zarr", size=96, seed=0)
    val_store = disk_store(tmp / "val.zarr", size=72, seed=1)
    config = TrainConfig.model_validate(tiny_config(tmp, [train_store], [val_store]))
    return config, train(config)


@pytest.fixture(scope="module")
def client(run) -> MlflowClient:
    return MlflowClient(run[0].resolved_tracking_uri)


def test_run_logs_params_metrics_and_dataset(run, client):
    config, result = run
    assert result.global_step == config.max_steps == 6
    mlrun = client.get_run(result.run_id)
    assert mlrun.info.status == "FINISHED"
    params = mlrun.data.params
    assert params["model.base_channels"] == "4"
    assert params["optimizer.name"] == "adamw"
    assert int(params["tile.output"]) >= config.output_size
    assert len(json.loads(params["normalization.mean"])) == 1
    steps = sorted(m.step for m in client.get_metric_history(result.run_id, "train_loss"))
    assert len(steps) == 6 and steps[-1] == 5
    assert len(client.get_metric_history(result.run_id, "lr-AdamW")) == 6
    for name in ("val_iou", "val_dice", "val_pixel_error", "val_rand_error"):
        history = client.get_metric_history(result.run_id, name)
        assert len(history) == 2, name  # two epochs of 3 steps, validated at each end
        assert all(0.0 <= m.value <= 1.0 for m in history), name
    contexts = {(d.dataset.name, d.tags[0].value) for d in mlrun.inputs.dataset_inputs}
    assert contexts == {("train", "training"), ("val", "validation")}
    assert mlrun.data.tags["sys.torch"] == torch.__version__


def test_run_artifacts(run, client, tmp_path):
    config, result = run
    local = Path(client.download_artifacts(result.run_id, "", str(tmp_path)))
    saved = TrainConfig.model_validate(yaml.safe_load((local / "config.yaml").read_text()))
    assert saved == config
    records = json.loads((local / "dataset.json").read_text())
    assert [r["context"] for r in records] == ["training", "validation"]
    assert all(r["checksum"].startswith("sha256:") for r in records)
    assert json.loads((local / "system.json").read_text())["cpu_count"]
    overlays = sorted(p.name for p in (local / "val_overlay").iterdir())
    assert overlays == ["epoch_0000.png", "epoch_0001.png"]
    assert (local / "learning_curve.png").stat().st_size > 1000
    assert (local / "checkpoint" / "model.pt").exists()
    # MLflow 3 keeps logged models apart from run artifacts, linked as the run's outputs.
    assert len(client.get_run(result.run_id).outputs.model_outputs) == 1


def test_checkpoints_and_run_record(run):
    config, result = run
    run_dir = config.checkpoint_root / result.run_id
    assert json.loads((run_dir / "run.json").read_text())["run_id"] == result.run_id
    last = torch.load(run_dir / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6 and last["optimizer_states"]
    assert result.checkpoint.name.startswith("best-")


def test_version_registered_with_aliases(run, client):
    config, result = run
    name = config.registered_model_name
    assert result.version == "1" and result.became_champion
    for alias in (CANDIDATE, CHAMPION):
        assert str(client.get_model_version_by_alias(name, alias).version) == "1"
    version = client.get_model_version(name, "1")
    assert version.run_id == result.run_id
    assert float(version.tags["val_iou"]) == pytest.approx(result.metrics["best_val_iou"])


def test_loaded_models_agree_and_reproduce_validation(run):
    config, result = run
    uri = config.resolved_tracking_uri
    champion = load_model(f"models:/{config.registered_model_name}@{CHAMPION}", tracking_uri=uri)
    by_version = load_model(result.model_uri, tracking_uri=uri)
    from_file = load_model(result.weights)
    from_checkpoint = load_model(result.checkpoint)  # training-time weights, folded on load
    store = SlideStore.open(config.val_stores[0])
    image = np.asarray(store.image(0)[...])
    logits = predict_tiled(champion, image, tile_size=72)
    for other in (by_version, from_file, from_checkpoint):
        np.testing.assert_allclose(predict_tiled(other, image, tile_size=72), logits, atol=1e-4)
    # Inference on raw uint8 pixels scores what validation scored for the best checkpoint.
    scores = segmentation_scores(np.asarray(store.target[...]), logits.argmax(0))
    assert scores["iou"] == pytest.approx(result.metrics["best_val_iou"], abs=1e-6)


def test_unloadable_model_is_one_line_error(tmp_path):
    bad = tmp_path / "not-a-model.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="not-a-model.pt") as info:
        load_model(bad)
    assert "\n" not in str(info.value)


def test_champion_moves_only_to_a_better_version(run, client):
    name = "promotion-test"
    client.create_registered_model(name)
    versions = [client.create_model_version(name, source=f"/tmp/m{i}").version for i in range(4)]
    assert promote(client, name, versions[0], 0.5)
    assert not promote(client, name, versions[1], 0.4)
    assert not promote(client, name, versions[2], float("nan"))
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == str(versions[0])
    assert str(client.get_model_version_by_alias(name, CANDIDATE).version) == str(versions[2])
    assert promote(client, name, versions[3], 0.6)
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == str(versions[3])


def test_two_trainings_in_one_process_keep_to_their_own_stores(tmp_path, monkeypatch):
    """Nothing of the first run's tracking leaks into the process: the second training, with
    another workdir, logs and registers in its own MLflow store, and the environment is as it
    was after each (MLflow's set_tracking_uri writes MLFLOW_TRACKING_URI)."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    train_store = disk_store(tmp_path / "train.zarr", size=96, seed=0)
    before = (dict(os.environ), mlflow.get_tracking_uri())
    results = []
    for name in ("first", "second"):
        overrides = {"workdir": str(tmp_path / name), "max_steps": 2, "steps_per_epoch": 2}
        config = TrainConfig.model_validate(tiny_config(tmp_path, [train_store], [], **overrides))
        results.append((config, train(config)))
        assert (dict(os.environ), mlflow.get_tracking_uri()) == before
    for config, result in results:
        client = MlflowClient(config.resolved_tracking_uri)
        assert client.get_run(result.run_id).info.status == "FINISHED"
        versions = client.search_model_versions(f"name='{config.registered_model_name}'")
        assert [int(v.version) for v in versions] == [1]  # each store registered its own


def test_rgb_models_keep_their_stain_statistics_and_grey_refuses_stain_jitter(tmp_path):
    rgb = synthetic_store(tmp_path / "rgb.zarr", size=96)
    jitter = {"stain_sigma": 0.05, "stain_bias": 0.02}
    config = TrainConfig.model_validate(
        tiny_config(tmp_path, [rgb], [], max_steps=2, augment=jitter)
    )
    result = train(config)
    stain = torch.load(result.weights, weights_only=True)["metadata"]["input"]["stain_statistics"]
    # Synthetic H&E: haematoxylin-dark nuclei on eosin-pink tissue.
    assert stain["h_mean"] > 0 and stain["e_mean"] > 0 and 0 < stain["tissue_fraction"] <= 1
    params = MlflowClient(config.resolved_tracking_uri).get_run(result.run_id).data.params
    assert float(params["stain.h_mean"]) == pytest.approx(stain["h_mean"], rel=1e-6)

    grey = disk_store(tmp_path / "grey.zarr", size=96, seed=0)
    config = TrainConfig.model_validate(tiny_config(tmp_path / "g", [grey], [], augment=jitter))
    with pytest.raises(ValueError, match="stain jitter .* needs RGB images, got 1 channel"):
        train(config)


def three_class_store(path: Path, seed: int, size: int) -> Path:
    """A disk store whose target is background / interior / boundary, recorded as the weights
    stage records it (its cells are the binary target's components, already separated)."""
    disk_store(path, size=size, seed=seed)
    group = zarr.open_group(path / "training", mode="r+")
    cells, _ = ndimage.label(group["target"][...])
    group["target"][...] = target_of_separated(cells, "cells+boundaries", boundary_width=1)
    group.attrs["segflow"] = {"classes": ["background", "cell", "boundary"]}
    return path


@pytest.mark.slow
def test_three_class_stores_train_a_three_class_model_with_its_classes(tmp_path):
    train_store = three_class_store(tmp_path / "train.zarr", seed=0, size=96)
    val_store = three_class_store(tmp_path / "val.zarr", seed=1, size=72)
    steps = {"max_steps": 2, "steps_per_epoch": 2}
    config = TrainConfig.model_validate(tiny_config(tmp_path, [train_store], [val_store], **steps))
    result = train(config)
    metadata = torch.load(result.weights, weights_only=True)["metadata"]
    assert metadata["classes"] == ["background", "cell", "boundary"]
    assert metadata["unet_config"]["n_classes"] == 3
    # The champion is picked on the foreground (class > 0), comparable with binary models.
    assert 0.0 <= result.metrics["best_val_iou"] <= 1.0
    model = load_model(result.model_uri, tracking_uri=config.resolved_tracking_uri)
    assert model.config.n_classes == 3


def test_stores_and_config_must_agree_on_the_classes(tmp_path):
    train_store = three_class_store(tmp_path / "train.zarr", seed=0, size=96)
    steps = {"max_steps": 2, "steps_per_epoch": 2}
    binary = disk_store(tmp_path / "binary.zarr", size=96, seed=2)
    mixed = tiny_config(tmp_path / "m", [train_store, binary], [], **steps)
    with pytest.raises(TrainError, match="stores disagree on the target's classes"):
        train(TrainConfig.model_validate(mixed))
    contradicting = tiny_config(tmp_path / "c", [train_store], [], **steps)
    contradicting["model"] = {**contradicting["model"], "n_classes": 2}
    with pytest.raises(TrainError, match="model.n_classes is 2 but the stores' target has 3"):
        train(TrainConfig.model_validate(contradicting))
