"""Touching objects of a foreground mask cut apart: marker-controlled watershed on the distance
transform (the classic split of touching nuclei, e.g. Malpica et al. 1997).

A U-Net trained with the paper's border weights learns to leave a gap between touching cells,
but where it does not, connected components merge two nuclei into one. Here every
foreground component is flooded from the h-maxima of its (lightly smoothed) distance
transform: one marker per bulge at least `h` px deeper than the saddle joining it to the next,
and the pixels where two floods meet become background. A component without such a marker is
kept whole.

Worked example: two discs of radius 10 overlapping by 4 px form one component whose distance
transform has two maxima near 10 and a saddle near 4 (deeper than h = 2 on both sides): two
markers, a one-pixel cut along the neck, two objects. A disc of radius 1 has no maximum of
depth 2: it stays as it is.

The result depends on pixels up to about one object diameter away; a caller working chunk by
chunk gives each chunk a halo of that size (`pipelines.components.clean_foreground`).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.morphology import h_maxima
from skimage.segmentation import watershed


def cut_touching(foreground: np.ndarray, h: float = 2.0, smoothing: float = 1.0) -> np.ndarray:
    """`foreground` (bool, H x W) with one-pixel background cuts between touching objects."""
    foreground = np.asarray(foreground, dtype=bool)
    if not foreground.any():
        return foreground.copy()
    depth = ndimage.gaussian_filter(ndimage.distance_transform_edt(foreground), smoothing)
    markers, _ = ndimage.label(h_maxima(depth, h))
    basins = watershed(-depth, markers, mask=foreground, watershed_line=True)
    components, _ = ndimage.label(foreground)
    flooded = np.unique(components[markers > 0])
    lines = foreground & (basins == 0) & np.isin(components, flooded[flooded > 0])
    return foreground & ~lines


def drop_small(
    foreground: np.ndarray, min_size: int, edges: tuple[bool, bool, bool, bool]
) -> np.ndarray:
    """`foreground` (bool) without its objects of fewer than `min_size` px, except those that
    touch a side of the array marked in `edges` (top, bottom, left, right): there the object
    may go on beyond the array, so its size is unknown here.

    Worked example: a 3 px speck in the middle goes at min_size 10; a 3 px speck on the top row
    stays when `edges[0]` is set (the window's top is not the slide's) and goes when it is not.
    """
    labels, n = ndimage.label(foreground)
    if n == 0 or min_size <= 1:
        return foreground.copy()
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    small = sizes < min_size
    sides = (labels[0], labels[-1], labels[:, 0], labels[:, -1])
    for side, open_edge in zip(sides, edges, strict=True):
        if open_edge:
            small[side] = False
    small[0] = False
    return foreground & ~small[labels]
