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

A network trained on the three-class target (background / cell interior / cell boundary,
`segcore.weights.training_target`) marks the seeds itself: `split_at_boundaries` gives every
foreground pixel (interior and boundary) to its nearest interior component, so each seed
takes its own ring of boundary, and cuts a one-pixel line where two seeds' regions meet.

Before any cut, `foreground_classes` may raise the bar for foreground above argmax's: on
MoNuSeg's training tiles a nucleus probability of 0.6 instead of 0.5 drops the faint rims
and bridges that join or blur neighbours (AJI 0.579 -> 0.586, benchmarks/monuseg.py).

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


def split_at_boundaries(classes: np.ndarray, interior: int = 1) -> np.ndarray:
    """The foreground (`classes` > 0, bool, H x W) of a background / interior / boundary class
    map, with one-pixel background cuts where the regions of two interior seeds meet.

    Seeds are the 4-connected components of `classes == interior`, numbered in raster order
    of their first pixel; every foreground pixel joins the seed nearest to it (Euclidean) in
    its own foreground component, so each seed takes its own ring of boundary. Where two
    regions touch (8-neighbours), the pixels of the lower-numbered seed become background, as
    `segcore.weights.separate_touching` cuts cells: a one-pixel line, and no two regions stay
    8-connected. A foreground component without a seed (all boundary, e.g. a cell too small
    for an interior) is kept whole. Unlike a flooding watershed, whose ties go by the order
    the pixels are visited, the result depends only on the pixels within about one object
    diameter, so chunks with that much context agree with the whole map.

    Worked example, one row `[2 1 1 2 2 1 1 2]`: two seeds (columns 1-2 and 5-6); columns 3
    and 4 are each one step from a seed and join it, and column 3, on the lower seed's side of
    the contact, becomes the cut: two objects, columns 0-2 and 4-7. `[2 2 2]` has no seed and
    stays one object.
    """
    classes = np.asarray(classes)
    foreground = classes > 0
    seeds, n = ndimage.label(classes == interior)
    if n == 0:
        return foreground
    _, nearest = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    owner = seeds[tuple(nearest)]
    components, _ = ndimage.label(foreground)
    # A seed across background is no owner: such pixels are never cut.
    owner[~foreground | (components[tuple(nearest)] != components)] = 0
    neighbour_max = ndimage.maximum_filter(owner, size=3, mode="constant", cval=0)
    return foreground & ~((owner > 0) & (neighbour_max > owner))


def foreground_classes(probabilities: np.ndarray, threshold: float) -> np.ndarray:
    """Class map (uint8, H x W) of per-class probabilities (K x H x W, class 0 background): a
    pixel is foreground when its probability of not being background exceeds `threshold`, and
    then takes its likeliest foreground class. With two classes and `threshold` 0.5 this is
    argmax (but for exact ties); a higher threshold keeps only the confident foreground.

    Worked example: probabilities (background, nucleus) (0.45, 0.55) are nucleus (1) at
    threshold 0.5 and background (0) at 0.6; (0.3, 0.3, 0.4) over (background, interior,
    boundary) are boundary (2) at 0.6, as 0.7 of the pixel is not background.
    """
    probabilities = np.asarray(probabilities)
    foreground = 1.0 - probabilities[0] > threshold
    likeliest = probabilities[1:].argmax(axis=0) + 1
    return np.where(foreground, likeliest, 0).astype(np.uint8)


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
