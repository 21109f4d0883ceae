"""U-Net loss weight maps (Ronneberger et al. 2015, eq. 2) and the training target they go with.

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))

d1, d2 are the Euclidean distances from background pixel x to the nearest and second-nearest
cell (instance); w_c balances the class frequencies. Worked example with the paper's w0=10,
sigma=5: a background pixel in a 2 px gap between two cells (d1 = d2 = 1) gets a border term of
10 * exp(-4/50) = 9.23; one 10 px from both cells gets 10 * exp(-400/50) = 0.0034.

The border term falls below a tolerance once d1 + d2 exceeds a cutoff (`border_cutoff`), so each
cell only influences pixels within that distance of it: `weight_map` computes every cell's
distance transform in its bounding box grown by the cutoff, which costs (cells x window area)
rather than (cells x image area), and `border_halo` is the overlap a chunked computation needs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
from scipy import ndimage

N_CLASSES = 2  # background (0) and cell (1)

#: What the network learns: "cells" (background / cell, the paper's) or "cells+boundaries"
#: (background / cell interior / cell boundary, for seeded separation of touching cells).
TargetKind = Literal["cells", "cells+boundaries"]
#: The class names of each target kind, by class value.
TARGET_CLASSES: dict[str, tuple[str, ...]] = {
    "cells": ("background", "cell"),
    "cells+boundaries": ("background", "cell", "boundary"),
}
#: The class value of the boundary in a "cells+boundaries" target.
BOUNDARY = 2


def target_classes(n_classes: int) -> tuple[str, ...]:
    """The class names of the segflow target with `n_classes` classes (a model's output
    follows its training stores' target): 2 -> background, cell; 3 -> background, cell,
    boundary; any other count -> background, class1, class2, ..."""
    for names in TARGET_CLASSES.values():
        if len(names) == n_classes:
            return names
    return ("background", *(f"class{k}" for k in range(1, n_classes)))


class WeightMapError(ValueError):
    """Labels or parameters that a weight map cannot be computed from."""


def border_cutoff(w0: float, sigma: float, tolerance: float) -> float:
    """The distance sum d1 + d2 beyond which w0 * exp(-(d1 + d2)^2 / (2 sigma^2)) < tolerance.

    Example: w0=10, sigma=5, tolerance=1e-3 gives 5 * sqrt(2 ln 1e4) = 21.46 px.
    """
    if sigma <= 0 or tolerance <= 0 or w0 < 0:
        raise WeightMapError(
            f"need sigma > 0, tolerance > 0 and w0 >= 0 (got w0={w0}, sigma={sigma}, "
            f"tolerance={tolerance})"
        )
    if w0 <= tolerance:
        return 0.0
    return sigma * math.sqrt(2.0 * math.log(w0 / tolerance))


def border_halo(w0: float, sigma: float, tolerance: float) -> int:
    """Pixels of context a chunk needs on each side so that its border term matches the whole
    image's (see `weight_map`): the cutoff distance rounded up."""
    return math.ceil(border_cutoff(w0, sigma, tolerance))


def class_weights_from_counts(counts: np.ndarray | Sequence[int]) -> np.ndarray:
    """w_c = N / (K * N_c) for pixel counts N_c of K classes; 0 for a class with no pixels."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0 or np.any(counts < 0):
        raise WeightMapError(f"class counts must be a non-empty list of counts >= 0, got {counts}")
    total = counts.sum()
    weights = np.zeros_like(counts)
    present = counts > 0
    weights[present] = total / (counts.size * counts[present])
    return weights


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise WeightMapError(f"instance labels must be 2-D (y, x), got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise WeightMapError(f"instance labels must be integers, got dtype {labels.dtype}")
    if labels.size and np.issubdtype(labels.dtype, np.signedinteger) and labels.min() < 0:
        raise WeightMapError("instance labels must be >= 0 (0 = background)")
    return labels


def separate_touching(labels: np.ndarray) -> np.ndarray:
    """Instance labels with a one-pixel background gap wherever two cells touch (paper Fig. 3).

    A cell pixel becomes background when one of its 8 neighbours belongs to a cell with a larger
    id, so only one side of each contact gives up pixels: the gap is one pixel wide and no two
    cells remain 8-connected. Pixels outside the image count as background.
    """
    labels = _check_labels(labels)
    neighbour_max = ndimage.maximum_filter(labels, size=3, mode="constant", cval=0)
    separated = labels.copy()
    separated[neighbour_max > labels] = 0
    return separated


def _disk(radius: int) -> np.ndarray:
    """The pixels within Euclidean distance `radius` of the centre, (2r+1) x (2r+1) bool."""
    y, x = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    return y * y + x * x <= radius * radius


def cell_boundaries(labels: np.ndarray, width: int) -> np.ndarray:
    """The cell pixels within `width` px (Euclidean) of a pixel that is not the same cell
    (background, another cell, or outside the image), bool.

    Worked example, width 1, one 4 x 4 cell in a 6 x 6 image (0 = background):

        0 0 0 0 0 0      . . . . . .
        0 1 1 1 1 0      . B B B B .
        0 1 1 1 1 0  ->  . B . . B .      B = boundary, the 2 x 2 core stays interior
        0 1 1 1 1 0      . B . . B .
        0 1 1 1 1 0      . B B B B .
        0 0 0 0 0 0      . . . . . .

    With width 2 the whole cell is boundary: every pixel is within 2 px of background. A pixel
    depends only on pixels within `width` of it, so a chunk with `width` px of context agrees
    with the whole image.
    """
    labels = _check_labels(labels)
    if width < 1:
        raise WeightMapError(f"boundary width must be >= 1 px, got {width}")
    footprint = _disk(width)
    # Outside the image is background (-1 never equals a cell id): cells cut by the image's
    # edge get a boundary there, as `separate_touching` treats that edge.
    padded = np.pad(labels.astype(np.int64), width, constant_values=-1)
    low = ndimage.minimum_filter(padded, footprint=footprint, mode="nearest")
    high = ndimage.maximum_filter(padded, footprint=footprint, mode="nearest")
    inner = (slice(width, -width), slice(width, -width))
    return (labels > 0) & ((low[inner] != labels) | (high[inner] != labels))


def training_target(
    labels: np.ndarray, kind: TargetKind = "cells", boundary_width: int = 2
) -> np.ndarray:
    """The class map a U-Net trains on (uint8), from instance labels whose touching cells are
    separated first (`separate_touching`): "cells" 1 = cell, 0 = background incl. the gaps
    between cells; "cells+boundaries" also marks 2 = boundary, the cell pixels within
    `boundary_width` px of anything that is not the same cell (`cell_boundaries`), so that
    1 = a cell's interior.

    Worked example, two 3 x 3 cells touching side by side (ids 1 and 2) on background,
    boundary width 1: the separation turns cell 1's right column into background (the gap);
    "cells" is 1 on the rest of both cells; "cells+boundaries" is 2 on all of cell 1 (3 x 2,
    every pixel next to background) and on cell 2 but for its centre pixel, its interior, 1.
    """
    separated = separate_touching(labels)
    return target_of_separated(separated, kind, boundary_width)


def target_of_separated(
    separated: np.ndarray, kind: TargetKind = "cells", boundary_width: int = 2
) -> np.ndarray:
    """`training_target` of labels already passed through `separate_touching`."""
    if kind not in TARGET_CLASSES:
        raise WeightMapError(f"target must be one of {list(TARGET_CLASSES)}, got {kind!r}")
    target = (separated > 0).astype(np.uint8)
    if kind == "cells+boundaries":
        target[cell_boundaries(separated, boundary_width)] = BOUNDARY
    return target


def _sequential(labels: np.ndarray) -> np.ndarray:
    """Labels as intp ids 1..n, so `find_objects` allocates n slots rather than max(id)."""
    if labels.size == 0 or int(labels.max()) <= labels.size:
        return labels.astype(np.intp, copy=False)
    # Sparse huge ids (e.g. slide-wide ids inside one chunk): renumber by rank.
    ids, inverse = np.unique(labels, return_inverse=True)
    offset = 0 if ids[0] == 0 else 1
    return (inverse.reshape(labels.shape) + offset).astype(np.intp, copy=False)


def nearest_two_cell_distances(labels: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel, the distances (d1 <= d2) to the nearest and second-nearest cell, exact where
    d2 <= radius; inf where fewer than two cells lie within `radius`; larger values may be
    inexact but are never smaller than the true distance.

    scipy has no "k nearest labels" transform, so each cell gets its own exact distance
    transform inside its bounding box grown by `radius`: a pixel within `radius` of a cell is
    inside that window, and every cell pixel is too, so the distance there is exact.
    """
    ids = _sequential(_check_labels(labels))
    d1 = np.full(ids.shape, np.inf, dtype=np.float32)
    d2 = np.full(ids.shape, np.inf, dtype=np.float32)
    for cell, box in enumerate(ndimage.find_objects(ids), start=1):
        if box is None:
            continue
        window = tuple(
            slice(max(s.start - radius, 0), min(s.stop + radius, n))
            for s, n in zip(box, ids.shape, strict=True)
        )
        distance = ndimage.distance_transform_edt(ids[window] != cell).astype(np.float32)
        near, second = d1[window], d2[window]  # views: updated in place
        np.minimum(second, np.maximum(near, distance), out=second)
        np.minimum(near, distance, out=near)
    return d1, d2


def border_weight(
    labels: np.ndarray, w0: float = 10.0, sigma: float = 5.0, tolerance: float = 1e-4
) -> np.ndarray:
    """The border term w0 * exp(-(d1 + d2)^2 / (2 sigma^2)) on background pixels, float32.

    Set to 0 where d1 + d2 > border_cutoff(w0, sigma, tolerance) (the true term is below
    `tolerance` there) and where fewer than two cells exist; exact elsewhere.
    """
    labels = _check_labels(labels)
    cutoff = border_cutoff(w0, sigma, tolerance)
    d1, d2 = nearest_two_cell_distances(labels, math.ceil(cutoff))
    total = d1 + d2
    near_two_cells = (labels == 0) & (total <= cutoff)
    term = np.zeros(labels.shape, dtype=np.float32)
    term[near_two_cells] = w0 * np.exp(-np.square(total[near_two_cells]) / (2.0 * sigma**2))
    return term


def weight_map(
    instance_labels: np.ndarray,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: Sequence[float] | np.ndarray | None = None,
    *,
    classes: np.ndarray | None = None,
    tolerance: float = 1e-4,
) -> np.ndarray:
    """U-Net loss weights w_c(x) + border term (see `border_weight`) for instance labels, float32.

    `classes` is the training target (class per pixel; default `labels > 0`: background,
    cell) and `class_weights` one weight per class, by default `class_weights_from_counts` of
    this image's classes (at least background and cell). The result differs from the exact map
    by less than `tolerance` anywhere (cutoff 23.99 px for the defaults w0=10, sigma=5,
    tolerance=1e-4). Callers with touching cells apply `separate_touching` first.
    """
    labels = _check_labels(instance_labels)
    binary = classes is None
    classes = (labels > 0) if binary else np.asarray(classes)
    if classes.shape != labels.shape:
        raise WeightMapError(f"classes {classes.shape} do not match the labels {labels.shape}")
    classes = classes.astype(np.intp)
    highest = int(classes.max(initial=0))
    if class_weights is None:
        n = max(N_CLASSES, highest + 1)
        class_weights = class_weights_from_counts(np.bincount(classes.ravel(), minlength=n))
    class_weights = np.asarray(class_weights, dtype=np.float32)
    fits = class_weights.size == N_CLASSES if binary else class_weights.size > highest
    if class_weights.ndim != 1 or not fits:
        wanted = "(background, cell)" if binary else f"one weight per class 0..{highest}"
        raise WeightMapError(f"class_weights must be {wanted}, got {class_weights.tolist()}")
    return class_weights[classes] + border_weight(labels, w0, sigma, tolerance)
