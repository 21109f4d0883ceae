"""Image normalisation: the map training applies, and its folding into the first convolution.

Training feeds the U-Net (pixel / 255 - mean) / std per channel. That map is affine, so the
exported model absorbs it into its first 3x3 convolution and takes raw pixel values (uint8
cast to float, 0..255) like `segcore.tiling.predict_tiled` passes them: inference needs no
normalisation step and cannot apply the wrong one. Worked example, one channel, mean 0.5,
std 0.25: W' = W / (255 * 0.25) and b' = b - sum(W) * 0.5 / 0.25.

Here, not in training, because inference folds the normalisation of a Lightning checkpoint
too, and inference must not import training (Lightning).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, model_validator
from torch import nn

from segcore.model import UNet

#: The pixel type every segflow model takes (0..255); other slide dtypes are refused, never
#: rescaled silently.
INPUT_DTYPE = np.dtype(np.uint8)


class Normalization(BaseModel):
    """Per-channel mean and std of the training images scaled to [0, 1].

    The network sees (pixel / 255 - mean) / std; exported models take raw 0..255 values because
    this affine map is folded into their first convolution (`fold_normalization`).
    """

    model_config = ConfigDict(extra="forbid")

    mean: list[float]
    std: list[float]

    @model_validator(mode="after")
    def _same_length(self) -> Normalization:
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError("normalization mean and std need one value per channel")
        if min(self.std) <= 0:
            raise ValueError("normalization std must be positive")
        return self


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
