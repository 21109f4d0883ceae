import time
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
    aggregated_jaccard_index,
    dice,
    iou,
    object_scores,
    panoptic_quality,
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


def _boxes(shape: tuple[int, int], *boxes: tuple[int, int, int, int, int]) -> np.ndarray:
    """An instance map with box `id` at rows y0:y1, columns x0:x1 for each (id, y0, y1, x0, x1)."""
    out = np.zeros(shape, np.int64)
    for i, y0, y1, x0, x1 in boxes:
        out[y0:y1, x0:x1] = i
    return out


def _relabel(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The same objects under other ids: a random injective map of the positive ids."""
    ids = np.unique(labels[labels > 0])
    new = rng.choice(10**9, size=ids.size, replace=False) + 1
    lookup = dict(zip(ids.tolist(), new.tolist(), strict=True))
    return np.vectorize(lambda v: lookup.get(v, 0), otypes=[np.int64])(labels)


def _reference_aji(true: np.ndarray, pred: np.ndarray) -> float:
    """AJI object by object on boolean masks (Kumar et al. 2017; ties: larger overlap, lower id)."""
    inter_sum = union_sum = 0
    picked = set()
    for t in np.unique(true[true > 0]):
        tm = true == t
        best = None  # (iou, overlap, -id), union, id
        for p in np.unique(pred[tm & (pred > 0)]):
            pm = pred == p
            i, u = int(np.sum(tm & pm)), int(np.sum(tm | pm))
            key = (i / u, i, -p)
            if best is None or key > best[0]:
                best = (key, u, p)
        if best is None:
            union_sum += int(tm.sum())
        else:
            inter_sum += best[0][1]
            union_sum += best[1]
            picked.add(best[2])
    for p in np.unique(pred[pred > 0]):
        if p not in picked:
            union_sum += int(np.sum(pred == p))
    return inter_sum / union_sum


def _perturbed(true: np.ndarray, seed: int) -> np.ndarray:
    """A prediction with every kind of error: shifted, dropped, merged and spurious objects."""
    rng = np.random.default_rng(seed)
    pred = np.roll(true, (1, 0), axis=(0, 1))
    ids = np.unique(true[true > 0])
    pred[np.isin(pred, rng.choice(ids, ids.size // 8, replace=False))] = 0
    merged = rng.choice(ids, ids.size // 8, replace=False)
    pred[np.isin(pred, merged)] = merged[0]
    spurious = ndimage.label(ndimage.gaussian_filter(rng.random(true.shape), 2) > 0.62)[0]
    pred[(pred == 0) & (spurious > 0)] = spurious[(pred == 0) & (spurious > 0)] + true.max()
    return pred


def _blobs(shape: tuple[int, int], seed: int, sigma: float = 2.0) -> np.ndarray:
    """Random 4-connected blobs as an instance map."""
    rng = np.random.default_rng(seed)
    return ndimage.label(ndimage.gaussian_filter(rng.random(shape), sigma) > 0.52)[0]


def test_shifted_squares_by_hand():
    # 2 x 2 squares, the prediction one column to the right: overlap 2 px, union 6 px, IoU 1/3.
    true = _boxes((3, 4), (1, 0, 2, 0, 2))
    pred = _boxes((3, 4), (5, 0, 2, 1, 3))
    assert aggregated_jaccard_index(true, pred) == pytest.approx(2 / 6)
    pq, sq, dq = panoptic_quality(true, pred)
    assert (pq, dq) == (0.0, 0.0) and np.isnan(sq)  # no match: TP 0, FP 1, FN 1
    assert object_scores(true, pred).tp == 0
    # 3 x 3 squares, one row down: overlap 6, union 12, IoU exactly 0.5. object_scores counts
    # IoU >= 0.5 as a match, panoptic quality only IoU > 0.5 (Kirillov et al.).
    true = _boxes((4, 3), (1, 0, 3, 0, 3))
    pred = _boxes((4, 3), (2, 1, 4, 0, 3))
    assert aggregated_jaccard_index(true, pred) == pytest.approx(0.5)
    assert object_scores(true, pred).tp == 1
    assert panoptic_quality(true, pred)[0] == 0.0
    # Shifted by one row in a 4 x 3 box instead: overlap 9, union 15, IoU 0.6, a match for both.
    true = _boxes((5, 3), (1, 0, 4, 0, 3))
    pred = _boxes((5, 3), (2, 1, 5, 0, 3))
    assert panoptic_quality(true, pred) == pytest.approx((0.6, 0.6, 1.0))


def test_aji_merging_touching_nuclei_scores_lower_than_splitting_them():
    true = _boxes((2, 4), (1, 0, 2, 0, 2), (2, 0, 2, 2, 4))  # two touching 2 x 2 nuclei
    merged = _boxes((2, 4), (9, 0, 2, 0, 4))
    # Both nuclei pick the 8 px box: I = 4 + 4, U = 8 + 8.
    assert aggregated_jaccard_index(true, merged) == pytest.approx(0.5)
    # Split one column too far right: nucleus 1 picks the 6 px part (I 4, U 6, IoU 2/3);
    # nucleus 2 overlaps it by 2 (IoU 2/8) and the 2 px part by 2 (IoU 2/4) and picks the latter.
    misplaced = _boxes((2, 4), (3, 0, 2, 0, 3), (4, 0, 2, 3, 4))
    assert aggregated_jaccard_index(true, misplaced) == pytest.approx((4 + 2) / (6 + 4))
    assert aggregated_jaccard_index(true, true) == 1.0
    # Panoptic quality: the merge matches neither nucleus (IoU 1/2, not > 1/2).
    assert panoptic_quality(true, merged)[0] == 0.0
    assert panoptic_quality(true, true) == (1.0, 1.0, 1.0)


def test_unpaired_objects_by_hand():
    true = _boxes((4, 6), (1, 0, 2, 0, 2), (2, 2, 4, 0, 2))  # two 4 px nuclei
    pred = _boxes((4, 6), (1, 0, 2, 0, 2), (7, 0, 1, 3, 6))  # the first exactly, a 3 px extra
    # The second nucleus is missed (its 4 px join the union), the extra 3 px too: 4 / 11.
    assert aggregated_jaccard_index(true, pred) == pytest.approx(4 / (4 + 4 + 3))
    # TP 1 (IoU 1), FP 1, FN 1: DQ = 1 / (1 + 1/2 + 1/2), SQ 1.
    assert panoptic_quality(true, pred) == pytest.approx((0.5, 1.0, 0.5))


def test_instance_metrics_of_empty_maps():
    empty = np.zeros((5, 5), np.int64)
    some = _boxes((5, 5), (3, 1, 3, 1, 3))
    assert np.isnan(aggregated_jaccard_index(empty, empty))
    assert all(np.isnan(panoptic_quality(empty, empty)))
    assert aggregated_jaccard_index(empty, some) == 0.0  # predictions, no truth
    assert aggregated_jaccard_index(some, empty) == 0.0  # truth, no predictions
    for true, pred in ((empty, some), (some, empty)):
        pq, sq, dq = panoptic_quality(true, pred)
        assert (pq, dq) == (0.0, 0.0) and np.isnan(sq)
    with pytest.raises(MetricInputError, match=">= 0"):
        aggregated_jaccard_index(-some, some)


def test_aji_matches_an_object_by_object_reference():
    for true, seed in ((_dsb_instances(), 0), (_blobs((96, 128), 3), 1)):
        pred = _perturbed(true, seed)
        expected = _reference_aji(true, pred)
        assert 0.2 < expected < 0.9
        assert aggregated_jaccard_index(true, pred) == pytest.approx(expected, abs=1e-12)


@pytest.mark.slow  # importing MONAI alone takes 10 s or more
def test_panoptic_quality_matches_monai():
    monai_pq = pytest.importorskip("monai.metrics").compute_panoptic_quality
    torch = pytest.importorskip("torch")
    for seed in range(3):
        true = _blobs((64, 80), seed)
        pred = _perturbed(true, seed)
        tp, fp, fn, iou_sum = (
            monai_pq(torch.from_numpy(pred), torch.from_numpy(true), output_confusion_matrix=True)
            .double()
            .tolist()
        )
        assert tp > 0 and fp > 0 and fn > 0
        pq, sq, dq = panoptic_quality(true, pred)
        assert dq == pytest.approx(tp / (tp + fp / 2 + fn / 2), abs=1e-12)
        assert sq == pytest.approx(iou_sum / tp, rel=1e-6)  # MONAI sums float32 IoUs
        assert pq == pytest.approx(iou_sum / (tp + fp / 2 + fn / 2), rel=1e-6)


def test_instance_metrics_ignore_which_ids_the_objects_carry():
    rng = np.random.default_rng(7)
    true = _dsb_instances()
    pred = _perturbed(true, 2)
    true2, pred2 = _relabel(true, rng), _relabel(pred, rng)
    assert aggregated_jaccard_index(true2, pred2) == aggregated_jaccard_index(true, pred)
    assert panoptic_quality(true2, pred2) == panoptic_quality(true, pred)
    assert object_scores(true2, pred2) == object_scores(true, pred)


def test_instance_metrics_are_fast_on_a_monuseg_sized_tile():
    # 1000 x 1000 px with over 1000 objects on each side: one sort of the pixels, no object loop.
    true = _blobs((1000, 1000), 0, sigma=3.5)
    pred = _perturbed(true, 0)
    assert true.max() > 1000 and len(np.unique(pred)) > 1000
    for metric in (aggregated_jaccard_index, panoptic_quality, object_scores):
        start = time.perf_counter()
        metric(true, pred)
        assert time.perf_counter() - start < 1.0, metric.__name__
