"""Streamed, tiled, pyramidal BigTIFF writing over tifffile.

`write_pyramidal_tiff` writes level 0 from a function that returns any tile of it, then each
2x reduction (`segcore.ngff.downsample2`: rounded 2x2 mean for images, top-left pixel for
labels) until one tile holds the whole level. The levels go in the main IFD chain (reduced
levels marked as such), which tifffile reads as one series with `levels` and OpenSlide opens as
"generic-tiff".

Levels are streamed: tiles of level k are yielded to tifffile as they are produced (or read),
and each one's 2x reduction is written as one chunk of a temporary Zarr array that becomes the
source of level k + 1, so memory holds a few tiles, never a level or a band of tiles.

Worked example: a 1100 x 1300 slide in 256 px tiles has levels 1100 x 1300, 550 x 650,
275 x 325 and 138 x 163 (halving rounds up); level 1 is built from 5 x 6 tiles of level 0, each
reduced to one 128 px chunk of the temporary level-1 array.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import zarr

from segcore import ngff

#: Returns rows y0..y0+h-1, columns x0..x0+w-1 of a level as a (h, w, ...) array.
TileReader = Callable[[int, int, int, int], np.ndarray]

#: Tiles tifffile may hold at once for its encoding threads (at least one per thread).
_ENCODE_BUFFER_TILES = 8


def _level_shapes(height: int, width: int, tile: int) -> list[tuple[int, int]]:
    """Level 0 and each 2x reduction until one tile holds the whole level."""
    shapes = [(height, width)]
    while max(shapes[-1]) > tile:
        h, w = shapes[-1]
        shapes.append((-(-h // 2), -(-w // 2)))
    return shapes


def _halve(block: np.ndarray, method: ngff.Method) -> np.ndarray:
    """`ngff.downsample2` of a (y, x, ...) tile: it halves the last two axes, so y and x are
    moved there and back."""
    yx_last = np.moveaxis(block, (0, 1), (-2, -1))
    return np.moveaxis(ngff.downsample2(yx_last, method), (-2, -1), (0, 1))


def _level_tiles(
    read: TileReader,
    shape: tuple[int, int],
    tile: int,
    method: ngff.Method,
    next_level: zarr.Array | None,
) -> Iterator[np.ndarray]:
    """Tiles of one level in TIFF order (row-major). Each tile's 2x reduction is one chunk of
    `next_level` (chunks are tile / 2 square; tile is even, so 2x2 blocks never straddle
    tiles), written before the tile is yielded: tifffile stops pulling after the last tile."""
    height, width = shape
    for y0 in range(0, height, tile):
        for x0 in range(0, width, tile):
            block = read(y0, x0, min(tile, height - y0), min(tile, width - x0))
            if next_level is not None:
                small = _halve(block, method)
                next_level[
                    y0 // 2 : y0 // 2 + small.shape[0], x0 // 2 : x0 // 2 + small.shape[1]
                ] = small
            yield block


def _zarr_reader(array: zarr.Array) -> TileReader:
    def read(y0: int, x0: int, h: int, w: int) -> np.ndarray:
        return array[y0 : y0 + h, x0 : x0 + w]

    return read


def write_pyramidal_tiff(
    path: Path,
    read_level0: TileReader,
    shape: tuple[int, ...],
    dtype: np.dtype,
    tile: int,
    method: ngff.Method,
    **options: Any,
) -> int:
    """Write a tiled pyramidal BigTIFF of `shape` (y, x, ...) to `path`; returns the level count.

    `read_level0` is asked for each level-0 tile once, in row-major order; `tile` is the TIFF
    tile side (a multiple of 16, as TIFF requires); `method` is "mean" for images, "nearest"
    for labels; `options` go to `tifffile.TiffWriter.write` for every level (photometric,
    compression, resolution, ...). Temporary levels live in a hidden folder beside `path`,
    removed when the file is complete or the write fails.
    """
    path = Path(path)
    shapes = _level_shapes(shape[0], shape[1], tile)
    extra = tuple(shape[2:])
    tile_bytes = tile * tile * int(np.prod(extra, dtype=np.int64)) * dtype.itemsize
    with (
        tempfile.TemporaryDirectory(prefix=".levels-", dir=path.parent) as scratch,
        tifffile.TiffWriter(path, bigtiff=True) as tif,
    ):
        read = read_level0
        for level, level_shape in enumerate(shapes):
            next_level = None
            if level + 1 < len(shapes):
                next_level = ngff.create_array(
                    zarr.open_group(Path(scratch) / f"{level + 1}.zarr", mode="w"),
                    "0",
                    (*shapes[level + 1], *extra),
                    dtype,
                    (tile // 2, tile // 2, *extra),
                )
            tif.write(
                _level_tiles(read, level_shape, tile, method, next_level),
                shape=(*level_shape, *extra),
                dtype=dtype,
                tile=(tile, tile),
                subfiletype=1 if level else 0,
                # tifffile's threaded encoder gathers `buffersize` bytes of tiles before
                # encoding them (256 MB by default): keep that to a few tiles.
                buffersize=_ENCODE_BUFFER_TILES * tile_bytes,
                **options,
            )
            if next_level is not None:
                read = _zarr_reader(next_level)
    return len(shapes)
