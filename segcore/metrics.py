"""Segmentation metrics on numpy label maps: IoU, Dice, pixel error, ISBI Rand error, and the
instance metrics object F1, panoptic quality and aggregated Jaccard index (AJI).

Conventions: class maps hold integers 0..K-1 (0 = background); instance maps hold 0 for
background and one positive id per object. A ratio that is undefined (0/0, e.g. the IoU of a
class absent from both maps) is NaN, so that averages over tiles with `np.nanmean` skip it.

Worked example, foreground = 1:
  y_true = [[0,1,1],[0,0,1],[1,1,0]]   y_pred = [[0,1,0],[0,0,1],[1,0,0]]
  |T| = 5, |P| = 3, |T∩P| = 3 (every predicted pixel is right), |T∪P| = 5,
  so IoU = 3/5 = 0.6, Dice = 2*3/(5+3) = 0.75, pixel error = 2/9.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


class MetricInputError(ValueError):
    """Inputs to a metric that cannot be compared (shape, dtype or label range)."""


def _check_pair(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return both maps as integer arrays of one shape, or raise MetricInputError."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise MetricInputError(f"shape mismatch: y_true {y_true.shape} vs y_pred {y_pred.shape}")
    for name, a in (("y_true", y_true), ("y_pred", y_pred)):
        if not (a.dtype == bool or np.issubdtype(a.dtype, np.integer)):
            raise MetricInputError(f"{name} must hold integer labels, got dtype {a.dtype}")
    return y_true, y_pred


def _ratio(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray:
    """num / den with NaN where den is 0 (an undefined score, not a perfect or a failed one)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """K x K pixel counts, rows = true class, columns = predicted class."""
    y_true, y_pred = _check_pair(y_true, y_pred)
    t, p = y_true.ravel().astype(np.int64), y_pred.ravel().astype(np.int64)
    for name, a in (("y_true", t), ("y_pred", p)):
        if a.size and (a.min() < 0 or a.max() >= n_classes):
            raise MetricInputError(
                f"{name} holds labels {a.min()}..{a.max()}, outside 0..{n_classes - 1}"
            )
    counts = np.bincount(t * n_classes + p, minlength=n_classes * n_classes)
    return counts.reshape(n_classes, n_classes)


def iou(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-class intersection over union |T∩P| / |T∪P| (NaN for a class absent from both)."""
    cm = confusion_matrix(y_true, y_pred, n_classes)
    inter = np.diag(cm)
    return _ratio(inter, cm.sum(0) + cm.sum(1) - inter)


def dice(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-class Dice 2|T∩P| / (|T| + |P|) (NaN for a class absent from both)."""
    cm = confusion_matrix(y_true, y_pred, n_classes)
    return _ratio(2 * np.diag(cm), cm.sum(0) + cm.sum(1))


def pixel_error(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of pixels whose label differs (the ISBI 2012 pixel error for binary maps)."""
    y_true, y_pred = _check_pair(y_true, y_pred)
    return float(_ratio(np.count_nonzero(y_true != y_pred), y_true.size))


def _segments(labels: np.ndarray) -> np.ndarray:
    """Segment ids of a 2-D map: 4-connected components of a binary map, else the ids as given.

    4-connectivity is what the ISBI 2012 evaluation (Fiji's RandError) uses to turn a binary
    map into segments.
    """
    if labels.dtype == bool or labels.max(initial=0) <= 1:
        segments, _ = ndimage.label(labels > 0)
        return segments.astype(np.int64)
    if labels.min() < 0:
        raise MetricInputError(f"instance ids must be >= 0, got {labels.min()}")
    return labels.astype(np.int64)


def _contingency(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse contingency table of two id maps: (ids in a, ids in b, pixel count) per pair.

    Sparse because a 2048 x 2048 slide with thousands of segments on each side would need a
    dense table of millions of mostly empty cells; np.unique on one int64 code per pixel only
    touches the pairs that occur.
    """
    a, b = a.ravel(), b.ravel()
    # Compact huge ids first so that the pair code a * (max_b + 1) + b cannot overflow int64.
    if a.size and a.max() >= 2**31:
        a = np.unique(a, return_inverse=True)[1].astype(np.int64)
    if b.size and b.max() >= 2**31:
        b = np.unique(b, return_inverse=True)[1].astype(np.int64)
    base = int(b.max(initial=0)) + 1
    codes, counts = np.unique(a * base + b, return_counts=True)
    return codes // base, codes % base, counts


def rand_scores(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[float, float, float]:
    """Foreground-restricted Rand (precision, recall, F-score) of one 2-D map, ISBI 2012 style.

    Segments: a binary map (values 0/1 or bool) is split into 4-connected components of its
    foreground; a map with larger values is taken as instance ids. Only pixels inside a
    ground-truth segment count (the ground truth's background, the membranes, is excluded).
    Predicted background pixels there are singletons: they share a segment with no pixel.
    Over pairs of distinct counted pixels (Fiji's RandError.getRandIndexStats):
      TP = pairs in one true segment and one predicted segment, precision = TP / pairs in one
      predicted segment, recall = TP / pairs in one true segment, F = 2PR / (P + R).
    """
    y_true, y_pred = _check_pair(y_true, y_pred)
    if y_true.ndim != 2:
        raise MetricInputError(f"Rand scores need a 2-D map, got shape {y_true.shape}")
    true_seg, pred_seg = _segments(y_true), _segments(y_pred)
    inside = true_seg > 0
    rows, cols, n = _contingency(true_seg[inside], pred_seg[inside])
    n = n.astype(np.float64)
    true_sizes = np.bincount(rows, weights=n)
    pred_sizes = np.bincount(cols[cols > 0], weights=n[cols > 0])
    pairs_same_both = float(np.sum(n[cols > 0] * (n[cols > 0] - 1)))
    pairs_same_true = float(np.sum(true_sizes * (true_sizes - 1)))
    pairs_same_pred = float(np.sum(pred_sizes * (pred_sizes - 1)))
    precision = float(_ratio(pairs_same_both, pairs_same_pred))
    recall = float(_ratio(pairs_same_both, pairs_same_true))
    fscore = float(_ratio(2 * pairs_same_both, pairs_same_true + pairs_same_pred))
    return precision, recall, fscore


def rand_error(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """ISBI 2012 Rand error: 1 - foreground-restricted Rand F-score; mean over slices for N x H x W.

    For one binary prediction the F-score is the challenge's maximal one (one threshold); for
    probability maps call it per threshold and keep the minimum (see `rand_error_best`).
    """
    y_true, y_pred = _check_pair(y_true, y_pred)
    if y_true.ndim == 2:
        return 1.0 - rand_scores(y_true, y_pred)[2]
    if y_true.ndim == 3:
        errors = np.array([rand_error(t, p) for t, p in zip(y_true, y_pred, strict=True)])
        defined = errors[~np.isnan(errors)]  # slices without any true cell have no Rand error
        return float(defined.mean()) if defined.size else float("nan")
    raise MetricInputError(f"Rand error needs H x W or N x H x W maps, got shape {y_true.shape}")


def rand_error_best(
    y_true: np.ndarray, foreground_prob: np.ndarray, thresholds: np.ndarray | None = None
) -> tuple[float, float]:
    """(Rand error, threshold) at the threshold of `foreground_prob` with the lowest error.

    This is the challenge's "1 - maximal F-score" over binarisations of a probability map;
    default thresholds 0.1, 0.2, ..., 0.9.
    """
    prob = np.asarray(foreground_prob, dtype=np.float64)
    grid = np.linspace(0.1, 0.9, 9) if thresholds is None else np.asarray(thresholds)
    errors = [rand_error(y_true, prob > th) for th in grid]
    best = int(np.nanargmin(errors))
    return float(errors[best]), float(grid[best])


@dataclass(frozen=True)
class _Overlaps:
    """Every overlapping (true object, predicted object) pair and the objects' sizes.

    `rows`/`cols` are the pair's true and predicted ids, `inter`/`union` its pixel counts;
    `true_ids`/`pred_ids` are sorted with `true_sizes`/`pred_sizes` their areas.
    """

    rows: np.ndarray
    cols: np.ndarray
    inter: np.ndarray
    union: np.ndarray
    true_ids: np.ndarray
    true_sizes: np.ndarray
    pred_ids: np.ndarray
    pred_sizes: np.ndarray

    @property
    def iou(self) -> np.ndarray:
        return self.inter / self.union


def _object_sizes(ids: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted positive ids of one side of a contingency table and their pixel counts."""
    unique, inverse = np.unique(ids, return_inverse=True)
    sizes = np.bincount(inverse, weights=counts).astype(np.int64)
    return unique[unique > 0], sizes[unique > 0]


def _overlaps(true_instances: np.ndarray, pred_instances: np.ndarray) -> _Overlaps:
    """The sparse overlap table of two instance maps (one sort of the pixels, no object loop)."""
    true_instances, pred_instances = _check_pair(true_instances, pred_instances)
    if true_instances.min(initial=0) < 0 or pred_instances.min(initial=0) < 0:
        raise MetricInputError("instance ids must be >= 0")
    rows, cols, inter = _contingency(
        true_instances.astype(np.int64), pred_instances.astype(np.int64)
    )
    true_ids, true_sizes = _object_sizes(rows, inter)
    pred_ids, pred_sizes = _object_sizes(cols, inter)
    both = (rows > 0) & (cols > 0)
    rows, cols, inter = rows[both], cols[both], inter[both]
    union = (
        true_sizes[np.searchsorted(true_ids, rows)]
        + pred_sizes[np.searchsorted(pred_ids, cols)]
        - inter
    )
    return _Overlaps(rows, cols, inter, union, true_ids, true_sizes, pred_ids, pred_sizes)


def _matched_ious(table: _Overlaps, iou_threshold: float, strict: bool) -> np.ndarray:
    """IoUs of a one-to-one matching of pairs with IoU >= (or >, if strict) iou_threshold.

    With a threshold of at least 0.5 an object overlaps any partner by at least half of
    itself, so it can have two partners only in the tie where both are exactly half of it
    (IoU = 0.5 each, both lying inside it, so neither has another partner). Taking pairs by
    falling IoU and keeping the first per object is then a maximum matching.
    """
    pair_iou = table.iou
    keep = pair_iou > iou_threshold if strict else pair_iou >= iou_threshold
    rows, cols, pair_iou = table.rows[keep], table.cols[keep], pair_iou[keep]
    order = np.argsort(-pair_iou, kind="stable")
    rows, cols, pair_iou = rows[order], cols[order], pair_iou[order]
    first_row = np.unique(rows, return_index=True)[1]
    cols, pair_iou = cols[first_row], pair_iou[first_row]
    return pair_iou[np.unique(cols, return_index=True)[1]]


@dataclass(frozen=True)
class ObjectScores:
    """Object-level detection scores at one IoU threshold."""

    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    mean_matched_iou: float


def _check_threshold(iou_threshold: float) -> None:
    if not 0.5 <= iou_threshold <= 1.0:
        raise MetricInputError(f"iou_threshold must be in [0.5, 1], got {iou_threshold}")


def object_scores(
    true_instances: np.ndarray, pred_instances: np.ndarray, iou_threshold: float = 0.5
) -> ObjectScores:
    """Match instances one-to-one by IoU >= iou_threshold and count TP, FP and FN.

    No Hungarian assignment is needed at thresholds of 0.5 and above (see `_matched_ious`);
    below 0.5 matches are not unique and this function refuses.
    """
    _check_threshold(iou_threshold)
    table = _overlaps(true_instances, pred_instances)
    matched_iou = _matched_ious(table, iou_threshold, strict=False)
    tp = int(matched_iou.size)
    fp, fn = int(table.pred_ids.size - tp), int(table.true_ids.size - tp)
    return ObjectScores(
        tp=tp,
        fp=fp,
        fn=fn,
        precision=float(_ratio(tp, tp + fp)),
        recall=float(_ratio(tp, tp + fn)),
        f1=float(_ratio(2 * tp, 2 * tp + fp + fn)),
        mean_matched_iou=float(matched_iou.mean()) if tp else float("nan"),
    )


def panoptic_quality(
    true_instances: np.ndarray, pred_instances: np.ndarray, iou_threshold: float = 0.5
) -> tuple[float, float, float]:
    """(PQ, SQ, DQ) of one class of instances (Kirillov et al. 2019), matches at IoU > threshold.

    DQ = TP / (TP + FP/2 + FN/2) (the object F1), SQ = mean IoU of the matched pairs and
    PQ = SQ * DQ = sum of matched IoUs / (TP + FP/2 + FN/2). The match is strict (IoU > 0.5),
    as in the paper and in MONAI/HoVer-Net; `object_scores` counts IoU = 0.5 as a match.
    Worked example: a 2 x 2 true square and the same square shifted by one column share 2 px
    of a 6 px union, IoU 1/3 < 0.5: no match, TP 0, FP 1, FN 1, so PQ = DQ = 0 and SQ (a mean
    over no matches) is NaN. No object on either side: all three are NaN.
    """
    _check_threshold(iou_threshold)
    table = _overlaps(true_instances, pred_instances)
    matched_iou = _matched_ious(table, iou_threshold, strict=True)
    tp = matched_iou.size
    fp, fn = table.pred_ids.size - tp, table.true_ids.size - tp
    den = tp + 0.5 * fp + 0.5 * fn
    dq = float(_ratio(tp, den))
    sq = float(matched_iou.mean()) if tp else float("nan")
    return float(_ratio(matched_iou.sum(), den)), sq, dq


def aggregated_jaccard_index(true_instances: np.ndarray, pred_instances: np.ndarray) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017), the MoNuSeg challenge's instance metric.

    Each true object G is paired with the predicted object S of largest IoU with it (ties: the
    larger overlap, then the lower id); AJI = sum |G ∩ S| / (sum |G ∪ S| + areas of the
    predicted objects no true object picked). A true object that overlaps no prediction adds
    its area to the union only. One prediction may be picked by several true objects (a merge)
    and then counts in each of their unions, so merging touching nuclei is penalised twice:
    it loses the intersection of the second nucleus and pays its own area again.

    Worked example: true = two 2 x 2 squares side by side (ids 1, 2), pred = one 2 x 4 box
    over both. Both pick the box: I = 4 + 4, U = 8 + 8, AJI = 0.5. Predicting the two
    squares exactly gives 1.0.

    Edge cases: no true and no predicted object is 0/0, NaN like every undefined ratio here
    (so `np.nanmean` over tiles skips it); predictions without any true object score 0.0,
    as does a tile whose true objects are all missed.
    """
    table = _overlaps(true_instances, pred_instances)
    # Per true object, the pair with the largest IoU: sort by row, then IoU, overlap and id.
    order = np.lexsort((table.cols, -table.inter, -table.iou, table.rows))
    first = order[np.unique(table.rows[order], return_index=True)[1]]
    inter = int(table.inter[first].sum())
    union = int(table.union[first].sum())
    paired_true = np.isin(table.true_ids, table.rows[first])
    picked_pred = np.isin(table.pred_ids, table.cols[first])
    union += int(table.true_sizes[~paired_true].sum()) + int(table.pred_sizes[~picked_pred].sum())
    return float(_ratio(inter, union))


def segmentation_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Foreground (class 1) IoU and Dice, pixel error and Rand error of class maps (H x W or
    N x H x W); IoU, Dice and pixel error pool all pixels, Rand error averages the slices."""
    y_true, y_pred = _check_pair(y_true, y_pred)
    fg_true, fg_pred = y_true == 1, y_pred == 1
    n_classes = int(max(y_true.max(initial=0), y_pred.max(initial=0), 1)) + 1
    return {
        "iou": float(iou(y_true, y_pred, n_classes)[1]),
        "dice": float(dice(y_true, y_pred, n_classes)[1]),
        "pixel_error": pixel_error(y_true, y_pred),
        "rand_error": rand_error(fg_true, fg_pred),
    }
