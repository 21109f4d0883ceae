"""The U-Net of Ronneberger et al. 2015, with its geometry computed rather than hard-coded."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from segcore.geometry import Padding, UNetGeometry


@dataclass(frozen=True)
class UNetConfig:
    """Everything needed to rebuild a UNet; stored beside every checkpoint and MLflow model."""

    in_channels: int
    n_classes: int
    base_channels: int = 64
    depth: int = 5
    padding: Padding = "valid"
    batch_norm: bool = False
    dropout: float = 0.5
    #: The stain moments its input slides are standardised to (`StainMoments.to_dict()`,
    #: segcore.stain_standardization), or None for raw slide pixels. Not used by the network
    #: itself: it says what its input must be, so it travels wherever the configuration does.
    stain_reference: dict[str, float] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _conv_block(c_in: int, c_out: int, padding: Padding, batch_norm: bool) -> nn.Sequential:
    """Two 3x3 convs, each followed by (optional batch norm and) ReLU."""
    pad = 1 if padding == "same" else 0
    layers: list[nn.Module] = []
    for c in (c_in, c_out):
        layers.append(nn.Conv2d(c, c_out, kernel_size=3, padding=pad, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def center_crop(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """The central window of `size` (square when an int) over the last two axes."""
    size = (size, size) if isinstance(size, int) else size
    dy = (x.shape[-2] - size[0]) // 2
    dx = (x.shape[-1] - size[1]) // 2
    return x[..., dy : dy + size[0], dx : dx + size[1]]


class UNet(nn.Module):
    """U-Net: valid 3x3 convs + ReLU, 2x2 max-pool, channels doubling per level, 2x2 up-convs,
    crop-and-concat skips, 1x1 output conv, dropout at the end of the contracting path.

    Geometry (`margin`, `output_size`, `valid_input_size`) lives in `self.geometry`.
    """

    def __init__(
        self,
        in_channels: int,
        n_classes: int,
        base_channels: int = 64,
        depth: int = 5,
        padding: Padding = "valid",
        batch_norm: bool = False,
        dropout: float = 0.5,
        stain_reference: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.config = UNetConfig(
            in_channels,
            n_classes,
            base_channels,
            depth,
            padding,
            batch_norm,
            dropout,
            stain_reference,
        )
        self.geometry = UNetGeometry(depth=depth, padding=padding)
        widths = [base_channels * 2**level for level in range(depth)]

        self.down = nn.ModuleList()
        c = in_channels
        for w in widths:
            self.down.append(_conv_block(c, w, padding, batch_norm))
            c = w
        self.pool = nn.MaxPool2d(2)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.upconvs = nn.ModuleList()
        self.up = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.upconvs.append(nn.ConvTranspose2d(c, w, kernel_size=2, stride=2))
            self.up.append(_conv_block(2 * w, w, padding, batch_norm))
            c = w
        self.head = nn.Conv2d(c, n_classes, kernel_size=1)
        self.reset_parameters()

    @classmethod
    def from_config(cls, config: UNetConfig | dict) -> UNet:
        if isinstance(config, dict):
            config = UNetConfig(**config)
        return cls(**asdict(config))

    def reset_parameters(self) -> None:
        """He-normal init, std = sqrt(2 / N) with N = fan-in (k*k*C_in), as in the paper."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                # ConvTranspose2d stores weights as (C_in, C_out, k, k); its fan-in per output
                # pixel is C_in * k * k / stride^2 = C_in for k = stride = 2.
                fan_in = (
                    m.in_channels * math.prod(m.kernel_size) // math.prod(m.stride)
                    if isinstance(m, nn.ConvTranspose2d)
                    else m.in_channels * math.prod(m.kernel_size)
                )
                nn.init.normal_(m.weight, std=math.sqrt(2.0 / fan_in))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def margin(self) -> int:
        return self.geometry.margin

    def output_size(self, n: int) -> int:
        return self.geometry.output_size(n)

    def valid_input_size(self, min_output: int) -> int:
        return self.geometry.valid_input_size(min_output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, N x K x h x w; for valid padding h = output_size(H) (same padding: h = H)."""
        skips = []
        for level, block in enumerate(self.down):
            x = block(x)
            if level < len(self.down) - 1:
                skips.append(x)
                x = self.pool(x)
        x = self.dropout(x)
        for upconv, block, skip in zip(self.upconvs, self.up, reversed(skips), strict=True):
            x = upconv(x)
            x = block(torch.cat([center_crop(skip, x.shape[-2:]), x], dim=1))
        return self.head(x)
