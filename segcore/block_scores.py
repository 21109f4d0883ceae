"""Whole-slide `segmentation_scores` from a slide's blocks, in memory bounded by the blocks.

    scores = SlideScores(row_edges=(0, 2048, 3000), col_edges=(0, 2048, 4096, 5000))
    for (i, j), target, prediction in blocks:          # any order; raster order keeps it small
        scores.add(i, j, target, prediction)
    scores.result()   # == segmentation_scores(whole target, whole prediction)

IoU, Dice and pixel error are ratios of pixel counts, so they add up over blocks. The Rand
error (segcore.metrics.rand_scores) needs the 4-connected segments of the whole slide: a cell
cut by a block edge is one segment. Each block is labelled on its own with fresh ids; where
two blocks meet, ids of foreground pixels facing each other across the seam are merged. The
state kept is the ids on block edges whose neighbour is still to come, plus the sizes and
(true, predicted) overlaps of segments that reach such an edge ("open" ones). A segment that
touches no such edge can neither grow nor merge again, so its pair count n(n-1) is added to a
running sum and it is dropped. In raster order the open edges are one row of blocks' bottom
edges plus one block's right edge, whatever the slide's size.

Worked example, two 1 x 2 blocks side by side, target [[1, 1 | 1, 0]], prediction
[[1, 0 | 1, 1]]: the left block has true segment a = {0, 1} and predicted p = {0}; the right
one true b = {2} and predicted q = {2} (px 3 is outside the truth, so it does not count). The
seam joins a and b (columns 1 and 2 are both foreground in the truth), not p and q (column 1
is background in the prediction). True segment {0, 1, 2}: 3 * 2 = 6 same-segment pairs;
predicted p and q: 0 each; overlaps (ab, p) = 1 px and (ab, q) = 1 px: 0 pairs. F-score = 0,
Rand error 1, as `rand_error` gives for the whole 1 x 4 map.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from segcore.metrics import MetricInputError, _ratio

#: A seam between two neighbouring blocks: ("row", i, j) lies between blocks (i-1, j) and
#: (i, j); ("col", i, j) between blocks (i, j-1) and (i, j).
Seam = tuple[str, int, int]


class _Segments:
    """Open segments of one side (true or predicted): their sizes inside true foreground."""

    def __init__(self) -> None:
        self.ids = np.zeros(0, np.int64)
        self.sizes = np.zeros(0, np.int64)
        self.next_id = 1

    def label(self, foreground: np.ndarray) -> tuple[np.ndarray, int]:
        """4-connected components of `foreground` (int32, 0 = background), and the offset
        that turns them into ids not used before."""
        labels, n = ndimage.label(foreground)
        offset = self.next_id - 1
        self.next_id += n
        return labels, offset

    def fold(self, open_ids: np.ndarray) -> int:
        """Drop the segments not in `open_ids` (final); return their same-segment pair count."""
        closed = ~np.isin(self.ids, open_ids)
        n = self.sizes[closed]
        self.ids, self.sizes = self.ids[~closed], self.sizes[~closed]
        return int(np.sum(n * (n - 1)))


def _aggregate(keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique keys and the summed counts of each."""
    unique, inverse = np.unique(keys, return_inverse=True)
    return unique, np.bincount(inverse, weights=counts, minlength=unique.size).astype(np.int64)


def _global(labels: np.ndarray, offset: int) -> np.ndarray:
    """Block-local ids (0 = background) as slide-wide int64 ids."""
    return np.where(labels > 0, labels.astype(np.int64) + offset, 0)


def _overlaps(
    true_labels: np.ndarray, pred_labels: np.ndarray, n_pred: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true id, predicted id or 0, px) for each pair of local ids that share px."""
    codes = true_labels.astype(np.int64) * (n_pred + 1) + pred_labels
    codes, counts = np.unique(codes, return_counts=True)
    return codes // (n_pred + 1), codes % (n_pred + 1), counts.astype(np.int64)


def _pair_codes(t: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One int64 code per (t, p) pair, and the id tables to decode it (ids compacted first)."""
    t_ids, t_idx = np.unique(t, return_inverse=True)
    p_ids, p_idx = np.unique(p, return_inverse=True)
    return t_idx.astype(np.int64) * max(p_ids.size, 1) + p_idx, t_ids, p_ids


def _merge_map(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids joined by edges a[k]--b[k] (sorted) and the smallest id of each one's component."""
    nodes = np.unique(np.concatenate([a, b]))
    if nodes.size == 0:
        return nodes, nodes
    ia, ib = np.searchsorted(nodes, a), np.searchsorted(nodes, b)
    graph = coo_matrix((np.ones(ia.size, np.int8), (ia, ib)), shape=(nodes.size, nodes.size))
    _, component = connected_components(graph, directed=False)
    roots = np.full(component.max() + 1, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(roots, component, nodes)
    return nodes, roots[component]


def _relabel(ids: np.ndarray, nodes: np.ndarray, roots: np.ndarray) -> np.ndarray:
    """`ids` with every id in `nodes` replaced by its root (others, 0 included, unchanged)."""
    if nodes.size == 0 or ids.size == 0:
        return ids
    pos = np.minimum(np.searchsorted(nodes, ids), nodes.size - 1)
    hit = nodes[pos] == ids
    return np.where(hit, roots[pos], ids)


class SlideScores:
    """Sums of one slide's blocks (a grid given by its row and column edges) that give
    `segcore.metrics.segmentation_scores` of the whole slide; see the module docstring."""

    def __init__(self, row_edges: Sequence[int], col_edges: Sequence[int]) -> None:
        self.row_edges = tuple(int(e) for e in row_edges)
        self.col_edges = tuple(int(e) for e in col_edges)
        self._grid = (len(self.row_edges) - 1, len(self.col_edges) - 1)
        self._seen: set[tuple[int, int]] = set()
        self._pixels = self._wrong = self._both_fg = self._true_fg = self._pred_fg = 0
        self._true, self._pred = _Segments(), _Segments()
        # Overlaps of open segments: true id, predicted id (> 0), px.
        self._pair_t = self._pair_p = self._pair_n = np.zeros(0, np.int64)
        # Ids on edges whose neighbour is to come: seam -> (true ids, predicted ids).
        self._edges: dict[Seam, tuple[np.ndarray, np.ndarray]] = {}
        # Same-segment pair counts of closed segments: true, predicted, both.
        self._pairs_true = self._pairs_pred = self._pairs_both = 0

    @property
    def complete(self) -> bool:
        return len(self._seen) == self._grid[0] * self._grid[1]

    def add(self, i: int, j: int, target: np.ndarray, prediction: np.ndarray) -> None:
        """Block (i, j)'s class maps (class 1 = foreground, as in `segmentation_scores`)."""
        shape = (
            self.row_edges[i + 1] - self.row_edges[i],
            self.col_edges[j + 1] - self.col_edges[j],
        )
        target, prediction = np.asarray(target), np.asarray(prediction)
        if target.shape != shape or prediction.shape != shape:
            raise MetricInputError(
                f"block ({i}, {j}) is {shape}, got target {target.shape} and prediction "
                f"{prediction.shape}"
            )
        if (i, j) in self._seen:
            raise MetricInputError(f"block ({i}, {j}) added twice")
        self._seen.add((i, j))
        true_fg, pred_fg = target == 1, prediction == 1
        self._pixels += target.size
        self._wrong += int(np.count_nonzero(target != prediction))
        self._both_fg += int(np.count_nonzero(true_fg & pred_fg))
        self._true_fg += int(np.count_nonzero(true_fg))
        self._pred_fg += int(np.count_nonzero(pred_fg))
        true_labels, t_off = self._true.label(true_fg)
        pred_labels, p_off = self._pred.label(pred_fg)
        # Only px inside true foreground count (predicted background there: singletons).
        n_pred = self._pred.next_id - 1 - p_off  # segments in this block's prediction
        t, p, n = _overlaps(true_labels[true_fg], pred_labels[true_fg], n_pred)
        t, p = _global(t, t_off), _global(p, p_off)
        edges = {
            "top": (true_labels[0], pred_labels[0]),
            "bottom": (true_labels[-1], pred_labels[-1]),
            "left": (true_labels[:, 0], pred_labels[:, 0]),
            "right": (true_labels[:, -1], pred_labels[:, -1]),
        }
        edges = {k: (_global(a, t_off), _global(b, p_off)) for k, (a, b) in edges.items()}
        t_map, p_map = self._join_neighbours(i, j, edges)
        self._add_overlaps(_relabel(t, *t_map), _relabel(p, *p_map), n)
        self._close()

    def _join_neighbours(
        self, i: int, j: int, edges: dict[str, tuple[np.ndarray, np.ndarray]]
    ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        """Merge ids across the seams to neighbours already added, keep edges facing the rest;
        return the merges (true, predicted) as (ids, their new ids)."""
        seams = {
            "top": (("row", i, j), (i - 1, j)),
            "bottom": (("row", i + 1, j), (i + 1, j)),
            "left": (("col", i, j), (i, j - 1)),
            "right": (("col", i, j + 1), (i, j + 1)),
        }
        links: dict[str, list[np.ndarray]] = {"t_a": [], "t_b": [], "p_a": [], "p_b": []}
        for side, (seam, neighbour) in seams.items():
            if not (0 <= neighbour[0] < self._grid[0] and 0 <= neighbour[1] < self._grid[1]):
                continue
            t_edge, p_edge = edges[side]
            if neighbour not in self._seen:
                self._edges[seam] = (t_edge, p_edge)
                continue
            t_other, p_other = self._edges.pop(seam)
            for name, a, b in (("t", t_other, t_edge), ("p", p_other, p_edge)):
                both = (a > 0) & (b > 0)
                links[f"{name}_a"].append(a[both])
                links[f"{name}_b"].append(b[both])
        empty = np.zeros(0, np.int64)
        t_map = _merge_map(
            np.concatenate([empty, *links["t_a"]]), np.concatenate([empty, *links["t_b"]])
        )
        p_map = _merge_map(
            np.concatenate([empty, *links["p_a"]]), np.concatenate([empty, *links["p_b"]])
        )
        self._edges = {
            seam: (_relabel(t, *t_map), _relabel(p, *p_map)) for seam, (t, p) in self._edges.items()
        }
        self._true.ids = _relabel(self._true.ids, *t_map)
        self._pred.ids = _relabel(self._pred.ids, *p_map)
        self._pair_t = _relabel(self._pair_t, *t_map)
        self._pair_p = _relabel(self._pair_p, *p_map)
        return t_map, p_map

    def _add_overlaps(self, t: np.ndarray, p: np.ndarray, n: np.ndarray) -> None:
        """Add one block's overlaps (true id, predicted id or 0, px) to sizes and overlaps."""
        counted = p > 0
        for segments, ids, px in (
            (self._true, t, n),
            (self._pred, p[counted], n[counted]),
        ):
            segments.ids, segments.sizes = _aggregate(
                np.concatenate([segments.ids, ids]), np.concatenate([segments.sizes, px])
            )
        t = np.concatenate([self._pair_t, t[counted]])
        p = np.concatenate([self._pair_p, p[counted]])
        codes, t_ids, p_ids = _pair_codes(t, p)
        codes, self._pair_n = _aggregate(codes, np.concatenate([self._pair_n, n[counted]]))
        width = max(p_ids.size, 1)
        self._pair_t, self._pair_p = t_ids[codes // width], p_ids[codes % width]

    def _close(self) -> None:
        """Fold segments that reach no edge still to be joined into the pair sums."""
        edges = list(self._edges.values())
        open_t = np.unique(np.concatenate([np.zeros(0, np.int64), *(t for t, _ in edges)]))
        open_p = np.unique(np.concatenate([np.zeros(0, np.int64), *(p for _, p in edges)]))

        self._pairs_true += self._true.fold(open_t)
        self._pairs_pred += self._pred.fold(open_p)
        self._pairs_both += self._fold_overlaps(open_t, open_p)

    def _fold_overlaps(self, open_t: np.ndarray, open_p: np.ndarray) -> int:
        """Drop the overlaps whose px count is final and can no longer join another's; return
        their same-segment pair count.

        An overlap of two closed segments is final. So is one of a closed segment with an open
        one, when it is the closed segment's only overlap with an open segment: its px are
        all seen, and no other overlap of it can merge into the same pair later. (A prediction
        that is one big open segment would otherwise keep an overlap per true cell so far.)
        """
        t_open, p_open = np.isin(self._pair_t, open_t), np.isin(self._pair_p, open_p)
        final = ~t_open & ~p_open
        for closed, others_open, ids in (
            (~t_open, p_open, self._pair_t),
            (~p_open, t_open, self._pair_p),
        ):
            candidates = closed & others_open
            unique, counts = np.unique(ids[candidates], return_counts=True)
            final |= candidates & np.isin(ids, unique[counts == 1])
        n = self._pair_n[final]
        keep = ~final
        self._pair_t, self._pair_p, self._pair_n = (
            self._pair_t[keep],
            self._pair_p[keep],
            self._pair_n[keep],
        )
        return int(np.sum(n * (n - 1)))

    @property
    def open_state(self) -> int:
        """Entries held for open segments and edges (what bounds this object's memory)."""
        edge_px = sum(t.size + p.size for t, p in self._edges.values())
        return self._true.ids.size + self._pred.ids.size + self._pair_t.size + edge_px

    def result(self) -> dict[str, float]:
        """`segmentation_scores` of the whole slide; every block must have been added."""
        if not self.complete:
            missing = self._grid[0] * self._grid[1] - len(self._seen)
            raise MetricInputError(f"{missing} block(s) of the slide not added yet")
        both, true, pred = self._pairs_both, self._pairs_true, self._pairs_pred
        fg = self._true_fg + self._pred_fg
        return {
            "iou": float(_ratio(self._both_fg, fg - self._both_fg)),
            "dice": float(_ratio(2 * self._both_fg, fg)),
            "pixel_error": float(_ratio(self._wrong, self._pixels)),
            "rand_error": 1.0 - float(_ratio(2 * both, true + pred)),
        }
