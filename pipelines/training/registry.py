"""Logging the trained U-Net to MLflow and moving the registry aliases.

The model is saved in MLflow's "pt2" format (a torch.export archive: the traced graph, with the
weights as raw tensor records) with dynamic batch and spatial sizes, a tensor signature, and the
geometry and U-Net configuration as metadata, from which `pipelines.models.load_model` rebuilds
a `UNet` and reads only those weight records (torch.export.load would unpickle parts of it).
The new version gets alias `candidate`; `champion` moves to it when its validation IoU beats
the current champion's (recorded as the version tag `val_iou`), or when there is no champion.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec

from pipelines.training.config import Normalization
from pipelines.training.data import TileShape
from pipelines.training.process_state import process_state_kept
from segcore.model import UNet
from segcore.normalization import INPUT_DTYPE

CANDIDATE = "candidate"
CHAMPION = "champion"
VAL_IOU_TAG = "val_iou"
MODEL_NAME = "model"


@dataclass(frozen=True)
class Registration:
    model_uri: str
    version: str
    became_champion: bool
    #: The aliases moved to this version.
    aliases: tuple[str, ...]


class RegistryError(ValueError):
    """Model metadata that does not describe the model."""


def model_metadata(
    model: UNet,
    normalization: Normalization,
    tile: TileShape,
    classes: Sequence[str],
    stain: dict | None = None,
) -> dict:
    """What inference needs beside the weights: config, geometry, expected input (with the
    training tiles' H&E stain statistics for RGB models, `segcore.stain.stain_statistics`),
    and the names of the output classes, by class value (the training target's)."""
    if len(classes) != model.config.n_classes:
        raise RegistryError(
            f"{len(classes)} class names {list(classes)} for a model with "
            f"{model.config.n_classes} outputs"
        )
    geometry = model.geometry
    smallest = geometry.valid_input_size(1)
    second = geometry.valid_input_size(geometry.output_size(smallest) + 1)
    return {
        "unet_config": model.config.to_dict(),
        "geometry": {
            "depth": geometry.depth,
            "padding": geometry.padding,
            "margin": geometry.margin,
            "pool_factor": geometry.pool_factor,
            "valid_input_size_min": smallest,
            "valid_input_size_step": second - smallest,
            "train_tile_size": tile.input,
            "train_output_size": tile.output,
        },
        "input": {
            "layout": "N x C x H x W float32",
            "dtype": INPUT_DTYPE.name,  # the slides' pixel type the model was trained on
            "scale": "raw pixel values 0..255 (uint8 cast to float); normalisation is folded in",
            "normalization_mean": normalization.mean,
            "normalization_std": normalization.std,
            "stain_statistics": stain,
        },
        "classes": list(classes),
    }


def signature(model: UNet) -> ModelSignature:
    """Tensor signature with free batch and spatial sizes (valid sizes: see metadata)."""
    c, k = model.config.in_channels, model.config.n_classes
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, c, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, k, -1, -1))]),
    )


def _is_better(new_iou: float, champion_iou: float) -> bool:
    if not math.isfinite(new_iou):
        return False
    return not math.isfinite(champion_iou) or new_iou > champion_iou


def promote(client: MlflowClient, name: str, version: str, val_iou: float) -> bool:
    """Alias `candidate` -> version; `champion` too when it beats the current champion."""
    client.set_model_version_tag(name, version, VAL_IOU_TAG, str(val_iou))
    client.set_registered_model_alias(name, CANDIDATE, version)
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # no champion yet
        current = None
    if current is not None and not _is_better(val_iou, float(current.tags.get(VAL_IOU_TAG, "nan"))):
        return False
    client.set_registered_model_alias(name, CHAMPION, version)
    return True


def log_and_register(
    tracking_uri: str,
    run_id: str,
    model: UNet,
    metadata: dict,
    registered_name: str,
    val_iou: float,
    weights_file: Path,
) -> Registration:
    """Log `model` (eval mode, raw-pixel input) and its weights-only file to the run, register
    it under `registered_name` and move the aliases."""
    model = model.eval().cpu()
    # Batch 2: torch.export fixes size-1 dims, so a batch of 1 would pin the batch size.
    example = np.zeros(
        (2, model.config.in_channels, *(2 * [model.valid_input_size(1)])), np.float32
    )
    with process_state_kept():
        # log_model has no client form: the fluent URI is set, before the run is looked up in
        # it, for the block only.
        mlflow.set_tracking_uri(tracking_uri)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pytorch.log_model(
                model,
                name=MODEL_NAME,
                serialization_format="pt2",
                input_example=example,
                signature=signature(model),
                metadata=metadata,
                # Stating the requirement skips MLflow's slow inference of it in a subprocess.
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                registered_model_name=registered_name,
            )
            mlflow.log_artifact(str(weights_file), artifact_path="checkpoint")
    version = str(info.registered_model_version)
    client = MlflowClient(tracking_uri)
    became_champion = promote(client, registered_name, version, val_iou)
    aliases = (CANDIDATE, CHAMPION) if became_champion else (CANDIDATE,)
    return Registration(f"models:/{registered_name}/{version}", version, became_champion, aliases)
