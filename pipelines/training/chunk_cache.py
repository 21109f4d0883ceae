"""Decoded Zarr chunks kept between training tiles, so a chunk is decoded once, not once per tile.

A training tile (a few hundred px) is much smaller than a chunk (512-1024 px), and zarr decodes
and checksums every chunk under a read, so a tile read through zarr costs whole chunks: on
MoNuSeg's 1000 x 1000 chunks, 8 ms for the image of one 220 px tile. The loader draws tile
after tile from the same slides, so it keeps decoded chunks, least recently used out first,
up to a byte budget per loader process.

zarr 3 keeps no decoded chunks itself; cachetools' `LRUCache` does the bookkeeping here,
bounded in bytes by each chunk's `nbytes`.

Worked example: a 2000 x 2000 array in 1000 x 1000 chunks; a tile over rows 700..919 and
columns 900..1119 touches chunks (0, 0) and (0, 1), which are decoded and kept; a next tile
inside rows 0..999 and columns 0..1999 reads nothing from disk.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import zarr
from cachetools import LRUCache

from segcore.store import read_checked


def _nbytes(chunk: np.ndarray) -> int:
    return chunk.nbytes


#: A per-pixel map applied to each chunk as it is decoded (a slide's stain standardisation),
#: kept as mapped; hashable (a frozen dataclass), as it is part of the chunk's key.
ChunkTransform = Callable[[np.ndarray], np.ndarray]


class ChunkCache:
    """Reads windows of Zarr arrays from decoded (y, x) chunks kept up to `capacity` bytes.

    Leading axes (channels) are read whole. A chunk larger than the whole budget is read but
    not kept; `capacity` 0 keeps nothing. A chunk that fails to decode raises `StoreError`
    naming it (`read_checked`), and is not kept. A `transform` of the read must act pixel by
    pixel: it runs once per chunk, and a window of mapped chunks is the mapped window.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._chunks: LRUCache = LRUCache(maxsize=max(capacity, 1), getsizeof=_nbytes)

    @property
    def size(self) -> int:
        """Bytes of the chunks kept now."""
        return int(self._chunks.currsize)

    def read(
        self, array: zarr.Array, rows: slice, cols: slice, transform: ChunkTransform | None = None
    ) -> np.ndarray:
        """`array[..., rows, cols]` for unit-step slices inside the array (through
        `transform` where given)."""
        ch, cw = array.chunks[-2:]
        lead = tuple(array.shape[:-2])
        out = np.empty((*lead, rows.stop - rows.start, cols.stop - cols.start), array.dtype)
        for i in range(rows.start // ch, (rows.stop - 1) // ch + 1):
            for j in range(cols.start // cw, (cols.stop - 1) // cw + 1):
                chunk = self._chunk(array, i, j, transform)
                y0, y1 = max(rows.start, i * ch), min(rows.stop, (i + 1) * ch)
                x0, x1 = max(cols.start, j * cw), min(cols.stop, (j + 1) * cw)
                out[..., y0 - rows.start : y1 - rows.start, x0 - cols.start : x1 - cols.start] = (
                    chunk[..., y0 - i * ch : y1 - i * ch, x0 - j * cw : x1 - j * cw]
                )
        return out

    def _chunk(
        self, array: zarr.Array, i: int, j: int, transform: ChunkTransform | None
    ) -> np.ndarray:
        key = (str(array.store_path), i, j, transform)
        chunk = self._chunks.get(key)
        if chunk is None:
            ch, cw = array.chunks[-2:]
            lead = (slice(None),) * (array.ndim - 2)
            chunk = read_checked(
                array, (*lead, slice(i * ch, (i + 1) * ch), slice(j * cw, (j + 1) * cw))
            )
            if transform is not None:
                chunk = transform(chunk)
            if 0 < chunk.nbytes <= self.capacity:
                self._chunks[key] = chunk
        return chunk
