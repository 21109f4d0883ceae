"""Segmentation metrics on numpy label maps: IoU, Dice, pixel error, ISBI Rand error, objects.

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
class ObjectScores:
    """Object-level detection scores at one IoU threshold."""

    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    mean_matched_iou: float


def object_scores(
    true_instances: np.ndarray, pred_instances: np.ndarray, iou_threshold: float = 0.5
) -> ObjectScores:
    """Match instances one-to-one by IoU >= iou_threshold and count TP, FP and FN.

    No Hungarian assignment is needed: with IoU >= 0.5 an object overlaps any partner by at
    least half of itself, so it can have two partners only in the tie where both are exactly
    half of it (IoU = 0.5 each, both lying inside it, so neither has another partner). Taking
    pairs by falling IoU and keeping the first per object is then an optimal matching. Below
    0.5 matches are not unique and this function refuses.
    """
    if not 0.5 <= iou_threshold <= 1.0:
        raise MetricInputError(f"iou_threshold must be in [0.5, 1], got {iou_threshold}")
    true_instances, pred_instances = _check_pair(true_instances, pred_instances)
    if true_instances.min(initial=0) < 0 or pred_instances.min(initial=0) < 0:
        raise MetricInputError("instance ids must be >= 0")
    rows, cols, inter = _contingency(
        true_instances.astype(np.int64), pred_instances.astype(np.int64)
    )
    true_ids, true_sizes = np.unique(true_instances[true_instances > 0], return_counts=True)
    pred_ids, pred_sizes = np.unique(pred_instances[pred_instances > 0], return_counts=True)
    both = (rows > 0) & (cols > 0)
    rows, cols, inter = rows[both], cols[both], inter[both]
    union = (
        true_sizes[np.searchsorted(true_ids, rows)]
        + pred_sizes[np.searchsorted(pred_ids, cols)]
        - inter
    )
    pair_iou = inter / union
    keep = pair_iou >= iou_threshold
    rows, cols, pair_iou = rows[keep], cols[keep], pair_iou[keep]
    order = np.argsort(-pair_iou, kind="stable")
    rows, cols, pair_iou = rows[order], cols[order], pair_iou[order]
    first_row = np.unique(rows, return_index=True)[1]
    rows, cols, pair_iou = rows[first_row], cols[first_row], pair_iou[first_row]
    first_col = np.unique(cols, return_index=True)[1]
    matched_iou = pair_iou[first_col]
    tp = int(matched_iou.size)
    fp, fn = int(pred_ids.size - tp), int(true_ids.size - tp)
    return ObjectScores(
        tp=tp,
        fp=fp,
        fn=fn,
        precision=float(_ratio(tp, tp + fp)),
        recall=float(_ratio(tp, tp + fn)),
        f1=float(_ratio(2 * tp, 2 * tp + fp + fn)),
        mean_matched_iou=float(matched_iou.mean()) if tp else float("nan"),
    )


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
