"""Which model a run uses: a file or MLflow URI resolved, on the client, to weights and identity."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from mlflow.exceptions import MlflowException

from pipelines.inference.model import ModelSource
from pipelines.models import ModelLoadError, load_model
from pipelines.services import mlflow_client


def _digest(config: dict, state: dict[str, torch.Tensor]) -> str:
    """sha256 of the U-Net configuration and every weight's bytes: the model's identity."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _pin_version(uri: str, tracking_uri: str | None) -> tuple[str, str | None]:
    """(URI to load, version) with a registry alias resolved to the version it points at now,
    so the weights loaded and the version recorded cannot disagree if the alias moves."""
    if uri.startswith("models:/"):
        name, _, alias = uri.removeprefix("models:/").partition("@")
        if alias:
            client = mlflow_client(tracking_uri)
            try:
                version = client.get_model_version_by_alias(name, alias).version
            except MlflowException as exc:
                raise ModelLoadError(f"{uri}: cannot resolve the alias ({exc.message})") from exc
            return f"models:/{name}/{version}", str(version)
        return uri, name.rpartition("/")[2]
    if uri.startswith("runs:/"):
        return uri, "run " + uri.removeprefix("runs:/").split("/")[0]
    return uri, None


def resolve_model(uri: str | Path, tracking_uri: str | None = None) -> ModelSource:
    """Load the model behind a file or MLflow URI (pipelines.models) on the CPU, with its
    identity: the digest of its configuration and weights."""
    uri = str(uri)
    pinned, version = _pin_version(uri, tracking_uri)
    model = load_model(pinned, "cpu", tracking_uri=tracking_uri)
    config = model.config.to_dict()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return ModelSource(uri, version, config, state, _digest(config, state))
