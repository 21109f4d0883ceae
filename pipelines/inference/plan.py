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

from dataclasses import dataclass, replace

import numpy as np

from segcore.geometry import UNetGeometry
from segcore.orientation import IDENTITY, Orientation
from segcore.tiling import TilePlan, plan_tiles, reflect_indices

#: Block side aimed at when none is given: big enough to amortise reads, small enough to keep a
#: block's float32 logits (K x side^2) and padded input well under a GiB.
DEFAULT_BLOCK_TARGET = 2048


@dataclass(frozen=True)
class OrientedView:
    """A block's pixels as one orientation's whole-slide pass computes them: the tiles of the
    oriented slide's plan that own the block's oriented region, and where that region lies in
    their output. For the identity orientation this is the block's own plan and crop nothing.

    Worked example, a 1000-column slide flipped along x, 384 px tile stride (origins 0, 384,
    768), a block owning columns 0..384: in the flipped slide these are columns 616..1000,
    owned by the tiles at 384 (616..767) and 768 (768..999); the view runs those two tiles over
    flipped columns 384..1000 and keeps 232..616 of their output.
    """

    orientation: Orientation
    tiles: TilePlan
    #: Oriented slide coordinates of the tiles' output pixel (0, 0).
    start: tuple[int, int]
    #: The block's pixels within the tiles' output (oriented).
    crop: tuple[slice, slice]

    def source_indices(self, slide_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Source slide rows and columns that, gathered (and transposed when the orientation
        transposes), give the view's padded input, mirrored at the slide's borders."""
        oriented_shape = self.orientation.shape(slide_shape)
        by_source_axis: dict[int, np.ndarray] = {}
        for axis in (0, 1):
            start = self.start[axis] - self.tiles.margin
            stop = start + self.tiles.padded_shape[axis]
            extent = oriented_shape[axis]
            oriented = reflect_indices(start, stop, extent)
            source = self.orientation.source_axis(axis)
            by_source_axis[source] = self.orientation.source_index(axis, oriented, extent)
        return by_source_axis[0], by_source_axis[1]


@dataclass(frozen=True)
class Block:
    """One unit of work: output rows y0..y1, columns x0..x1, the tiles it runs and, under
    test-time averaging, its view in each orientation."""

    index: tuple[int, int]
    y0: int
    y1: int
    x0: int
    x1: int
    tiles: TilePlan
    views: tuple[OrientedView, ...] = ()

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


def _owner(origins: tuple[int, ...], px: int) -> int:
    """The origin of the tile a whole-slide pass takes output px `px` from (the largest origin
    at or before it: predict_padded lets later tiles overwrite the px they share)."""
    return max(o for o in origins if o <= px)


def _oriented_view(
    block: Block, slide_shape: tuple[int, int], orientation: Orientation, oriented: TilePlan
) -> OrientedView:
    """The view of `block` in the pass over the slide oriented by `orientation`, whose whole
    plan is `oriented`."""
    spans = orientation.region(((block.y0, block.y1), (block.x0, block.x1)), slide_shape)
    origins_by_axis = (oriented.origins_y, oriented.origins_x)
    starts, locals_, crops = [], [], []
    for (a0, a1), origins in zip(spans, origins_by_axis, strict=True):
        first, last = _owner(origins, a0), _owner(origins, a1 - 1)
        starts.append(first)
        locals_.append(tuple(o - first for o in origins if first <= o <= last))
        crops.append(slice(a0 - first, a1 - first))
    tiles = TilePlan(
        out_shape=(spans[0][1] - starts[0], spans[1][1] - starts[1]),
        tile_size=oriented.tile_size,
        output_size=oriented.output_size,
        stride=oriented.stride,
        margin=oriented.margin,
        origins_y=locals_[0],
        origins_x=locals_[1],
    )
    return OrientedView(orientation, tiles, (starts[0], starts[1]), (crops[0], crops[1]))


def plan_slide(
    shape: tuple[int, int],
    geometry: UNetGeometry,
    tile_size: int,
    block_size: int | None = None,
    averaged: tuple[Orientation, ...] = (IDENTITY,),
) -> SlidePlan:
    """Blocks covering a slide of `shape` (H, W), each owning whole output chunks; with more
    than the identity in `averaged`, each block also gets its view in every orientation."""
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
    if averaged != (IDENTITY,):
        # Same tile size in every orientation; a transposed slide gets its own whole plan.
        whole = {o: plan_tiles(o.shape(shape), geometry, tile_size) for o in averaged}
        blocks = tuple(
            replace(b, views=tuple(_oriented_view(b, shape, o, whole[o]) for o in averaged))
            for b in blocks
        )
    return SlidePlan(
        shape=(int(shape[0]), int(shape[1])), tiles=tiles, chunk_side=side, blocks=blocks
    )
