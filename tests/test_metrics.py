from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage
from skimage.metrics import adapted_rand_error

from segcore.metrics import (
    MetricInputError,
    dice,
    iou,
    object_scores,
    pixel_error,
    rand_error,
    rand_error_best,
    rand_scores,
    segmentation_scores,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

Y_TRUE = np.array([[0, 1, 1], [0, 0, 1], [1, 1, 0]])
Y_PRED = np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]])


def _isbi_cells(index: int = 0) -> np.ndarray:
    tifffile = pytest.importorskip("tifffile")
    path = DATA / "isbi2012_em" / "train-labels.tif"
    if not path.exists():
        pytest.skip(f"{path} absent")
    return tifffile.imread(path, key=index) == 255  # 255 = cell interior, 0 = membrane


def _dsb_instances() -> np.ndarray:
    tifffile = pytest.importorskip("tifffile")
    path = DATA / "dsb2018_stardist" / "mask2d.tif"
    if not path.exists():
        pytest.skip(f"{path} absent")
    return tifffile.imread(path).astype(np.int64)


def _skimage_isbi_rand_error(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """skimage's adapted Rand error with ISBI semantics: predicted background as singletons."""
    true_seg, _ = ndimage.label(y_true)
    pred_seg, n_pred = ndimage.label(y_pred)
    background = pred_seg == 0
    pred_seg[background] = n_pred + 1 + np.arange(np.count_nonzero(background))
    return adapted_rand_error(true_seg, pred_seg)


def test_issue_example_by_hand():
    # |T| = 5, |P| = 3, every predicted pixel is right: IoU(1) = 3/5 (the issue's "0.5" does
    # not fit any IoU definition: 0.5 would need a union of 6), background 4/6.
    np.testing.assert_allclose(iou(Y_TRUE, Y_PRED, 2), [4 / 6, 3 / 5])
    np.testing.assert_allclose(dice(Y_TRUE, Y_PRED, 2), [2 * 4 / (4 + 6), 2 * 3 / (5 + 3)])
    assert pixel_error(Y_TRUE, Y_PRED) == pytest.approx(2 / 9)
    scores = segmentation_scores(Y_TRUE, Y_PRED)
    assert set(scores) == {"iou", "dice", "pixel_error", "rand_error"}
    assert scores["iou"] == pytest.approx(0.6) and scores["dice"] == pytest.approx(0.75)


@settings(max_examples=40, deadline=None)
@given(
    arrays(np.int64, (7, 9), elements=st.integers(0, 2)),
    arrays(np.int64, (7, 9), elements=st.integers(0, 2)),
)
def test_iou_and_dice_match_set_definitions(y_true, y_pred):
    got_iou, got_dice = iou(y_true, y_pred, 3), dice(y_true, y_pred, 3)
    for k in range(3):
        t, p = y_true == k, y_pred == k
        inter, union = np.sum(t & p), np.sum(t | p)
        if union == 0:
            assert np.isnan(got_iou[k]) and np.isnan(got_dice[k])
        else:
            assert got_iou[k] == pytest.approx(inter / union)
            assert got_dice[k] == pytest.approx(2 * inter / (t.sum() + p.sum()))
    assert pixel_error(y_true, y_pred) == pytest.approx(np.mean(y_true != y_pred))


def test_bad_inputs_raise_one_clear_error():
    with pytest.raises(MetricInputError, match="shape mismatch"):
        iou(Y_TRUE, Y_PRED[:2], 2)
    with pytest.raises(MetricInputError, match="outside 0..1"):
        iou(Y_TRUE * 2, Y_PRED, 2)
    with pytest.raises(MetricInputError, match="integer labels"):
        dice(Y_TRUE.astype(float), Y_PRED, 2)
    with pytest.raises(MetricInputError, match="iou_threshold"):
        object_scores(Y_TRUE, Y_PRED, iou_threshold=0.3)


def test_rand_scores_by_hand():
    # True segments A = px 0..2 and B = px 4..5; px 3 is membrane and does not count.
    y_true = np.array([[1, 1, 1, 0, 1, 1]])
    # One predicted segment over everything: ordered pairs in one true segment 3*2 + 2*1 = 8,
    # in one predicted segment 5*4 = 20, in both 8 -> P = 0.4, R = 1, F = 16/28.
    p, r, f = rand_scores(y_true, np.ones_like(y_true))
    assert (p, r, f) == pytest.approx((0.4, 1.0, 16 / 28))
    # Prediction {0}, membrane at 1 (a singleton), {2}, membrane at 3 (not counted), {4, 5}:
    # pairs in both = pairs in one predicted segment = 2 -> P = 1, R = 2/8, F = 4/10.
    y_pred = np.array([[1, 0, 1, 0, 1, 1]])
    assert rand_scores(y_true, y_pred) == pytest.approx((1.0, 0.25, 0.4))
    assert rand_error(y_true, y_pred) == pytest.approx(0.6)
    assert rand_error(y_true, y_true) == 0.0
    # Predicted background inside a cell is singletons, not one segment: no pair agrees.
    assert rand_scores(np.ones((1, 4), int), np.array([[1, 0, 0, 1]]))[1:] == (0.0, 0.0)


def test_rand_error_matches_skimage_on_isbi_labels():
    cells = _isbi_cells(0)
    rng = np.random.default_rng(0)
    predictions = {
        "eroded (splits)": ndimage.binary_erosion(cells, iterations=2),
        "dilated (merges)": ndimage.binary_dilation(cells, iterations=2),
        "noisy": cells ^ (rng.random(cells.shape) < 0.05),
        "other slice": _isbi_cells(1),
    }
    for name, pred in predictions.items():
        are, sk_prec, sk_rec = _skimage_isbi_rand_error(cells, pred)
        precision, recall, fscore = rand_scores(cells, pred)
        assert 1 - fscore == pytest.approx(are, abs=1e-12), name
        # skimage divides by the true-segment pairs for what it calls precision: swapped names.
        assert (precision, recall) == pytest.approx((sk_rec, sk_prec), abs=1e-12), name
        assert 0.0 < rand_error(cells, pred) < 1.0, name


def test_rand_error_matches_skimage_at_scale():
    # 2048 x 2048 with thousands of segments on both sides: the sparse table keeps it cheap.
    rng = np.random.default_rng(1)
    y_true = ndimage.gaussian_filter(rng.random((2048, 2048)), 2) > 0.5
    y_pred = ndimage.gaussian_filter(rng.random((2048, 2048)), 2) > 0.5
    assert ndimage.label(y_true)[1] > 2000 and ndimage.label(y_pred)[1] > 2000
    are, _, _ = _skimage_isbi_rand_error(y_true, y_pred)
    assert rand_error(y_true, y_pred) == pytest.approx(are, abs=1e-12)


def test_rand_error_of_a_stack_is_the_mean_of_its_slices():
    cells = np.stack([_isbi_cells(0), _isbi_cells(1)])
    pred = np.stack([ndimage.binary_erosion(c, iterations=3) for c in cells])
    per_slice = [rand_error(t, p) for t, p in zip(cells, pred, strict=True)]
    assert per_slice[0] != per_slice[1]
    assert rand_error(cells, pred) == pytest.approx(np.mean(per_slice))
    with_empty = np.concatenate([cells, np.zeros_like(cells[:1])])
    assert np.isnan(rand_error(with_empty[2], with_empty[2]))
    assert rand_error(with_empty, np.concatenate([pred, pred[:1]])) == pytest.approx(
        np.mean(per_slice)
    )


def test_rand_error_best_picks_the_best_threshold():
    cells = _isbi_cells(0)
    # Cells at 0.7, membranes at 0.3, plus a rim of 0.45 that merges cells when thresholded low.
    prob = np.where(cells, 0.7, 0.3)
    prob[ndimage.binary_dilation(cells) & ~cells] = 0.45
    error, threshold = rand_error_best(cells, prob)
    assert 0.45 <= threshold < 0.7
    assert error == pytest.approx(rand_error(cells, prob > threshold))
    assert error < rand_error(cells, prob > 0.4)


def test_object_scores_by_hand():
    true = np.zeros((6, 8), np.int64)
    pred = np.zeros_like(true)
    true[0:2, 0:2] = 1  # 4 px, predicted exactly: IoU 1
    pred[0:2, 0:2] = 7
    true[3:5, 0:2] = 2  # 4 px, predicted 3 of them: IoU 3/4
    pred[3:5, 0:2] = 8
    pred[4, 1] = 0
    true[0, 5:7] = 3  # 2 px, two 1 px predictions inside: IoU 0.5 each, only one may match
    pred[0, 5] = 9
    pred[0, 6] = 10
    true[4, 5:8] = 4  # 3 px, prediction shifted by 2: IoU 1/5, a miss
    pred[4, 7] = 11
    pred[5, 6:8] = 11
    true[2, 5] = 5  # two 1 px objects under one 2 px prediction: the mirrored tie
    true[2, 6] = 6
    pred[2, 5:7] = 12
    s = object_scores(true, pred)
    assert (s.tp, s.fp, s.fn) == (4, 2, 2)
    assert (s.precision, s.recall) == pytest.approx((4 / 6, 4 / 6))
    assert s.f1 == pytest.approx(2 * 4 / (2 * 4 + 2 + 2))
    assert s.mean_matched_iou == pytest.approx((1 + 0.75 + 0.5 + 0.5) / 4)
    assert object_scores(true, pred, iou_threshold=0.8).tp == 1


def test_object_scores_match_brute_force_on_dsb2018():
    true = _dsb_instances()
    # A prediction with every kind of error: shifted, eroded, dropped and merged nuclei.
    pred = np.roll(true, (2, 1), axis=(0, 1))
    pred[ndimage.binary_erosion(pred > 0, iterations=2) == 0] = 0
    ids = np.unique(true[true > 0])
    pred[np.isin(pred, ids[::9])] = 0
    pred[np.isin(pred, ids[1::11])] = ids[1]
    for threshold in (0.5, 0.6, 0.75):
        s = object_scores(true, pred, threshold)
        # Brute force over boolean masks; above 0.5 a match is unique, so counting is matching.
        hits = 0
        for t in ids:
            tm = true == t
            for p in np.unique(pred[tm & (pred > 0)]):
                pm = pred == p
                if np.sum(tm & pm) / np.sum(tm | pm) >= threshold:
                    hits += 1
        n_pred = len(np.unique(pred[pred > 0]))
        assert (s.tp, s.fp, s.fn) == (hits, n_pred - hits, len(ids) - hits)
        assert 0 < s.tp < len(ids)
    perfect = object_scores(true, true)
    assert (perfect.tp, perfect.f1, perfect.mean_matched_iou) == (125, 1.0, 1.0)


def test_empty_maps_give_undefined_not_perfect_scores():
    empty = np.zeros((4, 4), np.int64)
    scores = segmentation_scores(empty, empty)
    assert np.isnan(scores["iou"]) and np.isnan(scores["dice"])
    assert scores["pixel_error"] == 0.0
    s = object_scores(empty, empty)
    assert s.tp == s.fp == s.fn == 0 and np.isnan(s.f1)


def test_segmentation_scores_on_a_batch_pool_pixels_and_average_rand():
    cells = np.stack([_isbi_cells(0), _isbi_cells(1)]).astype(np.uint8)
    pred = np.stack([ndimage.binary_erosion(c, iterations=2) for c in cells]).astype(np.uint8)
    scores = segmentation_scores(cells, pred)
    assert scores["iou"] == pytest.approx(iou(cells, pred, 2)[1])
    assert scores["pixel_error"] == pytest.approx(np.mean(cells != pred))
    assert scores["rand_error"] == pytest.approx(
        np.mean([rand_error(t, p) for t, p in zip(cells, pred, strict=True)])
    )
