"""Image normalisation: estimated from training tiles, applied in training, folded on export.

Training feeds the U-Net (pixel / 255 - mean) / std per channel. That map is affine, so the
exported model absorbs it into its first 3x3 convolution and takes raw pixel values (uint8
cast to float, 0..255) like `segcore.tiling.predict_tiled` passes them: inference needs no
normalisation step and cannot apply the wrong one. Worked example, one channel, mean 0.5,
std 0.25: W' = W / (255 * 0.25) and b' = b - sum(W) * 0.5 / 0.25.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from pipelines.training.config import Normalization
from pipelines.training.data import TileDataset
from segcore.geometry import UNetGeometry
from segcore.model import UNet, UNetConfig


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


class InputNormalizer(nn.Module):
    """(x - mean) / std per channel for images on the [0, 1] scale."""

    def __init__(self, normalization: Normalization) -> None:
        super().__init__()
        # Not persistent: the values live in the hyper-parameters, the state dict stays the
        # U-Net's own (segcore.checkpoint.load_unet reads Lightning checkpoints by prefix).
        mean = torch.tensor(normalization.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(normalization.std, dtype=torch.float32).view(-1, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


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


@torch.no_grad()
def fold_normalization(model: UNet, normalization: Normalization) -> UNet:
    """A copy of `model` that takes raw 0..255 input and computes what `model` computes on
    (x / 255 - mean) / std; exact in valid-padded nets (same-padded nets differ only inside
    the margin the tiler discards, where zero padding now means raw 0 rather than the mean)."""
    folded = copy.deepcopy(model).cpu()
    conv: nn.Conv2d = folded.down[0][0]
    mean = torch.tensor(normalization.mean, dtype=torch.float64)
    std = torch.tensor(normalization.std, dtype=torch.float64)
    weight = conv.weight.double()
    # conv(W, (x/255 - m)/s) = conv(W / (255 s), x) - shift, shift = sum over (c, ky, kx) W m / s
    shift = (weight * (mean / std).view(1, -1, 1, 1)).sum(dim=(1, 2, 3))
    conv.weight.copy_(weight / (255.0 * std).view(1, -1, 1, 1))
    if conv.bias is not None:
        conv.bias.copy_(conv.bias.double() - shift)
    else:
        # Batch norm follows a bias-free conv: its running mean absorbs the shift instead.
        norm: nn.BatchNorm2d = folded.down[0][1]
        norm.running_mean.copy_(norm.running_mean.double() + shift)
    return folded
