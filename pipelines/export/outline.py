"""Object outlines along pixel edges: polygons whose area is the object's pixel count.

A pixel (row r, column c) covers [c, c + 1) x [r, r + 1) in level-0 coordinates (QuPath's
convention), so its corners are integer points. Every edge between an object pixel and a
pixel outside it is a polygon edge, walked with the object on its right (east along a top
edge, south along a right edge, ...); chaining the edges gives closed rings, clockwise on
screen (y down) for an outline and anticlockwise for a hole, and vertices where the direction
does not change are dropped. Where two object pixels touch only at a corner, the walk turns
left and keeps both in one ring, so every 8-connected object has exactly one outline.

Worked example, a 2 x 3 block at row 5, column 10:

    >>> rings(np.ones((2, 3), bool), (5, 10))
    [[(10, 5), (13, 5), (13, 7), (10, 7), (10, 5)]]

and its shoelace area is 6, the pixel count.
"""

from __future__ import annotations

import numpy as np

Point = tuple[int, int]
Ring = list[Point]

# Edge directions as (d_row, d_col): east, south, west, north.
_STEPS = ((0, 1), (1, 0), (0, -1), (-1, 0))


def _edges(padded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start corner (row, col), direction index into _STEPS) of every boundary edge of
    `padded`, a mask with a row and column of outside pixels on each side."""
    rows, cols = np.nonzero(padded)
    starts, directions = [], []
    # Outside above: the top edge, east from the top-left corner; outside right: the right
    # edge, south from the top-right corner; below: west from the bottom-right corner; left:
    # north from the bottom-left corner.
    sides = ((-1, 0, (0, 0)), (0, 1, (0, 1)), (1, 0, (1, 1)), (0, -1, (1, 0)))
    for k, (dr, dc, (corner_r, corner_c)) in enumerate(sides):
        open_side = ~padded[rows + dr, cols + dc]
        starts.append(np.stack([rows[open_side] + corner_r, cols[open_side] + corner_c], 1))
        directions.append(np.full(int(open_side.sum()), k))
    return np.concatenate(starts), np.concatenate(directions)


def rings(mask: np.ndarray, origin: tuple[int, int] = (0, 0)) -> list[Ring]:
    """Closed rings of (x, y) points around the True pixels of `mask`, whose pixel (0, 0) is
    level-0 pixel `origin` (row, col). Outlines have positive shoelace area, holes negative."""
    padded = np.pad(np.asarray(mask, bool), 1)
    starts, directions = _edges(padded)
    width = padded.shape[1] + 1
    outgoing: dict[int, list[int]] = {}
    for index, (r, c) in enumerate(starts.tolist()):
        outgoing.setdefault(r * width + c, []).append(index)
    ends = starts + np.asarray(_STEPS)[directions]
    successor = [
        _next_edge(outgoing[r * width + c], directions, int(d))
        for (r, c), d in zip(ends.tolist(), directions, strict=True)
    ]
    used = np.zeros(len(starts), bool)
    found: list[Ring] = []
    for first in range(len(starts)):
        if used[first]:
            continue
        cycle = [first]
        used[first] = True
        while (edge := successor[cycle[-1]]) != first:
            cycle.append(edge)
            used[edge] = True
        heading = directions[cycle]
        corners = starts[cycle][heading != np.roll(heading, 1)]
        points = [(c + origin[1] - 1, r + origin[0] - 1) for r, c in corners.tolist()]
        found.append([*points, points[0]])
    return found


def _next_edge(candidates: list[int], directions: np.ndarray, heading: int) -> int:
    """The edge leaving a corner: the only one, or where two object pixels touch diagonally,
    the left turn (heading - 1 in east, south, west, north order), which joins them."""
    if len(candidates) == 1:
        return candidates[0]
    left = (heading - 1) % 4
    return next(e for e in candidates if directions[e] == left)


def shoelace(ring: Ring) -> float:
    """Signed area of a closed ring (first point repeated last); positive for outlines."""
    xy = np.asarray(ring, dtype=np.float64)
    x, y = xy[:, 0], xy[:, 1]
    return float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]) / 2)
