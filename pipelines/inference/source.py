"""Which model a run uses: a file or MLflow URI resolved, on the client, to weights and identity."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from pipelines.inference.model import ModelSource
from pipelines.models import load_model, pin_model_uri
from pipelines.runtime import default_tracking_uri


def _digest(config: dict, state: dict[str, torch.Tensor]) -> str:
    """sha256 of the U-Net configuration and every weight's bytes: the model's identity."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name in sorted(state):
        h.update(name.encode())
        # reshape: a 0-d tensor (batch norm's step count) cannot be viewed as bytes.
        raw = state[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        h.update(raw.numpy().tobytes())
    return h.hexdigest()


def resolve_model(uri: str | Path, tracking_uri: str | None = None) -> ModelSource:
    """Load the model behind a file or MLflow URI (pipelines.models) on the CPU, with its
    identity: the digest of its configuration and weights, and the registry version (or run)
    it is. `tracking_uri` None: the default workdir's store (pipelines.runtime)."""
    uri = str(uri)
    tracking_uri = tracking_uri or default_tracking_uri()
    pinned, version = pin_model_uri(uri, tracking_uri)
    if uri.startswith("runs:/"):
        version = "run " + uri.removeprefix("runs:/").split("/")[0]
    model = load_model(pinned, "cpu", tracking_uri=tracking_uri)
    config = model.config.to_dict()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return ModelSource(uri, version, config, state, _digest(config, state))
