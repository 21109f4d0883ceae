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

import numpy as np
from scipy import ndimage

N_CLASSES = 2  # background (0) and cell (1)


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


def training_target(labels: np.ndarray) -> np.ndarray:
    """The class map a U-Net trains on: 1 = cell, 0 = background incl. borders between cells."""
    return (separate_touching(labels) > 0).astype(np.uint8)


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
    tolerance: float = 1e-4,
) -> np.ndarray:
    """U-Net loss weights w_c(x) + border term (see `border_weight`) for instance labels, float32.

    `class_weights` = (background, cell); by default `class_weights_from_counts` of this image.
    The result differs from the exact map by less than `tolerance` anywhere (cutoff 23.99 px for
    the defaults w0=10, sigma=5, tolerance=1e-4). Callers with touching cells apply
    `separate_touching` first.
    """
    labels = _check_labels(instance_labels)
    cell = (labels > 0).astype(np.intp)
    if class_weights is None:
        class_weights = class_weights_from_counts(np.bincount(cell.ravel(), minlength=N_CLASSES))
    class_weights = np.asarray(class_weights, dtype=np.float32)
    if class_weights.shape != (N_CLASSES,):
        raise WeightMapError(
            f"class_weights must be (background, cell), got {class_weights.tolist()}"
        )
    return class_weights[cell] + border_weight(labels, w0, sigma, tolerance)
