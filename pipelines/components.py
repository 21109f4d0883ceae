"""Connected components of a chunked class map's foreground, with ids consistent across chunks.

A whole-slide class map does not fit in memory, so `scipy.ndimage.label` runs per chunk and the
pieces of a component cut by chunk faces are merged afterwards:
  1. label every chunk on its own (local ids 1..n_c) and keep its four border lines;
  2. every pair of neighbouring chunks contributes edges (local id above/left, local id
     below/right) where foreground touches across their shared face (and across corners with
     8-connectivity); `scipy.sparse.csgraph.connected_components` merges them;
  3. label every chunk again (cheaper than storing the local labels) and map its local ids to
     global ids, writing exactly the chunks of `dst` it owns.
Global ids are deterministic: a component's id is the rank of its first pixel in the order
(chunk in raster order, then pixel in raster order within the chunk).

Worked example, 1 x 6 map in 1 x 3 chunks, `[1 1 0 | 1 0 1]`: chunk 0 has local id 1 at columns
0-1, chunk 1 has local ids 1 (column 3) and 2 (column 5). Columns 2 and 3 do not both hold
foreground, so nothing merges: global ids `[1 1 0 | 2 0 3]`. With `[1 1 1 | 1 0 1]` the face
pair (column 2, column 3) joins chunk 0's id 1 with chunk 1's id 1: `[1 1 1 | 1 0 2]`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import product
from typing import Literal

import numpy as np
import zarr
from distributed import Client
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipelines.cluster import map_bounded
from segcore.ngff import grown_region
from segcore.separation import cut_touching, drop_small, split_at_boundaries

ChunkIndex = tuple[int, int]
Region = tuple[slice, slice]


class ComponentsError(ValueError):
    """The source and destination arrays do not fit together."""


@dataclass(frozen=True)
class Labelling:
    """What labelling a chunked map found, and what happened at the chunk faces (the seam
    report: inference blocks are made of whole chunks, so these are the block faces too).

    crossing          components with pixels in more than one chunk (each labelled once)
    merged_pieces     chunk-local pieces joined to a component begun in an earlier chunk
    largest           pixels of the largest component
    ending_at_faces   chunk-local pieces that touch a face with no foreground facing them
                      across it: objects whose edge falls exactly on a chunk face, which a
                      block-wise prediction that cut objects would show many of
    """

    n_components: int
    crossing: int
    merged_pieces: int
    largest: int
    ending_at_faces: int


@dataclass(frozen=True)
class _Borders:
    """Local labels on the four border lines of one chunk."""

    top: np.ndarray
    bottom: np.ndarray
    left: np.ndarray
    right: np.ndarray


def _structure(connectivity: int) -> np.ndarray:
    return ndimage.generate_binary_structure(2, connectivity)


def _label_region(src: zarr.Array, region: Region, connectivity: int) -> tuple[np.ndarray, int]:
    """Local labels of the foreground (non-zero) pixels of `src[region]`."""
    foreground = np.asarray(src[region]) != 0
    labels, n = ndimage.label(foreground, structure=_structure(connectivity))
    return labels, int(n)


def _label_borders(src: zarr.Array, region: Region, connectivity: int) -> tuple[int, _Borders]:
    """Pass 1 task: number of local components of one chunk and its border lines."""
    labels, n = _label_region(src, region, connectivity)
    borders = _Borders(
        top=labels[0].copy(),
        bottom=labels[-1].copy(),
        left=labels[:, 0].copy(),
        right=labels[:, -1].copy(),
    )
    return n, borders


def _relabel(
    src: zarr.Array,
    dst: zarr.Array,
    region: Region,
    connectivity: int,
    base: int,
    joined: np.ndarray,
    targets: np.ndarray,
    spanning: np.ndarray,
) -> tuple[int, Counter[int]]:
    """Pass 3 task: write global ids for one chunk; returns the size of its largest component
    that lies in this chunk alone, and the sizes of its pieces of components that span chunks
    (the local ids `spanning`), by global id.

    Local id l becomes base + l - 1 minus the joined local ids below l; a joined local id
    (one whose component started in an earlier chunk) becomes that component's id `targets`.
    """
    labels, n = _label_region(src, region, connectivity)
    lut = np.arange(n + 1, dtype=np.int64) + (base - 1)
    lut[1:] -= np.searchsorted(joined, np.arange(1, n + 1))
    lut[joined] = targets
    lut[0] = 0
    # Gathering through a table of the output dtype halves its cache footprint.
    dst[region] = lut.astype(dst.dtype)[labels]
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    pieces: Counter[int] = Counter()
    for local in spanning:  # a chunk may hold several pieces of one component
        pieces[int(lut[local])] += int(sizes[local])
    sizes[spanning] = 0
    return int(sizes.max()), pieces


def _face_pairs(a: np.ndarray, b: np.ndarray, connectivity: int) -> np.ndarray:
    """(k, 2) local-id pairs touching across a face; a[i] is adjacent to b[i] (and b[i +- 1])."""
    shifts = (0,) if connectivity == 1 else (-1, 0, 1)
    pairs = []
    for s in shifts:
        lo, hi = max(0, -s), len(a) - max(0, s)
        aa, bb = a[lo:hi], b[lo + s : hi + s]
        touching = (aa != 0) & (bb != 0)
        pairs.append(np.stack([aa[touching], bb[touching]], axis=1))
    return np.unique(np.concatenate(pairs), axis=0)


def chunk_regions(shape: tuple[int, ...], grid: tuple[int, ...]) -> dict[ChunkIndex, Region]:
    """Regions of the (y, x) chunk grid `grid` over `shape`, in raster order."""
    ny, nx = (-(-s // g) for s, g in zip(shape, grid, strict=True))
    return {
        (i, j): (
            slice(i * grid[0], min((i + 1) * grid[0], shape[0])),
            slice(j * grid[1], min((j + 1) * grid[1], shape[1])),
        )
        for i, j in product(range(ny), range(nx))
    }


def write_grid(array: zarr.Array) -> tuple[int, ...]:
    """The smallest region writable without touching a neighbour's bytes: shard or chunk."""
    return tuple(array.shards or array.chunks)


def _neighbour_pairs(
    index: ChunkIndex, borders: dict[ChunkIndex, _Borders], connectivity: int
) -> Iterator[tuple[ChunkIndex, ChunkIndex, np.ndarray, tuple[np.ndarray, np.ndarray] | None]]:
    """Face (and corner) pairs between chunk `index` and its neighbours already in `borders`,
    and for a face the local ids on each side that end there (nothing facing them)."""
    i, j = index
    me = borders[index]
    neighbours: list[tuple[ChunkIndex, Callable[[_Borders], tuple[np.ndarray, np.ndarray]]]] = [
        ((i - 1, j), lambda n: (n.bottom, me.top)),
        ((i + 1, j), lambda n: (n.top, me.bottom)),
        ((i, j - 1), lambda n: (n.right, me.left)),
        ((i, j + 1), lambda n: (n.left, me.right)),
    ]
    for other, lines in neighbours:
        if other in borders:
            theirs, mine = lines(borders[other])
            # Pairs are (neighbour's local id, this chunk's local id).
            pairs = _face_pairs(theirs, mine, connectivity)
            yield (
                other,
                index,
                pairs,
                (_unmatched(theirs, pairs[:, 0]), _unmatched(mine, pairs[:, 1])),
            )
    if connectivity == 2:
        # Diagonal contact across a chunk corner: one pixel on each side.
        corners: list[tuple[ChunkIndex, Callable[[_Borders], np.ndarray]]] = [
            ((i - 1, j - 1), lambda n: _corner(n.bottom[-1], me.top[0])),
            ((i - 1, j + 1), lambda n: _corner(n.bottom[0], me.top[-1])),
            ((i + 1, j - 1), lambda n: _corner(n.top[-1], me.bottom[0])),
            ((i + 1, j + 1), lambda n: _corner(n.top[0], me.bottom[-1])),
        ]
        for other, pairs in corners:
            if other in borders:
                yield other, index, pairs(borders[other]), None


def _unmatched(line: np.ndarray, matched: np.ndarray) -> np.ndarray:
    """Local ids on a chunk face line with no foreground facing them across the face."""
    return np.setdiff1d(np.unique(line[line != 0]), matched)


def _corner(a: int, b: int) -> np.ndarray:
    return np.array([[a, b]]) if a and b else np.empty((0, 2), dtype=np.int64)


def _n_neighbours(index: ChunkIndex, grid_shape: tuple[int, int], connectivity: int) -> int:
    i, j = index
    offsets = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if connectivity == 2:
        offsets += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    return sum(0 <= i + di < grid_shape[0] and 0 <= j + dj < grid_shape[1] for di, dj in offsets)


def _merge(
    edges: list[tuple[ChunkIndex, ChunkIndex, np.ndarray]], offsets: dict[ChunkIndex, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Keys (chunk offset + local id - 1) of the components that join one with a smaller key
    across chunk faces, sorted, and the smallest key of the component each one joins.

    Only components on chunk borders enter the graph, so memory follows the total border
    length (4 x area / chunk side), not the number of components, however noisy the map.
    """
    empty = np.zeros(0, dtype=np.int64)
    if not edges:
        return empty, empty
    a = np.concatenate([offsets[x] + p[:, 0].astype(np.int64) - 1 for x, _, p in edges])
    b = np.concatenate([offsets[y] + p[:, 1].astype(np.int64) - 1 for _, y, p in edges])
    nodes, index = np.unique(np.concatenate([a, b]), return_inverse=True)
    graph = coo_matrix(
        (np.ones(len(a), dtype=np.int8), (index[: len(a)], index[len(a) :])),
        shape=(len(nodes), len(nodes)),
    )
    n, component = connected_components(graph, directed=False)
    first = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, component, nodes)
    representative = first[component]
    joins = nodes != representative
    return nodes[joins], representative[joins]


def label_foreground(
    src: zarr.Array,
    dst: zarr.Array,
    client: Client | None = None,
    connectivity: Literal[1, 2] = 1,
    max_in_flight: int = 64,
) -> Labelling:
    """Label the connected components of `src != 0` into `dst`; returns their number and how
    they met the chunk grid (`Labelling`, the seam report).

    `dst` (same shape as `src`, an unsigned integer dtype) is written chunk by chunk (shard by
    shard when sharded), each by exactly one task. `connectivity` 1 joins edge neighbours,
    2 also diagonal ones. Runs in-process when `client` is None, else on the Dask cluster with
    at most `max_in_flight` tasks queued, so memory stays bounded for any array size.
    """
    if src.ndim != 2 or src.shape != dst.shape:
        raise ComponentsError(
            f"{dst.store_path}: shape {dst.shape} does not match the class map {src.shape}"
        )
    if dst.dtype.kind != "u":
        raise ComponentsError(
            f"{dst.store_path}: instance ids need an unsigned dtype, not {dst.dtype}"
        )
    if connectivity not in (1, 2):
        raise ComponentsError(f"connectivity must be 1 or 2, got {connectivity}")
    regions = chunk_regions(src.shape, write_grid(dst))
    grid_shape = max(regions)[0] + 1, max(regions)[1] + 1

    # Pass 1: local counts, and merge edges gathered as border lines arrive; a chunk's borders
    # are dropped once all its neighbours have been seen, so memory follows the work front.
    counts: dict[ChunkIndex, int] = {}
    borders: dict[ChunkIndex, _Borders] = {}
    seen_neighbours: dict[ChunkIndex, int] = dict.fromkeys(regions, 0)
    edges: list[tuple[ChunkIndex, ChunkIndex, np.ndarray]] = []
    jobs = ((index, (src, region, connectivity)) for index, region in regions.items())
    ending: set[tuple[ChunkIndex, int]] = set()
    for index, (n, chunk_borders) in map_bounded(client, _label_borders, jobs, max_in_flight):
        counts[index] = n
        borders[index] = chunk_borders
        for other, me, pairs, enders in _neighbour_pairs(index, borders, connectivity):
            if len(pairs):
                edges.append((other, me, pairs))
            if enders is not None:
                ending.update((other, int(local)) for local in enders[0])
                ending.update((me, int(local)) for local in enders[1])
            for done in (other, me):
                seen_neighbours[done] += 1
                if seen_neighbours[done] == _n_neighbours(done, grid_shape, connectivity):
                    del borders[done]
        if _n_neighbours(index, grid_shape, connectivity) == 0:
            del borders[index]

    # Pass 2: merge only the components that touch a chunk face; the others keep their place.
    offsets, total = {}, 0
    for index in regions:  # raster order
        offsets[index] = total
        total += counts[index]
    joined, joined_to = _merge(edges, offsets)
    n_components = total - len(joined)
    if n_components > np.iinfo(dst.dtype).max:
        raise ComponentsError(f"{dst.store_path}: {n_components} components overflow {dst.dtype}")

    # Pass 3: each chunk gets what it needs to build its own lookup table, O(its border).
    spanning_keys = np.union1d(joined, joined_to)  # every piece of a multi-chunk component

    def relabel_args(index: ChunkIndex) -> tuple:
        start = offsets[index]
        lo, hi = np.searchsorted(joined, [start, start + counts[index]])
        targets = joined_to[lo:hi] + 1 - np.searchsorted(joined, joined_to[lo:hi])
        s_lo, s_hi = np.searchsorted(spanning_keys, [start, start + counts[index]])
        spanning = spanning_keys[s_lo:s_hi] - start + 1
        return start + 1 - lo, joined[lo:hi] - start + 1, targets, spanning

    jobs = (
        (index, (src, dst, region, connectivity, *relabel_args(index)))
        for index, region in regions.items()
    )
    largest, spanning_sizes = 0, Counter()
    for _, (chunk_largest, pieces) in map_bounded(client, _relabel, jobs, max_in_flight):
        largest = max(largest, chunk_largest)
        spanning_sizes.update(pieces)
    return Labelling(
        n_components=int(n_components),
        crossing=len(spanning_sizes),
        merged_pieces=len(joined),
        largest=max(largest, max(spanning_sizes.values(), default=0)),
        ending_at_faces=len(ending),
    )


def _clean_region(
    src: zarr.Array,
    dst: zarr.Array,
    region: Region,
    halo: int,
    cut_depth: float | None,
    min_size: int,
    seeded: bool,
) -> None:
    """Cleaning task: one chunk's foreground, touching objects cut apart and small ones
    dropped, seeing `halo` px around it."""
    grown, inner = grown_region(region, halo, src.shape)
    classes = np.asarray(src[grown])
    if seeded:
        foreground = split_at_boundaries(classes)
    elif cut_depth is not None:
        foreground = cut_touching(classes != 0, h=cut_depth)
    else:
        foreground = classes != 0
    if min_size > 1:
        # Window sides that are not the slide's own may cut an object: its size is unknown.
        open_sides = (
            grown[0].start > 0,
            grown[0].stop < src.shape[0],
            grown[1].start > 0,
            grown[1].stop < src.shape[1],
        )
        foreground = drop_small(foreground, min_size, open_sides)
    dst[region] = foreground[inner].astype(dst.dtype)


def clean_foreground(
    src: zarr.Array,
    dst: zarr.Array,
    client: Client | None = None,
    halo: int = 32,
    cut_depth: float | None = 2.0,
    min_size: int = 0,
    max_in_flight: int = 64,
    seeded: bool = False,
) -> None:
    """Write `src != 0` into `dst` with touching objects cut apart and objects of fewer than
    `min_size` px dropped, chunk by chunk with `halo` px of context: bounded memory for any
    slide, and equal to cleaning the whole map at once for objects smaller than the halo
    (and `min_size` <= halo). Labelling `dst` with `label_foreground` then gives the
    instances.

    The cut: `seeded` splits a background / interior / boundary class map from its interior
    seeds (`segcore.separation.split_at_boundaries`); otherwise, when `cut_depth` is set, a
    watershed of the distance transform cuts the foreground (`cut_touching`)."""
    if src.shape != dst.shape:
        raise ComponentsError(f"{dst.store_path}: shape {dst.shape} does not match {src.shape}")
    jobs = (
        (index, (src, dst, region, halo, cut_depth, min_size, seeded))
        for index, region in chunk_regions(src.shape, write_grid(dst)).items()
    )
    for _ in map_bounded(client, _clean_region, jobs, max_in_flight):
        pass
