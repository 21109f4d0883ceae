"""Cluster -> class mapping (segcore.cluster_classes): given ids, and the stated automatic rule
(clusters above Otsu's threshold of haematoxylin or intensity, else the darkest)."""

from __future__ import annotations

import numpy as np
import pytest

from segcore.cluster_classes import (
    ClusterMappingError,
    cluster_means,
    foreground,
    parse_cluster_ids,
    propose_nuclei,
    propose_nucleus,
    stain_feature,
)
from segcore.clustering_input import SlideScale, clustering_input


def test_cluster_ids_parse_from_text_and_lists():
    assert parse_cluster_ids("7, 3,7") == (3, 7)
    assert parse_cluster_ids(4) == (4,)
    assert parse_cluster_ids([2, 1]) == (1, 2)
    for bad in ("3,x", "", "-1"):
        with pytest.raises(ClusterMappingError, match="cluster ids"):
            parse_cluster_ids(bad)


def test_haematoxylin_ranks_purple_nuclei_above_pink_stroma_and_glass():
    # Columns: glass, eosin-pink stroma, haematoxylin-purple nucleus (segcore.synthetic's colours).
    colours = np.array([[241, 240, 244], [208, 112, 164], [80, 40, 140]], np.uint8)
    image = colours.T[:, None, :]  # (3, 1, 3)
    h = stain_feature(image)[0]
    assert h[2] > h[1] and h[2] > h[0]


def test_the_darkest_haematoxylin_cluster_is_proposed():
    means = np.array([0.01, 0.09, 0.04])
    counts = np.array([600, 250, 150])
    assert propose_nucleus(means, counts) == 1
    # A speck of very dark pixels (0.5 % of the pixels) is passed over.
    assert propose_nucleus(np.append(means, 0.5), np.append(counts, 5)) == 1


def test_on_fluorescence_the_brightest_cluster_is_nucleus():
    image = np.zeros((1, 4, 4), np.uint16)
    image[0, :2] = 900
    image[0, 2:] = 40
    clusters = np.zeros((4, 4), np.uint8)
    clusters[:2] = 3
    means, counts = cluster_means(clusters, stain_feature(image), n_clusters=5)
    assert np.isnan(means[1]) and counts[1] == 0
    assert means[3] == 900 and means[0] == 40
    assert propose_nucleus(means, counts) == 3
    np.testing.assert_array_equal(foreground(clusters, (3,)), (clusters == 3).astype(np.uint8))


def test_images_no_rule_fits_are_refused():
    with pytest.raises(ClusterMappingError, match="nucleus=3,7"):
        stain_feature(np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ClusterMappingError, match="no clustered pixels"):
        propose_nucleus(np.full(3, np.nan), np.zeros(3, np.int64))


def test_clustering_input_is_the_stain_feature_standardised_per_slide():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3, 40, 50), dtype=np.uint8)
    scale = SlideScale.of(stain_feature(image))
    x = clustering_input(image, scale)
    assert x.shape == (1, 40, 50) and x.dtype == np.float32
    # Centred on the slide's Otsu threshold: positive exactly where the feature is above it.
    feature = stain_feature(image)
    np.testing.assert_array_equal(x[0] > 0, feature > scale.centre)
    assert abs(float(x.std()) - 1) < 1e-4
    # Pixel by pixel: a block of the slide gets the values the whole slide gives there.
    np.testing.assert_array_equal(clustering_input(image[:, 5:20, 7:31], scale), x[:, 5:20, 7:31])
    # The worked example of the module docstring, on one-channel intensities.
    example = clustering_input(np.array([[[9, 5]]], np.uint8), SlideScale(centre=5.0, std=2.0))
    np.testing.assert_allclose(example, [[[2.0, 0.0]]])
    with pytest.raises(ValueError, match="no pixels"):
        SlideScale.of(np.empty(0))


def test_the_clusters_above_otsus_threshold_are_nuclei():
    """The module docstring's worked example, and the fallback when none is above."""
    means = np.array([0.01, 0.09, 0.04, np.nan])
    counts = np.array([60, 25, 15, 0])
    assert propose_nuclei(means, counts, threshold=0.03) == (1, 2)
    assert propose_nucleus(means, counts) == 1
    assert propose_nuclei(means, counts, threshold=0.5) == (1,)
