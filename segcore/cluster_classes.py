"""From clusters to classes: which clusters of a bootstrap clustering are nuclei.

A clustering (segcore.bootstrap) names regions, not classes. A mapping says which cluster ids
are the foreground class (nucleus), either given (`parse_cluster_ids("3,7")`) or proposed by a
stated rule from each cluster's mean of a stain feature (haematoxylin concentration of H&E by
`skimage.color.rgb2hed`, channel H; intensity of fluorescence) over the pixels it holds:

    `propose_nuclei`    every cluster whose mean lies above Otsu's threshold of the feature
                        over the same pixels: the clusters that are stained, on average, by
                        Otsu's criterion (the clustering decides the shapes, Otsu the cut)
    `propose_nucleus`   the one cluster with the highest mean, among those holding at least
                        `min_fraction` of the pixels (so a speck of a few dark pixels cannot
                        be "nucleus"); the first rule falls back to it when no mean is above

Worked example: clusters 0, 1, 2 with mean haematoxylin 0.01, 0.09, 0.04 over 60 %, 25 %,
15 % of the pixels and a threshold of 0.03 -> propose_nuclei = (1, 2), propose_nucleus = 1.
On six MoNuSeg tiles (benchmarks/bootstrap.py) the first rule scored foreground Dice 0.705,
the second 0.694, Otsu's threshold chosen per image 0.696.
"""

from __future__ import annotations

import numpy as np
from skimage.color import rgb2hed


class ClusterMappingError(ValueError):
    """A mapping that cannot be parsed, or images no rule applies to."""


def parse_cluster_ids(text: str | int | list | tuple) -> tuple[int, ...]:
    """Cluster ids from "3,7" (or 3, or [3, 7]), sorted and without repeats.

    Example: parse_cluster_ids("7, 3,7") -> (3, 7).
    """
    if isinstance(text, int):
        items: list = [text]
    elif isinstance(text, str):
        items = [part.strip() for part in text.split(",")]
    else:
        items = list(text)
    try:
        ids = sorted({int(item) for item in items})
    except (TypeError, ValueError):
        raise ClusterMappingError(
            f"cluster ids must be integers separated by commas (e.g. 3,7), got {text!r}"
        ) from None
    if not ids or ids[0] < 0:
        raise ClusterMappingError(f"cluster ids must be one or more integers >= 0, got {text!r}")
    return tuple(ids)


def stain_feature(image: np.ndarray) -> np.ndarray:
    """The per-pixel feature the automatic rule ranks clusters by, (H, W) float: haematoxylin
    concentration of an RGB image (3, H, W), intensity of a one-channel image (1, H, W)."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ClusterMappingError(
            f"the automatic nucleus rule needs an RGB (H&E) or one-channel (fluorescence) "
            f"image, got shape {image.shape}; name the nucleus clusters instead (nucleus=3,7)"
        )
    if image.shape[0] == 1:
        return image[0].astype(np.float64)
    scale = 65535.0 if image.dtype == np.uint16 else 255.0
    return rgb2hed(np.moveaxis(image, 0, -1).astype(np.float64) / scale)[..., 0]


def cluster_means(
    clusters: np.ndarray, feature: np.ndarray, n_clusters: int
) -> tuple[np.ndarray, np.ndarray]:
    """(mean feature, pixel count) of every cluster id 0..n_clusters-1; NaN for an empty one."""
    if clusters.shape != feature.shape:
        raise ClusterMappingError(
            f"clusters {clusters.shape} and feature {feature.shape} differ in shape"
        )
    ids = clusters.ravel().astype(np.int64)
    counts = np.bincount(ids, minlength=n_clusters)
    sums = np.bincount(ids, weights=feature.ravel(), minlength=n_clusters)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return means, counts


def propose_nucleus(means: np.ndarray, counts: np.ndarray, min_fraction: float = 0.01) -> int:
    """The cluster with the highest mean among those holding at least `min_fraction` of the
    pixels (`stain_feature`: darkest haematoxylin, brightest fluorescence)."""
    total = counts.sum()
    if total == 0:
        raise ClusterMappingError("no clustered pixels to propose a nucleus cluster from")
    eligible = (counts >= min_fraction * total) & ~np.isnan(means)
    if not eligible.any():
        eligible = counts > 0
    return int(np.argmax(np.where(eligible, means, -np.inf)))


def propose_nuclei(
    means: np.ndarray, counts: np.ndarray, threshold: float, min_fraction: float = 0.01
) -> tuple[int, ...]:
    """Every cluster holding pixels whose mean exceeds `threshold` (Otsu's threshold of the
    feature over the clustered pixels); the darkest (`propose_nucleus`) when there is none."""
    above = np.flatnonzero((counts > 0) & (np.nan_to_num(means, nan=-np.inf) > threshold))
    if len(above):
        return tuple(int(i) for i in above)
    return (propose_nucleus(means, counts, min_fraction),)


def foreground(clusters: np.ndarray, nucleus: tuple[int, ...]) -> np.ndarray:
    """1 where a pixel's cluster is one of `nucleus`, else 0 (uint8)."""
    return np.isin(clusters, np.asarray(nucleus, dtype=clusters.dtype)).astype(np.uint8)
