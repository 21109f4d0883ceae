"""Inference from the MLflow registry: an alias is pinned to the version it points at."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch
import zarr
from test_infer import make_store, smooth_image

from pipelines.cluster import ClusterConfig, dask_client
from pipelines.infer import InferConfig, infer_slide
from pipelines.inference.source import resolve_model
from pipelines.models import ModelLoadError
from pipelines.training.registry import log_and_register
from segcore.checkpoint import save_unet
from segcore.model import UNet


def _register(tracking_uri: str, tmp_path, seed: int, val_iou: float) -> UNet:
    torch.manual_seed(seed)
    model = UNet(3, 2, base_channels=4, depth=3, dropout=0.0).eval()
    weights = tmp_path / f"model-{seed}.pt"
    save_unet(model, weights)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("infer-test")
    with mlflow.start_run() as run:
        run_id = run.info.run_id
    metadata = {"unet_config": model.config.to_dict()}
    log_and_register(tracking_uri, run_id, model, metadata, "unet", val_iou, weights)
    return model


@pytest.mark.slow
def test_champion_alias_is_pinned_and_recorded(tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = _register(tracking_uri, tmp_path, seed=1, val_iou=0.5)
    second = _register(tracking_uri, tmp_path, seed=2, val_iou=0.7)
    source = resolve_model("models:/unet@champion", tracking_uri)
    assert source.version == "2"
    assert source.digest == resolve_model(tmp_path / "model-2.pt").digest
    assert source.digest != resolve_model(tmp_path / "model-1.pt").digest
    for a, b in zip(source.build().parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)
    assert first is not second

    store = make_store(tmp_path / "s.zarr", smooth_image((90, 100), seed=1))
    config = InferConfig(tile_size=92, batch_size=2, progress=False, tracking_uri=tracking_uri)
    with dask_client(ClusterConfig(n_workers=1, threads_per_worker=1, processes=False)) as client:
        result = infer_slide(store, "models:/unet@champion", config, client)
    assert result.status == "written"
    meta = zarr.open_group(store / "labels" / "segmentation", mode="r").attrs["segflow"]
    assert meta["model_uri"] == "models:/unet@champion" and meta["model_version"] == "2"
    assert np.isfinite(meta["mpx_per_s"])

    with pytest.raises(ModelLoadError, match="models:/unet@nobody"):
        resolve_model("models:/unet@nobody", tracking_uri)
