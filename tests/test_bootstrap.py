"""Differentiable feature clustering (segcore.bootstrap): the loss terms on hand-made responses,
seeded training, the label count falling on a two-region image, scribbles pinning clusters,
and chunk-wise prediction equal to the whole image's."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segcore.bootstrap import (
    ClusteringConfig,
    ClusteringError,
    continuity_loss,
    fit_clustering,
    predict_clusters,
    receptive_halo,
    scribble_loss,
    similarity_loss,
    strokes_learned,
)

#: A small network: a few seconds of CPU for every test here.
SMALL = ClusteringConfig(channels=16, n_clusters=16, max_iterations=60, min_labels=2)


def two_regions(size: int = 48, seed: int = 0) -> np.ndarray:
    """(1, 3, size, size) uint8: a dark purple left half and a pale pink right half, noisy."""
    rng = np.random.default_rng(seed)
    image = np.empty((3, size, size), dtype=np.float64)
    image[:, :, : size // 2] = np.array([90.0, 60.0, 140.0])[:, None, None]
    image[:, :, size // 2 :] = np.array([235.0, 190.0, 215.0])[:, None, None]
    image += rng.normal(0, 12, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)[None]


def test_continuity_is_zero_for_a_constant_response_and_counts_steps():
    assert continuity_loss(torch.full((2, 5, 7, 9), 3.5)).item() == 0.0
    step = torch.tensor([[[[0.0, 2.0], [0.0, 2.0]]]])  # columns differ by 2, rows do not
    assert continuity_loss(step).item() == pytest.approx(2.0)
    assert continuity_loss(step.transpose(2, 3)).item() == pytest.approx(2.0)


def test_similarity_is_the_cross_entropy_with_the_response_argmax():
    assert similarity_loss(torch.zeros(1, 4, 3, 3)).item() == pytest.approx(math.log(4))
    response = torch.randn(2, 5, 4, 6, generator=torch.Generator().manual_seed(1))
    expected = F.cross_entropy(response, response.argmax(1))
    assert similarity_loss(response).item() == pytest.approx(expected.item())
    confident = torch.zeros(1, 3, 2, 2)
    confident[:, 1] = 20.0
    assert similarity_loss(confident).item() < 1e-6


def test_scribble_loss_covers_the_stroked_pixels_only():
    response = torch.zeros(1, 3, 2, 2)
    response[0, 2, 0, 0] = 5.0
    strokes = torch.tensor([[[2, 0], [0, 0]]])
    # One stroked pixel whose stroke (cluster 2) is what it already prefers.
    expected = -torch.log_softmax(response[0, :, 0, 0], dim=0)[2]
    assert scribble_loss(response, strokes).item() == pytest.approx(expected.item())


def test_training_is_determined_by_the_seed():
    tiles = two_regions()
    config = SMALL.model_copy(update={"max_iterations": 5, "min_labels": 1})
    first, again = fit_clustering(tiles, config), fit_clustering(tiles, config)
    other = fit_clustering(tiles, config.model_copy(update={"seed": 1}))
    assert first.losses == again.losses
    for name, value in first.network.state_dict().items():
        torch.testing.assert_close(value, again.network.state_dict()[name], rtol=0, atol=0)
    assert first.losses != other.losses


def test_the_label_count_falls_to_the_two_regions():
    tiles = two_regions()
    run = fit_clustering(tiles, SMALL)
    assert run.label_counts[0] > 2
    assert run.label_counts[-1] <= 2 < run.label_counts[0]
    clusters = predict_clusters(run.network, tiles[0])
    half = tiles.shape[-1] // 2
    left, right = (
        np.bincount(c.ravel()).argmax() for c in (clusters[:, :half], clusters[:, half:])
    )
    assert left != right
    # The halves are (almost) one cluster each.
    assert (clusters[:, :half] == left).mean() > 0.9
    assert (clusters[:, half:] == right).mean() > 0.9


def test_scribbles_pin_the_stroked_pixels_cluster():
    tiles = two_regions(seed=3)
    strokes = np.zeros((1, *tiles.shape[2:]), dtype=np.uint8)
    strokes[0, 10:14, 4:20] = 5  # a stroke across the dark half: cluster 5
    strokes[0, 30:34, 28:44] = 9  # one across the pale half: cluster 9
    run = fit_clustering(tiles, SMALL, scribbles=strokes)
    clusters = predict_clusters(run.network, tiles[0])
    stroked = strokes[0] > 0
    assert (clusters[stroked] == strokes[0][stroked]).mean() > 0.95


def test_prediction_in_tiles_equals_the_whole_image():
    tiles = two_regions(size=40)
    run = fit_clustering(tiles, SMALL.model_copy(update={"max_iterations": 3, "min_labels": 1}))
    whole = predict_clusters(run.network, tiles[0], tile=1000)
    assert receptive_halo(SMALL) == 2
    for tile in (7, 16, 33):
        np.testing.assert_array_equal(predict_clusters(run.network, tiles[0], tile=tile), whole)


def test_bad_input_is_one_clear_error():
    with pytest.raises(ClusteringError, match="non-empty"):
        fit_clustering(np.zeros((0, 3, 8, 8)), SMALL)
    with pytest.raises(ClusteringError, match="no stroke"):
        fit_clustering(two_regions(), SMALL, scribbles=np.zeros((1, 48, 48), np.uint8))
    with pytest.raises(ClusteringError, match="0..15"):
        fit_clustering(two_regions(), SMALL, scribbles=np.full((1, 48, 48), 16, np.uint8))
    run = fit_clustering(two_regions(), SMALL.model_copy(update={"max_iterations": 1}))
    with pytest.raises(ClusteringError, match=r"\(3, H, W\)"):
        predict_clusters(run.network, np.zeros((1, 8, 8), np.uint8))


def test_scribble_loss_weighs_each_stroke_value_alike_and_a_strokeless_batch_as_zero():
    response = torch.zeros(1, 3, 1, 4, requires_grad=True)
    # Stroke 1 on three pixels, stroke 2 on one: every pixel scores log(3), so does each mean.
    strokes = torch.tensor([[[1, 1, 1, 2]]])
    assert scribble_loss(response, strokes).item() == pytest.approx(np.log(3))
    logits = torch.zeros(1, 3, 1, 4)
    logits[0, 1, 0, :3] = 4.0  # stroke 1 learned, stroke 2 not: the mean of the two means
    per_value = [-torch.log_softmax(logits[0, :, 0, i], 0)[v] for i, v in ((0, 1), (3, 2))]
    assert scribble_loss(logits, strokes).item() == pytest.approx(float(sum(per_value) / 2))
    empty = scribble_loss(response, torch.zeros(1, 1, 4, dtype=torch.long))
    empty.backward()
    assert empty.item() == 0.0 and torch.isfinite(response.grad).all()


def test_strokes_are_learned_only_when_every_value_agrees():
    strokes = torch.tensor([[[1, 1, 1, 1, 2, 0]]])
    assert strokes_learned(torch.tensor([[[1, 1, 1, 1, 2, 5]]]), strokes, 2)
    # 80% of all stroked pixels agree, but none of stroke 2's.
    assert not strokes_learned(torch.tensor([[[1, 1, 1, 1, 0, 5]]]), strokes, 2)
    assert not strokes_learned(torch.tensor([[[1, 1, 1, 1, 2, 5]]]), strokes, 3)  # one missing
