"""Training's side of image normalisation: estimated from training tiles, and a U-Net wrapper
that takes raw pixels (`segcore.normalization` holds the map itself and its folding)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from pipelines.training.data import TileDataset
from segcore.geometry import UNetGeometry
from segcore.model import UNet, UNetConfig
from segcore.normalization import InputNormalizer, Normalization


def estimate_normalization(
    dataset: TileDataset, positions: Iterable[tuple[int, int, int]]
) -> Normalization:
    """Per-channel mean and std of the tiles at `positions`, on the [0, 1] scale."""
    total = total_sq = None
    n = 0
    for position in positions:
        image = dataset[position]["image"].numpy().astype(np.float64) / 255.0
        flat = image.reshape(image.shape[0], -1)
        total = flat.sum(1) if total is None else total + flat.sum(1)
        total_sq = (flat**2).sum(1) if total_sq is None else total_sq + (flat**2).sum(1)
        n += flat.shape[1]
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean**2, 0.0))
    # A constant channel would divide by zero; leave its scale alone instead.
    std = np.where(std < 1e-3, 1.0, std)
    return Normalization(mean=mean.tolist(), std=std.tolist())


class RawInputUNet(nn.Module):
    """A training U-Net that takes raw 0..255 pixel values, for `segcore.tiling` prediction."""

    def __init__(self, unet: UNet, normalizer: InputNormalizer) -> None:
        super().__init__()
        self.unet = unet
        self.normalizer = normalizer

    @property
    def geometry(self) -> UNetGeometry:
        return self.unet.geometry

    @property
    def config(self) -> UNetConfig:
        return self.unet.config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unet(self.normalizer(x / 255.0))
