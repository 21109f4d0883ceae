"""The U-Net weight map by its definition, brute force: the oracle `segcore.weights.weight_map`
is checked against (tests/test_weights.py) and timed against (benchmarks/weights.py).

One whole-image distance transform per cell and no cutoff, so it costs (cells x pixels): a
256 x 256 image with 100 cells is 100 transforms of 65,536 pixels each.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from segcore.weights import N_CLASSES, class_weights_from_counts


def weight_map_reference(
    instance_labels: np.ndarray,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: Sequence[float] | np.ndarray | None = None,
) -> np.ndarray:
    """w_c(x) + w0 * exp(-(d1 + d2)^2 / (2 sigma^2)) on background pixels near two or more
    cells (float32), with d1, d2 exact distances to the nearest and second-nearest cell."""
    labels = np.asarray(instance_labels)
    d1 = np.full(labels.shape, np.inf)
    d2 = np.full(labels.shape, np.inf)
    for cell in np.unique(labels[labels > 0]):
        distance = ndimage.distance_transform_edt(labels != cell)
        d2 = np.minimum(d2, np.maximum(d1, distance))
        d1 = np.minimum(d1, distance)
    two_cells = (labels == 0) & np.isfinite(d2)
    term = np.zeros(labels.shape)
    term[two_cells] = w0 * np.exp(-np.square(d1 + d2)[two_cells] / (2.0 * sigma**2))
    cell = (labels > 0).astype(np.intp)
    if class_weights is None:
        class_weights = class_weights_from_counts(np.bincount(cell.ravel(), minlength=N_CLASSES))
    return (np.asarray(class_weights)[cell] + term).astype(np.float32)
