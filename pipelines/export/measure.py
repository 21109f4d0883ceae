"""Per-object measurements from sums that add up across chunks.

A chunk contributes, for every instance id in it, one row of integer sums (`SUMS`): pixel
count, sums of y, x, y², x², xy over the object's pixels (level-0 coordinates), its bounding
box and the sum of each image channel. Rows of one object from several chunks combine exactly
(`combine`: add the sums, min/max the box), so area, centroid, bounding box, eccentricity and
mean intensity of an object cut by chunk borders equal those of the whole object. Perimeter is
not a sum of parts: it is measured on the object's whole mask (`perimeter`), skimage's
4-connectivity weighting, so that it equals `regionprops`' own.

Worked example, one 2 x 2 object at rows 10-11, columns 20-21, one channel of value 7:
count 4, sum y 42, sum x 82, sum y² 442, sum x² 1682, sum xy 861, box (10, 20, 12, 22),
intensity sum 28 -> centroid (10.5, 20.5), area 4 px, eccentricity 0, mean intensity 7.
"""

from __future__ import annotations

import numpy as np
from skimage.measure import perimeter as _skimage_perimeter

#: Columns of a sums row; the channels' intensity sums follow.
SUMS = ("id", "n", "sy", "sx", "syy", "sxx", "sxy", "ymin", "xmin", "ymax", "xmax")
_ADD = slice(1, 7)
_MIN = slice(7, 9)
_MAX = slice(9, 11)
_I = len(SUMS)
#: Rows of a chunk summed at once.
STRIP = 128


def chunk_sums(
    compact: np.ndarray,
    slices: list[tuple[slice, slice]],
    pixels: np.ndarray,
    origin: tuple[int, int],
) -> np.ndarray:
    """Sums rows (column 0, the id, left 0) of objects 1..n of `compact`, a chunk's labels
    renumbered 1..n (0 = background) whose pixel (0, 0) is level-0 `origin`; `slices` are their
    boxes in `compact` (`scipy.ndimage.find_objects`), `pixels` the chunk's image (c, y, x)."""
    size = len(slices) + 1
    local = np.zeros((6 + len(pixels), size), np.float64)
    for top in range(0, compact.shape[0], STRIP):
        # Strips keep the per-pixel temporaries small; local coordinates keep every float sum
        # an exact integer (< 2^53).
        strip = compact[top : top + STRIP]
        flat = strip.ravel()
        yy, xx = (c.ravel() for c in np.indices(strip.shape, dtype=np.float64))
        yy += top
        for k, weights in enumerate((None, yy, xx, yy * yy, xx * xx, yy * xx)):
            local[k] += np.bincount(flat, weights=weights, minlength=size)
        for c, channel in enumerate(pixels[:, top : top + STRIP]):
            local[6 + c] += np.bincount(flat, weights=channel.ravel(), minlength=size)
    n, sy, sx, syy, sxx, sxy, *intensity = np.rint(local[:, 1:]).astype(np.int64)
    y0, x0 = origin
    rows = np.zeros((size - 1, _I + len(pixels)), dtype=np.int64)
    # Shift the local sums to level-0 coordinates, in exact integer arithmetic.
    rows[:, 1] = n
    rows[:, 2] = sy + n * y0
    rows[:, 3] = sx + n * x0
    rows[:, 4] = syy + 2 * y0 * sy + n * y0 * y0
    rows[:, 5] = sxx + 2 * x0 * sx + n * x0 * x0
    rows[:, 6] = sxy + y0 * sx + x0 * sy + n * y0 * x0
    boxes = np.array(
        [(r.start, c.start, r.stop, c.stop) for r, c in slices], dtype=np.int64
    ).reshape(-1, 4)
    rows[:, 7:11] = boxes + np.array([y0, x0, y0, x0])
    rows[:, _I:] = np.asarray(intensity, dtype=np.int64).reshape(len(pixels), -1).T
    return rows


def combine(rows: np.ndarray) -> np.ndarray:
    """One sums row per id from rows of several chunks (any order), sorted by id."""
    rows = rows[np.argsort(rows[:, 0], kind="stable")]
    starts = np.flatnonzero(np.r_[True, rows[1:, 0] != rows[:-1, 0]])
    out = rows[starts].copy()
    out[:, _ADD] = np.add.reduceat(rows[:, _ADD], starts)
    out[:, _I:] = np.add.reduceat(rows[:, _I:], starts)
    out[:, _MIN] = np.minimum.reduceat(rows[:, _MIN], starts)
    out[:, _MAX] = np.maximum.reduceat(rows[:, _MAX], starts)
    return out


def perimeter(mask: np.ndarray) -> float:
    """skimage's perimeter (4-connectivity) of one object's whole mask, as regionprops has it."""
    return float(_skimage_perimeter(mask, 4))


def measurements(rows: np.ndarray, perimeters: np.ndarray, mpp: float | None) -> dict:
    """Table columns for complete objects' sums rows: id, centroid, bounding box, area and
    perimeter in px (and µm², µm when `mpp` is known), eccentricity as skimage computes it from
    the inertia tensor, and mean intensity per channel."""
    n = rows[:, 1].astype(np.float64)
    # Second moments about the box corner: small integers, so no cancellation in floats.
    y_ref, x_ref = rows[:, 7], rows[:, 8]
    sy = rows[:, 2] - rows[:, 1] * y_ref
    sx = rows[:, 3] - rows[:, 1] * x_ref
    syy = rows[:, 4] - 2 * y_ref * rows[:, 2] + rows[:, 1] * y_ref * y_ref
    sxx = rows[:, 5] - 2 * x_ref * rows[:, 3] + rows[:, 1] * x_ref * x_ref
    sxy = rows[:, 6] - y_ref * rows[:, 3] - x_ref * rows[:, 2] + rows[:, 1] * y_ref * x_ref
    cy, cx = sy / n, sx / n
    vyy, vxx, vxy = syy / n - cy * cy, sxx / n - cx * cx, sxy / n - cy * cx
    half_trace = (vyy + vxx) / 2
    spread = np.sqrt(((vyy - vxx) / 2) ** 2 + vxy**2)
    major, minor = half_trace + spread, half_trace - spread
    safe = np.where(major > 0, major, 1.0)
    eccentricity = np.where(major > 0, np.sqrt(np.clip(1 - minor / safe, 0, 1)), 0.0)
    columns: dict[str, np.ndarray] = {
        "id": rows[:, 0].astype(np.uint64),
        "centroid_y": cy + y_ref,
        "centroid_x": cx + x_ref,
        "bbox_min_y": rows[:, 7],
        "bbox_min_x": rows[:, 8],
        "bbox_max_y": rows[:, 9],
        "bbox_max_x": rows[:, 10],
        "area_px": rows[:, 1],
        "perimeter_px": perimeters,
    }
    if mpp is not None:
        columns["area_um2"] = n * mpp * mpp
        columns["perimeter_um"] = perimeters * mpp
    columns["eccentricity"] = eccentricity
    for c in range(rows.shape[1] - _I):
        columns[f"mean_intensity_{c}"] = rows[:, _I + c] / n
    return columns
