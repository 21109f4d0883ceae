"""U-Net weight maps: the windowed `weight_map` must equal the brute-force definition."""

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from reference_weights import weight_map_reference
from scipy import ndimage

from segcore.weights import (
    TARGET_CLASSES,
    WeightMapError,
    border_cutoff,
    border_halo,
    cell_boundaries,
    class_weights_from_counts,
    separate_touching,
    target_classes,
    training_target,
    weight_map,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def random_cells(shape: tuple[int, int], n_cells: int, seed: int) -> np.ndarray:
    """Disks of radius 3-14 px at random centres (some cut by the image edge); later disks
    overwrite earlier ones, so many cells touch."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, dtype=np.uint32)
    for cell in range(1, n_cells + 1):
        cy, cx = rng.uniform(-5, shape[0] + 5), rng.uniform(-5, shape[1] + 5)
        radius = rng.uniform(3, 14)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 < radius**2] = cell
    return labels


def border_term(weights: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Weights minus the class term of `weight_map`'s default class weights."""
    cell = (labels > 0).astype(int)
    return weights - class_weights_from_counts(np.bincount(cell.ravel(), minlength=2))[cell]


def test_cutoff_is_where_the_border_term_reaches_the_tolerance():
    cutoff = border_cutoff(10.0, 5.0, 1e-3)
    assert 10.0 * math.exp(-(cutoff**2) / 50.0) == pytest.approx(1e-3)
    assert border_halo(10.0, 5.0, 1e-3) == 22 == math.ceil(cutoff)
    assert border_halo(10.0, 5.0, 1e-4) == 24
    assert border_halo(1e-4, 5.0, 1e-3) == 0  # the term never reaches the tolerance


def test_class_weights_balance_class_frequencies():
    np.testing.assert_allclose(class_weights_from_counts([75, 25]), [100 / 150, 100 / 50])
    np.testing.assert_allclose(class_weights_from_counts([40, 0]), [0.5, 0.0])


def test_reference_matches_hand_computed_distances():
    labels = np.zeros((11, 21), dtype=np.uint8)
    labels[5, 5], labels[5, 15] = 1, 2
    reference = weight_map_reference(labels, w0=10.0, sigma=5.0, class_weights=[0.0, 0.0])
    # Midway between the cells: d1 = d2 = 5.
    assert reference[5, 10] == pytest.approx(10 * math.exp(-(10**2) / 50))
    # Corner (0, 0): sqrt(5^2 + 5^2) to cell 1, sqrt(5^2 + 15^2) to cell 2.
    d = math.hypot(5, 5) + math.hypot(5, 15)
    assert reference[0, 0] == pytest.approx(10 * math.exp(-(d**2) / 50), rel=1e-6)
    assert reference[5, 5] == reference[5, 15] == 0.0  # cells get no border term


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weight_map_equals_brute_force(seed):
    labels = random_cells((160, 190), n_cells=70, seed=seed)
    fast, reference = weight_map(labels), weight_map_reference(labels)
    assert fast.dtype == np.float32
    np.testing.assert_allclose(fast, reference, rtol=0, atol=1e-4)
    # Exact (to float32 rounding) wherever the term is above the tolerance.
    strong = border_term(reference, labels) >= 1e-4
    assert strong.sum() > 1000
    np.testing.assert_allclose(fast[strong], reference[strong], rtol=1e-5, atol=1e-5)


def test_weight_map_of_separated_touching_cells_equals_brute_force():
    labels = separate_touching(random_cells((128, 150), n_cells=90, seed=5))
    np.testing.assert_allclose(weight_map(labels), weight_map_reference(labels), atol=1e-4)


def test_weight_map_on_isbi_membranes():
    path = DATA / "isbi2012_em" / "train-labels.tif"
    if not path.exists():
        pytest.skip(f"{path} not present")
    tifffile = pytest.importorskip("tifffile")
    cells, n_cells = ndimage.label(tifffile.imread(path, key=0) > 127)
    assert n_cells > 100
    fast, reference = weight_map(cells), weight_map_reference(cells)
    np.testing.assert_allclose(fast, reference, rtol=0, atol=1e-4)
    # Thin membranes between cells are where the paper's map peaks (close to w_c + w0).
    assert border_term(fast, cells)[cells == 0].max() > 8.0


def test_weight_map_on_dsb2018_nuclei():
    path = DATA / "dsb2018_stardist" / "mask2d.tif"
    if not path.exists():
        pytest.skip(f"{path} not present")
    tifffile = pytest.importorskip("tifffile")
    labels = separate_touching(tifffile.imread(path))
    np.testing.assert_allclose(weight_map(labels), weight_map_reference(labels), atol=1e-4)


def test_fewer_than_two_cells_have_no_border_term():
    labels = np.zeros((40, 50), dtype=np.int32)
    np.testing.assert_array_equal(weight_map(labels), np.full(labels.shape, 0.5, np.float32))
    labels[10:20, 10:20] = 7
    weights = weight_map(labels, class_weights=[1.0, 3.0])
    np.testing.assert_array_equal(weights, np.where(labels > 0, 3.0, 1.0).astype(np.float32))


def test_huge_sparse_ids_give_the_same_map():
    labels = random_cells((90, 100), n_cells=25, seed=3)
    sparse = np.where(labels > 0, labels.astype(np.uint64) * 150_000_000 + 11, 0)
    np.testing.assert_array_equal(weight_map(sparse), weight_map(labels))


def test_separate_touching_leaves_a_one_pixel_gap():
    labels = np.zeros((6, 8), dtype=np.uint16)
    labels[1:5, 0:4], labels[1:5, 4:8] = 2, 5  # cells touching along a column, and the edges
    separated = separate_touching(labels)
    expected = labels.copy()
    expected[1:5, 3] = 0  # the smaller id gives up the contact column
    np.testing.assert_array_equal(separated, expected)
    np.testing.assert_array_equal(training_target(labels), (expected > 0).astype(np.uint8))
    assert training_target(labels).dtype == np.uint8


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.uint8, st.tuples(st.integers(1, 12), st.integers(1, 12)), elements=st.integers(0, 4))
)
def test_separate_touching_leaves_no_cells_in_contact(labels):
    separated = separate_touching(labels)
    assert np.all((separated == labels) | (separated == 0))  # only ever zeroes pixels
    padded = np.pad(separated, 1)
    h, w = labels.shape
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            neighbour = padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
            touching = (separated > 0) & (neighbour > 0) & (neighbour != separated)
            assert not touching.any()
    # A cell pixel with no larger-id neighbour keeps its id.
    larger = ndimage.maximum_filter(labels, size=3, mode="constant") > labels
    np.testing.assert_array_equal(separated[~larger], labels[~larger])


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.zeros((2, 3, 4), dtype=np.uint8), "must be 2-D"),
        (np.zeros((3, 4), dtype=np.float32), "must be integers"),
        (np.full((3, 4), -1, dtype=np.int16), "must be >= 0"),
    ],
)
def test_bad_labels_are_rejected(labels, message):
    with pytest.raises(WeightMapError, match=message):
        weight_map(labels)


def test_bad_parameters_are_rejected():
    with pytest.raises(WeightMapError, match="sigma > 0"):
        weight_map(np.zeros((4, 4), dtype=np.uint8), sigma=0.0)
    with pytest.raises(WeightMapError, match="class_weights"):
        weight_map(np.zeros((4, 4), dtype=np.uint8), class_weights=[1.0, 2.0, 3.0])


def test_cell_boundaries_by_hand():
    labels = np.zeros((6, 6), dtype=np.uint8)
    labels[1:5, 1:5] = 3
    ring = np.zeros((6, 6), dtype=bool)
    ring[1:5, 1:5] = True
    ring[2:4, 2:4] = False  # the 2 x 2 core is more than 1 px from anything else
    np.testing.assert_array_equal(cell_boundaries(labels, 1), ring)
    np.testing.assert_array_equal(cell_boundaries(labels, 2), labels > 0)
    # The image's edge counts as background; a neighbouring cell counts as "not the same".
    whole = np.ones((5, 5), dtype=np.uint8)
    assert cell_boundaries(whole, 1).sum() == 16 and not cell_boundaries(whole, 1)[2, 2]
    two = np.ones((3, 7), dtype=np.uint8)
    two[:, 4:] = 2
    np.testing.assert_array_equal(cell_boundaries(two, 1)[1], [1, 0, 0, 1, 1, 0, 1])
    with pytest.raises(WeightMapError, match="boundary width"):
        cell_boundaries(labels, 0)


def test_three_class_target_of_two_touching_cells():
    # The docstring's example: two 3 x 3 cells side by side on background, width 1.
    labels = np.zeros((5, 8), dtype=np.uint16)
    labels[1:4, 1:4], labels[1:4, 4:7] = 1, 2
    expected = np.zeros((5, 8), dtype=np.uint8)
    expected[1:4, 1:3] = 2  # cell 1 gave up its right column to the gap: all boundary
    expected[1:4, 4:7] = 2
    expected[2, 5] = 1  # cell 2's centre is its interior
    target = training_target(labels, "cells+boundaries", boundary_width=1)
    np.testing.assert_array_equal(target, expected)
    assert target.dtype == np.uint8
    np.testing.assert_array_equal(training_target(labels), (expected > 0).astype(np.uint8))


def test_three_class_interiors_of_touching_cells_never_touch():
    labels = random_cells((120, 140), n_cells=40, seed=5)
    target = training_target(labels, "cells+boundaries", boundary_width=2)
    # Foreground is the binary target's, split into interior and boundary.
    np.testing.assert_array_equal(target > 0, training_target(labels) > 0)
    interiors, n = ndimage.label(target == 1)
    owners = [np.unique(labels[interiors == k]) for k in range(1, n + 1)]
    assert n > 20 and all(len(ids) == 1 for ids in owners)  # each seed inside one cell


def test_class_weights_one_per_class_of_the_target():
    labels = random_cells((60, 70), n_cells=12, seed=6)
    separated = separate_touching(labels)
    target = training_target(labels, "cells+boundaries")
    counts = np.bincount(target.ravel(), minlength=3)
    weights = weight_map(separated, w0=0.0, classes=target)
    expected = class_weights_from_counts(counts)[target].astype(np.float32)
    np.testing.assert_allclose(weights, expected, rtol=1e-6)
    np.testing.assert_allclose(expected.mean(), 1.0, rtol=1e-6)  # N / (k N_c) averages to 1
    given = weight_map(separated, 0.0, 5.0, [1.0, 2.0, 5.0], classes=target)
    np.testing.assert_array_equal(given, np.array([1, 2, 5], np.float32)[target])
    with pytest.raises(WeightMapError, match="one weight per class"):
        weight_map(separated, classes=target, class_weights=[1.0, 2.0])


def test_target_classes_follow_the_class_count():
    assert target_classes(2) == TARGET_CLASSES["cells"] == ("background", "cell")
    assert target_classes(3) == ("background", "cell", "boundary")
    assert target_classes(4) == ("background", "class1", "class2", "class3")
