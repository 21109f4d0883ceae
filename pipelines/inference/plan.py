"""Where the blocks of one slide go: output regions on the Zarr chunk grid and their tiles.

A block runs exactly the tiles of the whole-slide plan whose origins fall inside it, so the
distributed result is the whole-slide `segcore.tiling.predict_tiled` result, bit for bit.
`predict_padded` lets a later tile overwrite the few px it shares with the one before, so an
output px is taken from the tile with the largest origin at or before it; a block therefore
owns the tiles whose origins lie in its rows and columns, and the output chunk grid is the
block grid (block side = a multiple of the tile stride), so no two blocks write one chunk.

Worked example, paper U-Net (depth 5, margin 92), 572 px tiles, a 5000 x 3100 slide, blocks of
about 2048 px:
  - tiles predict 388 px and step by stride 384; whole-slide origins 0, 384, ..., 4608 (rows)
    and 0, 384, ..., 2688 (columns);
  - block side = 384 * round(2048 / 384) = 1920 (= the output chunk side): block rows start at
    0, 1920, 3840 and own origins {0..1536}, {1920..3456}, {3840..4608};
  - a block reads its tile input from slide rows start - 92 .. start - 92 + padded extent, real
    pixels where the slide has them and mirrored only beyond the slide's own borders;
  - the last block along an axis runs to the slide's edge. Were the slide 3844 rows high, the
    whole-slide tile at 3456 (covering 3456..3844) would reach the end, no origin would fall in
    3840..3844 and those 4 rows would come from the tile at 3456: so the last block is merged
    with the one before (rows 1920..3844) and writes both of its chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from segcore.geometry import UNetGeometry
from segcore.tiling import TilePlan, plan_tiles, reflect_indices

#: Block side aimed at when none is given: big enough to amortise reads, small enough to keep a
#: block's float32 logits (K x side^2) and padded input well under a GiB.
DEFAULT_BLOCK_TARGET = 2048


@dataclass(frozen=True)
class Block:
    """One unit of work: output rows y0..y1, columns x0..x1 and the tiles it runs."""

    index: tuple[int, int]
    y0: int
    y1: int
    x0: int
    x1: int
    tiles: TilePlan

    @property
    def name(self) -> str:
        return f"{self.index[0]}.{self.index[1]}"

    @property
    def region(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    def input_indices(self, slide_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Slide rows and columns of the block's padded input (mirrored at slide borders)."""
        m = self.tiles.margin
        ph, pw = self.tiles.padded_shape
        return (
            reflect_indices(self.y0 - m, self.y0 - m + ph, slide_shape[0]),
            reflect_indices(self.x0 - m, self.x0 - m + pw, slide_shape[1]),
        )


@dataclass(frozen=True)
class SlidePlan:
    """Blocks of one slide in raster order; output chunks are `chunk_side` px squares (cut at
    the slide's edge), so every chunk lies in exactly one block."""

    shape: tuple[int, int]
    tiles: TilePlan
    chunk_side: int
    blocks: tuple[Block, ...]


def block_side(stride: int, requested: int | None) -> int:
    """A multiple of `stride`: `requested` rounded down (at least one stride), or near 2048."""
    if requested is None:
        return stride * max(1, round(DEFAULT_BLOCK_TARGET / stride))
    return stride * max(1, requested // stride)


def _axis_edges(extent: int, side: int, origins: tuple[int, ...]) -> list[int]:
    """Block edges along one axis: multiples of `side` that own a tile origin, then the end."""
    last_origin = origins[-1]
    return [k * side for k in range(last_origin // side + 1)] + [extent]


def _local_plan(tiles: TilePlan, y0: int, y1: int, x0: int, x1: int) -> TilePlan:
    """The whole-slide tiles with origins in the block, relative to the block's origin."""
    return TilePlan(
        out_shape=(y1 - y0, x1 - x0),
        tile_size=tiles.tile_size,
        output_size=tiles.output_size,
        stride=tiles.stride,
        margin=tiles.margin,
        origins_y=tuple(o - y0 for o in tiles.origins_y if y0 <= o < y1),
        origins_x=tuple(o - x0 for o in tiles.origins_x if x0 <= o < x1),
    )


def plan_slide(
    shape: tuple[int, int],
    geometry: UNetGeometry,
    tile_size: int,
    block_size: int | None = None,
) -> SlidePlan:
    """Blocks covering a slide of `shape` (H, W), each owning whole output chunks."""
    tiles = plan_tiles(shape, geometry, tile_size)
    # An axis shorter than one tile gets a smaller tile and stride from plan_tiles, but also a
    # single block; the other axis's (larger) stride sets the square chunk grid.
    side = block_side(max(tiles.stride), block_size)
    ys = _axis_edges(shape[0], side, tiles.origins_y)
    xs = _axis_edges(shape[1], side, tiles.origins_x)
    blocks = tuple(
        Block((i, j), y0, y1, x0, x1, _local_plan(tiles, y0, y1, x0, x1))
        for i, (y0, y1) in enumerate(zip(ys[:-1], ys[1:], strict=True))
        for j, (x0, x1) in enumerate(zip(xs[:-1], xs[1:], strict=True))
    )
    return SlidePlan(
        shape=(int(shape[0]), int(shape[1])), tiles=tiles, chunk_side=side, blocks=blocks
    )
