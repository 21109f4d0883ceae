"""MLflow record of a label-bootstrap training: its settings, the loss curve, an overlay.

One run per training in the experiment `segflow-bootstrap`: params are the output settings
(`BootstrapConfig.settings`, flattened) with the chosen nucleus clusters, the rule that
chose them and how many pixels of the training tiles were stroked (`pipelines.scribbles`);
metrics `loss` and `labels` per iteration; `overlay.png` shows the first training tiles above
their clusters (the nucleus clusters outlined in white).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from skimage.segmentation import find_boundaries

from pipelines.redaction import redact_tree
from pipelines.runtime import artifact_root
from pipelines.services import require_mlflow
from segcore.bootstrap import predict_clusters

if TYPE_CHECKING:
    from pipelines.bootstrap import BootstrapTraining

EXPERIMENT = "segflow-bootstrap"
#: MLflow takes at most 1000 metrics and 100 params per batch.
_METRICS_PER_BATCH = 1000
_PARAMS_PER_BATCH = 100
#: Tiles side by side in the overlay.
_OVERLAY_TILES = 4


def _flat(tree: dict, prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) else str(value)
    return flat


def _palette(n: int) -> np.ndarray:
    """A fixed colour per cluster id (seeded, so one id has one colour in every run)."""
    return np.random.default_rng(0).integers(40, 256, size=(n, 3)).astype(np.uint8)


def overlay(tiles: np.ndarray, clusters: np.ndarray, nucleus: tuple[int, ...]) -> np.ndarray:
    """(2t, k t, 3) uint8: the tiles (top row, grey when one-channel, scaled to 0..255) above
    their clusters in a fixed palette, nucleus clusters outlined in white."""
    top = tiles.astype(np.float64)
    top = top * (255.0 / max(float(top.max()), 1.0)) if tiles.dtype != np.uint8 else top
    if top.shape[1] == 1:
        top = np.repeat(top, 3, axis=1)
    rgb = np.concatenate(list(np.moveaxis(top[:, :3], 1, -1)), axis=1).astype(np.uint8)
    coloured = _palette(int(clusters.max()) + 1)[np.concatenate(list(clusters), axis=1)]
    nuclei = np.isin(np.concatenate(list(clusters), axis=1), nucleus)
    coloured[find_boundaries(nuclei, mode="inner")] = 255
    return np.concatenate([rgb, coloured], axis=0)


def track_bootstrap(tracking_uri: str, settings: dict, trained: BootstrapTraining) -> str:
    """Record one bootstrap training in MLflow at `tracking_uri`; returns its run id."""
    run, nucleus, rule = trained.run, trained.nucleus, trained.rule
    require_mlflow(tracking_uri)
    # Not `mlflow_client`, which is for reading: this writes, and may create the SQLite store.
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    experiment_id = (
        experiment.experiment_id
        if experiment
        # A SQLite store keeps artifacts beside its database, not in the working directory.
        else client.create_experiment(EXPERIMENT, artifact_location=artifact_root(tracking_uri))
    )
    run_id = client.create_run(experiment_id, run_name=f"bootstrap-{int(time.time())}").info.run_id
    stroked = 0 if trained.scribbles is None else int(np.count_nonzero(trained.scribbles))
    params = _flat(redact_tree(settings)) | {
        "nucleus": json.dumps(list(nucleus)),
        "rule": rule,
        "stroked_pixels": str(stroked),  # of the training tiles; 0: no scribbles
    }
    items = [Param(k, v[:6000]) for k, v in params.items()]
    for start in range(0, len(items), _PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[start : start + _PARAMS_PER_BATCH])
    now = int(time.time() * 1000)
    metrics = [
        Metric(name, float(value), now, step)
        for step, (loss, labels) in enumerate(zip(run.losses, run.label_counts, strict=True))
        for name, value in (("loss", loss), ("labels", labels))
    ]
    for start in range(0, len(metrics), _METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[start : start + _METRICS_PER_BATCH])
    shown = trained.tiles[:_OVERLAY_TILES]
    clusters = np.stack([predict_clusters(run.network, x) for x in trained.inputs[: len(shown)]])
    client.log_image(run_id, overlay(shown, clusters, nucleus), "overlay.png")
    client.set_terminated(run_id)
    return run_id
