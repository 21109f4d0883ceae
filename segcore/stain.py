"""H&E stain space: colour deconvolution (Ruifrok & Johnston 2001) in torch, and stain statistics.

Beer-Lambert: a pixel of intensity I in (0, 1] per RGB channel has optical density
OD = -ln(I) (I floored at 1e-6, as skimage does), and OD is a linear mix of the stains'
concentrations: OD = c @ RGB_FROM_HED, so c = OD @ HED_FROM_RGB (row vectors, the stain
vectors of haematoxylin, eosin and DAB as rows, skimage.color.rgb_from_hed's numbers).
The concentrations here are in natural-log OD units and keep their sign, so RGB -> HED -> RGB
is the identity. skimage.color.rgb2hed returns the same values divided by ln(1e6) = 13.8
and clipped at 0 (tests/test_stain.py checks both directions against it). The stain
vectors are fixed, not fitted to a slide: on H&E without DAB the D channel holds what the H
and E vectors leave unexplained (0.3-0.8 on average over tissue on MoNuSeg tiles), so its
statistics describe the scanner and staining as much as H and E do.

Images are channel-first (... x 3 x H x W), RGB on [0, 1]: uint8 pixels divided by 255, which
is what the training module hands to `segcore.augment`.

Worked example: a white pixel (1, 1, 1) has OD 0 and no stain. A pixel holding haematoxylin
concentration 1 has OD = (0.65, 0.70, 0.29), i.e. RGB = exp(-OD) = (0.52, 0.50, 0.75): purple.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor

#: Stain vectors (rows: haematoxylin, eosin, DAB) in RGB optical density, Ruifrok & Johnston.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
#: Its inverse: optical density (row vector) -> stain concentrations.
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
#: Intensities are floored here before the logarithm (OD at most ln(1e6) = 13.8).
MIN_INTENSITY = 1e-6
#: Stain names in channel order, for the keys of `stain_statistics`.
STAINS = ("h", "e", "d")


class StainInputError(ValueError):
    """An image that is not a 3-channel RGB image."""


def _matrix(m: np.ndarray, like: Tensor) -> Tensor:
    return torch.as_tensor(m, dtype=like.dtype, device=like.device)


def _check_rgb(image: Tensor) -> None:
    if image.ndim < 3 or image.shape[-3] != 3:
        raise StainInputError(
            f"stain conversion needs RGB images (... x 3 x H x W), got shape {tuple(image.shape)}"
        )


def _mix(x: Tensor, m: np.ndarray) -> Tensor:
    """Row vector x (the channel axis, -3) times the 3 x 3 matrix m, for every pixel."""
    return torch.einsum("...chw,cd->...dhw", x, _matrix(m, x))


def rgb_to_od(rgb: Tensor) -> Tensor:
    """Optical density -ln(I) of RGB intensities on [0, 1], floored at MIN_INTENSITY."""
    return -torch.log(rgb.clamp_min(MIN_INTENSITY))


def rgb_to_hed(rgb: Tensor) -> Tensor:
    """Haematoxylin, eosin and DAB concentrations (signed, natural-log OD units) of RGB on [0, 1].

    Floating point only; on the tensor's device and in its dtype.
    """
    _check_rgb(rgb)
    return _mix(rgb_to_od(rgb), HED_FROM_RGB)


def hed_to_rgb(hed: Tensor) -> Tensor:
    """RGB on [0, 1] of stain concentrations (the inverse of `rgb_to_hed`, clipped to [0, 1])."""
    _check_rgb(hed)
    return torch.exp(-_mix(hed, RGB_FROM_HED)).clamp_(0, 1)


def stain_statistics(images: Iterable[np.ndarray], tissue_od: float = 0.15) -> dict[str, float]:
    """Mean and standard deviation of the H, E and D concentrations over tissue pixels.

    `images` are uint8 RGB arrays, 3 x H x W (channel-first, as the stores hold them), taken
    one at a time, so a generator over a training set's tiles keeps memory at one tile.
    Tissue = pixels whose mean OD over R, G and B exceeds `tissue_od` (0.15: darker than
    exp(-0.15) = 86 % of white on average), which leaves out glass and the bright background.
    Returns {"h_mean", "h_std", "e_mean", "e_std", "d_mean", "d_std", "tissue_fraction",
    "tissue_pixels"}; means and stds are NaN when no pixel is tissue.

    Per-image moments are merged with Chan et al.'s pairwise update, exact for any number of
    pixels.
    """
    count, mean, m2 = 0, np.zeros(3), np.zeros(3)
    total = 0
    for image in images:
        image = np.asarray(image)
        if image.dtype != np.uint8:
            raise StainInputError(f"stain statistics need uint8 RGB images, got {image.dtype}")
        rgb = torch.from_numpy(image).to(torch.float64) / 255.0
        _check_rgb(rgb)
        total += rgb[0].numel()
        tissue = rgb_to_od(rgb).mean(dim=0) > tissue_od
        hed = rgb_to_hed(rgb)[:, tissue].numpy()  # 3 x (tissue pixels)
        n = hed.shape[1]
        if n == 0:
            continue
        image_mean = hed.mean(axis=1)
        image_m2 = ((hed - image_mean[:, None]) ** 2).sum(axis=1)
        delta = image_mean - mean
        mean = mean + delta * n / (count + n)
        m2 = m2 + image_m2 + delta**2 * count * n / (count + n)
        count += n
    std = np.sqrt(m2 / count) if count else np.full(3, np.nan)
    if not count:
        mean = np.full(3, np.nan)
    stats: dict[str, float] = {}
    for i, name in enumerate(STAINS):
        stats[f"{name}_mean"] = float(mean[i])
        stats[f"{name}_std"] = float(std[i])
    stats["tissue_fraction"] = count / total if total else float("nan")
    stats["tissue_pixels"] = float(count)
    return stats
