"""Model files that load without unpickling code: a state dict plus the UNetConfig, weights_only."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from segcore.atomic import replacing
from segcore.model import UNet, UNetConfig

#: Where a Lightning checkpoint keeps the wrapped U-Net's weights (UNetModule.model).
LIGHTNING_PREFIX = "model."


class CheckpointError(ValueError):
    """A model file is missing, corrupt or not a segflow U-Net."""


def save_unet(model: UNet, path: str | Path, extra: dict | None = None) -> None:
    """Save `model` as {"unet_config", "state_dict", **extra}; written atomically."""
    payload = {"unet_config": model.config.to_dict(), "state_dict": model.state_dict()}
    with replacing(path) as tmp:
        torch.save({**(extra or {}), **payload}, tmp)


def unet_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The U-Net's weights in `state`: a Lightning checkpoint's state dict holds the wrapped
    U-Net's under LIGHTNING_PREFIX (beside the module's other state), a U-Net's own has them
    bare and is returned as it is.

    >>> sorted(unet_state_dict({"model.inc.weight": 1, "loss.weight": 2}))
    ['inc.weight']
    >>> sorted(unet_state_dict({"inc.weight": 1}))
    ['inc.weight']
    """
    if not any(key.startswith(LIGHTNING_PREFIX) for key in state):
        return dict(state)
    return {
        key.removeprefix(LIGHTNING_PREFIX): value
        for key, value in state.items()
        if key.startswith(LIGHTNING_PREFIX)
    }


def load_unet(path: str | Path, map_location: str | torch.device = "cpu") -> UNet:
    """Rebuild a UNet from a file written by `save_unet` or a segflow Lightning checkpoint."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: model file not found") from exc
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        raise CheckpointError(f"{path}: not a loadable model file ({type(exc).__name__})") from exc
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: not a segflow model file")
    config = payload.get("unet_config") or payload.get("hyper_parameters", {}).get("unet_config")
    if config is None:
        raise CheckpointError(f"{path}: no U-Net configuration in the file")
    model = UNet.from_config(UNetConfig(**config))
    try:
        model.load_state_dict(unet_state_dict(payload["state_dict"]))
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match its U-Net configuration") from exc
    return model
