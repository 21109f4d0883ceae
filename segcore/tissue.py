"""Tissue detection on a coarse level of a slide: which areas hold anything worth segmenting.

The mask is used to skip empty glass in training sampling and inference, so missing tissue is
worse than keeping background: every rule below errs toward tissue.

Rule (on an image of at most `max_size` px per side, intensities scaled to [0, 1]):
  1. Feature: HSV saturation for RGB (stain is coloured, glass is not); darkness (1 - intensity)
     for grey.
  2. Candidate tissue: feature above T = max(Otsu's threshold, floor), or darker than
     glass_min_brightness. The floor (glass_max_saturation for RGB, 1 - glass_min_brightness
     for grey) keeps Otsu from splitting the noise of an empty slide into "tissue".
  3. The rest, bright and unsaturated, counts as empty glass only if its mean saturation is at
     most glass_max_saturation (RGB) and one connected area of it covers at least
     min_glass_fraction of the image. Otherwise the image has no real background (EM sections,
     fluorescence, tissue-only crops, where Otsu splits membranes from cytoplasm or nuclei from
     stroma) and everything is tissue.
  4. The candidate is cleaned: objects smaller than min_object_px are dropped, holes filled, and
     the mask dilated by dilation_px. A mask covering >= all_tissue_above of the image becomes
     all tissue.
An image without a single tissue pixel, with no pixels, or with one constant value throughout is
an empty slide (`EmptySlideError`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.morphology import disk, remove_small_objects


class EmptySlideError(ValueError):
    """The image holds no tissue at all."""


@dataclass(frozen=True)
class TissueConfig:
    """Tissue detection settings; sizes are in pixels of the coarse level."""

    max_size: int = 2048
    glass_min_brightness: float = 0.8
    glass_max_saturation: float = 0.08
    min_glass_fraction: float = 0.05
    min_object_px: int = 16
    dilation_px: int = 3
    all_tissue_above: float = 0.9


def tissue_downsample(shape: Sequence[int], max_size: int) -> int:
    """Smallest power of two that brings the longer of the last two axes to <= max_size."""
    longest = max(shape[-2:])
    return 1 << max(0, math.ceil(math.log2(max(longest, 1) / max_size)))


def _scaled(image: np.ndarray) -> np.ndarray:
    """Intensities in [0, 1]: integers by their dtype's range, floats as they are."""
    if image.dtype.kind in "ui":
        return image.astype(np.float32) / float(np.iinfo(image.dtype).max)
    return image.astype(np.float32)


def _largest_area_fraction(mask: np.ndarray) -> float:
    labels, n = ndimage.label(mask)
    if n == 0:
        return 0.0
    return float(np.bincount(labels.ravel())[1:].max()) / mask.size


def _otsu(feature: np.ndarray) -> float:
    low, high = float(feature.min()), float(feature.max())
    return low if low == high else float(threshold_otsu(feature))


def tissue_mask(image: np.ndarray, config: TissueConfig = TissueConfig()) -> np.ndarray:
    """Boolean (h, w) tissue mask of a coarse (C, h, w) image (C = 3 RGB, C = 1 grey); images
    with other channel counts (fluorescence) are all tissue."""
    if image.size == 0:
        raise EmptySlideError("empty slide: the image has no pixels")
    if image.min() == image.max():
        raise EmptySlideError(f"empty slide: every pixel has the value {image.flat[0]}")
    channels, h, w = image.shape
    if channels not in (1, 3):
        return np.ones((h, w), dtype=bool)
    scaled = _scaled(image)
    brightness = scaled.max(axis=0)
    if channels == 3:
        feature = (brightness - scaled.min(axis=0)) / np.maximum(brightness, 1e-6)
        floor = config.glass_max_saturation
    else:
        feature = 1.0 - brightness
        floor = 1.0 - config.glass_min_brightness
    tissue = (feature > max(_otsu(feature), floor)) | (brightness < config.glass_min_brightness)
    glass = ~tissue
    looks_like_glass = glass.any() and _largest_area_fraction(glass) >= config.min_glass_fraction
    if channels == 3 and looks_like_glass:
        looks_like_glass = float(feature[glass].mean()) <= config.glass_max_saturation
    if not looks_like_glass:
        return np.ones((h, w), dtype=bool)
    tissue = remove_small_objects(tissue, max_size=config.min_object_px - 1)
    tissue = ndimage.binary_fill_holes(tissue)
    if config.dilation_px > 0:
        tissue = ndimage.binary_dilation(tissue, structure=disk(config.dilation_px))
    if not tissue.any():
        raise EmptySlideError("empty slide: no tissue found (all background)")
    if tissue.mean() >= config.all_tissue_above:
        return np.ones((h, w), dtype=bool)
    return tissue
