"""The eight orientations of an image (flips and 90-degree rotations) for test-time averaging.

Ronneberger et al. averaged the U-Net's output over rotated and flipped inputs for their ISBI
result. An orientation is "transpose (or not), then flip rows (or not), then flip columns (or
not)"; these eight are the symmetries of the square. Each orientation's prediction is an exact
overlap-tile pass over the oriented image, mapped back: test-time averaging is the mean of the
softmax probabilities over the orientations of a set.

Worked example, a 2 x 3 image [[1, 2, 3], [4, 5, 6]]:
    Orientation(transpose=False, flip_y=False, flip_x=True)  -> [[3, 2, 1], [6, 5, 4]]
    Orientation(transpose=True,  flip_y=False, flip_x=True)  -> [[4, 1], [5, 2], [6, 3]]
      (a 90-degree clockwise rotation); `invert` maps either back to the original.
Oriented row i of a 2 x 3 image flipped along y is source row 2 - 1 - i (`source_index`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

OrientationSet = Literal["none", "flips", "dihedral"]


@dataclass(frozen=True)
class Orientation:
    """Transpose the last two axes (or not), then flip rows, then flip columns."""

    transpose: bool = False
    flip_y: bool = False
    flip_x: bool = False

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        """The oriented view of a (..., H, W) tensor."""
        out = image.transpose(-1, -2) if self.transpose else image
        dims = [d for d, on in ((-2, self.flip_y), (-1, self.flip_x)) if on]
        return out.flip(dims) if dims else out

    def invert(self, oriented: torch.Tensor) -> torch.Tensor:
        """The (..., H, W) tensor whose oriented view is `oriented`."""
        dims = [d for d, on in ((-2, self.flip_y), (-1, self.flip_x)) if on]
        out = oriented.flip(dims) if dims else oriented
        return out.transpose(-1, -2) if self.transpose else out

    def shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        """The (H, W) of the oriented image."""
        return (shape[1], shape[0]) if self.transpose else (shape[0], shape[1])

    def source_axis(self, axis: int) -> int:
        """The axis (0 rows, 1 columns) of the source image that oriented `axis` runs along."""
        return 1 - axis if self.transpose else axis

    def flips(self, axis: int) -> bool:
        """Whether oriented `axis` runs against its source axis."""
        return self.flip_y if axis == 0 else self.flip_x

    def source_index(self, axis: int, index: np.ndarray, extent: int) -> np.ndarray:
        """Source indices (along `source_axis(axis)`) of oriented indices along `axis`, for an
        oriented axis of `extent` px."""
        return extent - 1 - index if self.flips(axis) else index

    def region(
        self, region: tuple[tuple[int, int], tuple[int, int]], shape: tuple[int, int]
    ) -> tuple[tuple[int, int], tuple[int, int]]:
        """Where the source rectangle ((y0, y1), (x0, x1)) of an image of `shape` lies in the
        oriented image, as ((a0, a1), (c0, c1))."""
        oriented_shape = self.shape(shape)
        spans = []
        for axis in (0, 1):
            lo, hi = region[self.source_axis(axis)]
            n = oriented_shape[axis]
            spans.append((n - hi, n - lo) if self.flips(axis) else (lo, hi))
        return spans[0], spans[1]


IDENTITY = Orientation()


def orientations(which: OrientationSet) -> tuple[Orientation, ...]:
    """The orientations averaged: "none" (the plain pass), "flips" (4: none, rows, columns,
    both) or "dihedral" (all 8, adding the transposes, i.e. the 90-degree rotations)."""
    flips = tuple(Orientation(False, fy, fx) for fy in (False, True) for fx in (False, True))
    if which == "none":
        return (IDENTITY,)
    if which == "flips":
        return flips
    return flips + tuple(Orientation(True, o.flip_y, o.flip_x) for o in flips)
