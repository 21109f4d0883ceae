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

    def label(self, foreground: np.ndarray) -> np.ndarray:
        """4-connected components of `foreground` with ids not used before (0 = background)."""
        labels, n = ndimage.label(foreground)
        labels = labels.astype(np.int64)
        labels[labels > 0] += self.next_id - 1
        self.next_id += n
        return labels

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
        true_ids, pred_ids = self._true.label(true_fg), self._pred.label(pred_fg)
        self._join_neighbours(i, j, true_ids, pred_ids)
        # Only px inside true foreground count (predicted background there: singletons).
        self._add_overlaps(true_ids[true_fg], pred_ids[true_fg])
        self._close()

    def _join_neighbours(self, i: int, j: int, true_ids: np.ndarray, pred_ids: np.ndarray) -> None:
        """Merge ids across the seams to neighbours already added; keep edges facing the rest."""
        mine = {
            ("row", i, j): (true_ids[0], pred_ids[0], (i - 1, j)),
            ("row", i + 1, j): (true_ids[-1], pred_ids[-1], (i + 1, j)),
            ("col", i, j): (true_ids[:, 0], pred_ids[:, 0], (i, j - 1)),
            ("col", i, j + 1): (true_ids[:, -1], pred_ids[:, -1], (i, j + 1)),
        }
        links: dict[str, list[np.ndarray]] = {"t_a": [], "t_b": [], "p_a": [], "p_b": []}
        for seam, (t_edge, p_edge, neighbour) in mine.items():
            if not (0 <= neighbour[0] < self._grid[0] and 0 <= neighbour[1] < self._grid[1]):
                continue
            if neighbour not in self._seen:
                self._edges[seam] = (t_edge.copy(), p_edge.copy())
                continue
            t_other, p_other = self._edges.pop(seam)
            for side, a, b in (("t", t_other, t_edge), ("p", p_other, p_edge)):
                both = (a > 0) & (b > 0)
                links[f"{side}_a"].append(a[both])
                links[f"{side}_b"].append(b[both])
        if not links["t_a"]:
            return
        t_nodes, t_roots = _merge_map(np.concatenate(links["t_a"]), np.concatenate(links["t_b"]))
        p_nodes, p_roots = _merge_map(np.concatenate(links["p_a"]), np.concatenate(links["p_b"]))
        true_ids[...] = _relabel(true_ids, t_nodes, t_roots)
        pred_ids[...] = _relabel(pred_ids, p_nodes, p_roots)
        self._edges = {
            seam: (_relabel(t, t_nodes, t_roots), _relabel(p, p_nodes, p_roots))
            for seam, (t, p) in self._edges.items()
        }
        self._true.ids = _relabel(self._true.ids, t_nodes, t_roots)
        self._pred.ids = _relabel(self._pred.ids, p_nodes, p_roots)
        self._pair_t = _relabel(self._pair_t, t_nodes, t_roots)
        self._pair_p = _relabel(self._pair_p, p_nodes, p_roots)

    def _add_overlaps(self, true_in: np.ndarray, pred_in: np.ndarray) -> None:
        """Add one block's px inside true foreground to segment sizes and overlaps."""
        ones = np.ones(true_in.size, np.int64)
        counted = pred_in > 0
        for segments, ids, n in (
            (self._true, true_in, ones),
            (self._pred, pred_in[counted], ones[counted]),
        ):
            segments.ids, segments.sizes = _aggregate(
                np.concatenate([segments.ids, ids]), np.concatenate([segments.sizes, n])
            )
        t = np.concatenate([self._pair_t, true_in[counted]])
        p = np.concatenate([self._pair_p, pred_in[counted]])
        n = np.concatenate([self._pair_n, ones[counted]])
        codes, t_ids, p_ids = _pair_codes(t, p)
        codes, self._pair_n = _aggregate(codes, n)
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
