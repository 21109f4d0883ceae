"""A PNG of a segmented slide's thumbnail with the segmentation drawn over it, to look at without
a viewer: cells tinted, their outlines (instance boundaries) in a solid colour."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from PIL import Image
from skimage.segmentation import find_boundaries

from segcore.atomic import replacing
from segcore.store import INSTANCES, LABELS_GROUP, SEGMENTATION, SlideStore, StoreError

TINT = np.array([0, 200, 255], np.float32)
OUTLINE = np.array([255, 230, 0], np.uint8)


def thumbnail_level(slide: SlideStore, min_side: int) -> int:
    """The coarsest pyramid level whose longer side is still at least `min_side` px."""
    level = 0
    for k in range(slide.n_levels):
        if max(slide.image(k).shape[1:]) >= min_side:
            level = k
    return level


def label_at(slide: SlideStore, name: str, level: int) -> np.ndarray | None:
    """Label image `name` at the size of image level `level`: its own pyramid level when it has
    one of that shape, else level 0 sampled with the level's stride."""
    shape = tuple(slide.image(level).shape[1:])
    group = slide.group
    for path in (f"{LABELS_GROUP}/{name}/{level}", f"{LABELS_GROUP}/{name}/0"):
        try:
            array = group[path]
        except KeyError:
            continue
        if tuple(array.shape) == shape:
            return np.asarray(array[:])
        if path.endswith("/0"):
            step = -(-array.shape[0] // shape[0])
            return np.asarray(array[::step, ::step])[: shape[0], : shape[1]]
    return None


def _rgb(image: zarr.Array) -> np.ndarray:
    pixels = np.asarray(image[:])
    if pixels.shape[0] == 1:
        pixels = np.repeat(pixels, 3, axis=0)
    return np.moveaxis(pixels[:3], 0, -1).astype(np.uint8)


def write_overlay(store: Path, out: Path, min_side: int = 1024) -> Path:
    """Draw the segmentation of `store` over its thumbnail into the PNG `out`."""
    slide = SlideStore.open(store)
    if slide.segmentation is None:
        raise StoreError(f"{store}: no segmentation (labels/{SEGMENTATION}) to draw")
    level = thumbnail_level(slide, min_side)
    rgb = _rgb(slide.image(level)).astype(np.float32)
    foreground = label_at(slide, SEGMENTATION, level) > 0
    instances = label_at(slide, INSTANCES, level)
    outlines = find_boundaries(instances if instances is not None else foreground, mode="inner")
    rgb[foreground] = 0.6 * rgb[foreground] + 0.4 * TINT
    picture = rgb.round().astype(np.uint8)
    picture[outlines] = OUTLINE
    out.parent.mkdir(parents=True, exist_ok=True)
    with replacing(out) as tmp:
        Image.fromarray(picture).save(tmp, format="PNG")
    return out
