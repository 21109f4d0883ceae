"""Batched training augmentation on torch tensors: H&E stain jitter, elastic deformation,
flips/rot90, gray jitter.

H&E stain jitter (Tellez et al. 2018), off by default, comes first, on the RGB pixels as they
arrive (on [0, 1]): each sample's haematoxylin, eosin and DAB concentrations (segcore.stain)
are scaled by U(1 - sigma, 1 + sigma) and shifted by U(-bias, bias), per stain.

Elastic deformation as in Ronneberger et al. 2015: each sample draws displacement vectors on a
coarse 3 x 3 grid from N(0, sigma = 10 px); bicubic interpolation of that grid gives a smooth
per-pixel displacement; image (bicubic), target (nearest) and weight map (bilinear) are
resampled with the same field, mirroring at the borders. Flips and 90 degree rotations
(exact index permutations, the same for all three) follow, then gray-value jitter of the image
alone. Everything runs on the tensors' device; all randomness comes from one torch.Generator,
and a switched-off step draws nothing from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from segcore.stain import HED_FROM_RGB, RGB_FROM_HED, rgb_to_od


class AugmentInputError(ValueError):
    """Image, target and weight that cannot be augmented together."""


@dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations run and how strong they are (gray_jitter 0 switches jitter off).

    stain_sigma and stain_bias (both 0, off, by default) set the H&E stain jitter: scale
    U(1 - sigma, 1 + sigma) and shift U(-bias, bias) of each stain's concentration, in
    natural-log optical density (a shift of 0.05 in one stain darkens white by at most 5 %
    in any channel). It needs RGB images: `check_channels` says so at configuration time,
    `augment_batch` at the latest.
    """

    elastic: bool = True
    elastic_sigma: float = 10.0
    elastic_grid: int = 3
    image_mode: Literal["bicubic", "bilinear"] = "bicubic"
    flips: bool = True
    rot90: bool = True
    gray_jitter: float = 0.1
    stain_sigma: float = 0.0
    stain_bias: float = 0.0

    def __post_init__(self) -> None:
        if self.elastic_sigma < 0:
            raise AugmentInputError(f"elastic_sigma must be >= 0, got {self.elastic_sigma}")
        if self.elastic_grid < 2:
            raise AugmentInputError(f"elastic_grid must be >= 2, got {self.elastic_grid}")
        if self.image_mode not in ("bicubic", "bilinear"):
            raise AugmentInputError(f"image_mode must be bicubic or bilinear: {self.image_mode!r}")
        if not 0 <= self.gray_jitter < 1:
            raise AugmentInputError(f"gray_jitter must be in [0, 1), got {self.gray_jitter}")
        if not 0 <= self.stain_sigma < 1:
            raise AugmentInputError(f"stain_sigma must be in [0, 1), got {self.stain_sigma}")
        if self.stain_bias < 0:
            raise AugmentInputError(f"stain_bias must be >= 0, got {self.stain_bias}")

    @property
    def uses_stain_jitter(self) -> bool:
        return self.stain_sigma > 0 or self.stain_bias > 0

    def check_channels(self, channels: int) -> None:
        """Raise AugmentInputError if stain jitter is on for images that are not RGB."""
        if self.uses_stain_jitter and channels != 3:
            raise AugmentInputError(
                f"stain jitter (stain_sigma/stain_bias) needs RGB images, got {channels} channel(s)"
            )


def _random(shape: tuple[int, ...], generator: torch.Generator, normal: bool) -> Tensor:
    """Standard normal or U(0, 1) draws on the generator's own device (then moved by callers)."""
    draw = torch.randn if normal else torch.rand
    return draw(shape, generator=generator, device=generator.device)


def coarse_displacements(n: int, config: AugmentConfig, generator: torch.Generator) -> Tensor:
    """N x 2 x g x g displacement vectors in pixels (channel 0: x, channel 1: y), N(0, sigma)."""
    g = config.elastic_grid
    return _random((n, 2, g, g), generator, normal=True) * config.elastic_sigma


def displacement_field(coarse: Tensor, height: int, width: int) -> Tensor:
    """Bicubic interpolation of the coarse grid to N x 2 x H x W per-pixel displacements.

    align_corners=True puts the coarse nodes on the corner pixels (and, for a 3 x 3 grid and
    odd sides, the centre node on the centre pixel), so the field passes through them.
    """
    return F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True)


def _sampling_grid(field: Tensor) -> Tensor:
    """grid_sample grid (N x H x W x 2, normalised, align_corners=True) for x + field(x)."""
    n, _, h, w = field.shape
    ys = torch.arange(h, device=field.device, dtype=field.dtype)
    xs = torch.arange(w, device=field.device, dtype=field.dtype)
    x = xs.view(1, 1, w) + field[:, 0]
    y = ys.view(1, h, 1) + field[:, 1]
    # Pixel i of n maps to -1 + 2 i / (n - 1) under align_corners=True; a side of 1 stays at 0.
    gx = 2 * x / max(w - 1, 1) - 1
    gy = 2 * y / max(h - 1, 1) - 1
    return torch.stack((gx, gy), dim=-1)


def _warp(x: Tensor, grid: Tensor, mode: str) -> Tensor:
    """Resample N x C x H x W `x` at `grid`, mirroring about the edge pixels outside the image."""
    return F.grid_sample(x, grid, mode=mode, padding_mode="reflection", align_corners=True)


def elastic_deform(
    image: Tensor,
    target: Tensor,
    weight: Tensor | None,
    field: Tensor,
    image_mode: str = "bicubic",
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Move image, target and weight by one per-pixel displacement field (N x 2 x H x W)."""
    grid = _sampling_grid(field.float())
    warped_image = _warp(image.float(), grid, image_mode).to(image.dtype)
    # Nearest sampling of class ids through float32 is exact for ids below 2**24.
    warped_target = _warp(target[:, None].float(), grid, "nearest")[:, 0]
    warped_target = warped_target.round().to(target.dtype)
    warped_weight = None
    if weight is not None:
        warped_weight = _warp(weight[:, None].float(), grid, "bilinear")[:, 0].to(weight.dtype)
    return warped_image, warped_target, warped_weight


def _turn_mirror(t: Tensor, ops: list[tuple[int, bool]]) -> Tensor:
    """Per sample: `turns` quarter turns of the last two axes, then a mirror along x if asked.

    A Python loop over the batch copies each sample once or twice instead of computing every
    variant for every sample (torch.where over the batch would).
    """
    out = []
    for sample, (turns, mirror) in zip(t, ops, strict=True):
        if turns:
            sample = torch.rot90(sample, turns, dims=(-2, -1))
        if mirror:
            sample = sample.flip(-1)
        out.append(sample)
    return torch.stack(out)


def gray_jitter(image: Tensor, strength: float, generator: torch.Generator) -> Tensor:
    """Per-sample gamma, contrast and brightness changes of strength s, the same on all channels.

    Works for any intensity range: each sample is mapped to [0, 1] by its own min and max,
    gets u -> u ** exp(U(-s, s)) (gamma needs non-negative values), then contrast
    (u - mean) * (1 + U(-s, s)) + mean and brightness + U(-s, s), and is mapped back.
    """
    n = image.shape[0]
    draws = (_random((n, 3), generator, normal=False) * 2 - 1).to(image.device) * strength
    gamma, contrast, brightness = (draws[:, i].view(n, 1, 1, 1) for i in range(3))
    x = image.float()
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    span = (x.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp_min(1e-12)
    u = ((x - lo) / span).clamp_(0, 1).pow_(torch.exp(gamma))
    mean = u.mean(dim=(1, 2, 3), keepdim=True)
    # lo + span * ((u - mean) * (1 + contrast) + mean + brightness), folded into one pass.
    scale = span * (1 + contrast)
    offset = lo + span * (brightness - mean * contrast)
    return torch.addcmul(offset, u, scale).to(image.dtype)


def stain_jitter(image: Tensor, sigma: float, bias: float, generator: torch.Generator) -> Tensor:
    """Per-sample H&E stain jitter of N x 3 x H x W RGB images on [0, 1].

    Concentrations c = OD @ HED_FROM_RGB become c * alpha + beta with alpha ~ U(1 - sigma,
    1 + sigma) and beta ~ U(-bias, bias) drawn per sample and stain, and go back through
    OD = c @ RGB_FROM_HED, RGB = exp(-OD). The three linear steps fold into one 3 x 3 matrix
    and one offset per sample, so the pixels see one matrix product between a log and an exp.
    Output clipped to [0, 1]; with sigma = bias = 0 it is the input up to rounding.
    """
    n = image.shape[0]
    draws = (_random((n, 2, 3), generator, normal=False) * 2 - 1).to(image.device)
    alpha, beta = 1 + draws[:, 0] * sigma, draws[:, 1] * bias
    x = image.float()
    to_hed = torch.as_tensor(HED_FROM_RGB, dtype=x.dtype, device=x.device)
    to_rgb = torch.as_tensor(RGB_FROM_HED, dtype=x.dtype, device=x.device)
    # Row vectors: od' = od @ (to_hed diag(alpha) to_rgb) + beta @ to_rgb; here transposed to
    # act on the channel axis of N x 3 x (H W).
    mix = (to_hed[None] * alpha[:, None, :]) @ to_rgb
    offset = beta @ to_rgb
    od = rgb_to_od(x).flatten(2)
    od = torch.baddbmm(offset[:, :, None], mix.transpose(1, 2), od)
    return torch.exp(-od).clamp_(0, 1).view_as(x).to(image.dtype)


def _check(image: Tensor, target: Tensor, weight: Tensor | None) -> None:
    """Raise AugmentInputError unless image is N x C x H x W and target/weight N x H x W."""
    if image.ndim != 4:
        raise AugmentInputError(f"image must be N x C x H x W, got shape {tuple(image.shape)}")
    expected = (image.shape[0], *image.shape[2:])
    if tuple(target.shape) != expected:
        raise AugmentInputError(
            f"target shape {tuple(target.shape)} does not match image {tuple(image.shape)}"
        )
    if weight is not None and tuple(weight.shape) != expected:
        raise AugmentInputError(
            f"weight shape {tuple(weight.shape)} does not match image {tuple(image.shape)}"
        )
    if not image.dtype.is_floating_point:
        raise AugmentInputError(f"image must be floating point, got {image.dtype}")
    if target.dtype.is_floating_point:
        raise AugmentInputError(f"target must hold integer class ids, got {target.dtype}")


def augment_batch(
    image: Tensor,
    target: Tensor,
    weight: Tensor | None,
    config: AugmentConfig,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Augment a batch; every sample draws its own stain jitter, field, flips, turns and jitter."""
    _check(image, target, weight)
    n, channels, h, w = image.shape
    if config.uses_stain_jitter:
        config.check_channels(channels)
        image = stain_jitter(image, config.stain_sigma, config.stain_bias, generator)
    if config.elastic:
        coarse = coarse_displacements(n, config, generator).to(image.device)
        field = displacement_field(coarse, h, w)
        image, target, weight = elastic_deform(image, target, weight, field, config.image_mode)
    if config.flips or config.rot90:
        # Turns 0-3 with an optional mirror give all 8 flips/rotations. Without rot90 (or on a
        # non-square tile, whose shape a quarter turn would change) turns are 0 or 2: a half
        # turn is the flip along both axes, so flips alone still give identity, x, y and both.
        draws = _random((n, 2), generator, normal=False).tolist()
        quarter_ok = config.rot90 and h == w
        ops = [
            (int(u * 4) if quarter_ok else 2 * int(u * 2), v < 0.5 and config.flips)
            for u, v in draws
        ]
        image, target = _turn_mirror(image, ops), _turn_mirror(target, ops)
        if weight is not None:
            weight = _turn_mirror(weight, ops)
    if config.gray_jitter > 0:
        image = gray_jitter(image, config.gray_jitter, generator)
    return image, target, weight
