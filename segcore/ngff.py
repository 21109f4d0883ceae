"""OME-Zarr (NGFF 0.5 on Zarr v3) writing helpers: image and label pyramids with metadata.

A pyramid is a set of arrays "0", "1", ... in one group, level k+1 halving level k along y and
x (rounding up, so no edge pixel is lost), all chunked alike. A label has as many levels as
its image, as NGFF 0.5 requires; one coarser than the image (the tissue mask) repeats its grid
at the finer levels (`label_factors`). The metadata comes from ome-zarr's own writers, so
ome-zarr readers and napari see every level and every label, and the stores validate with
ome-zarr-models (tests/test_ngff_validation.py).

Building a pyramid is split so that any scheduler can run it: `level_regions` cuts a level into
chunk-aligned regions, and `downsample_region` fills one region of level k+1 from level k, so
regions are independent tasks that never write the same chunk.

Every array segflow writes is made by `create_array` (or reopened through `writable`): every
chunk of its grid is stored, even one that equals the fill value, and each chunk ends in a
crc32c checksum. A chunk missing on disk is then damage, never background, and a corrupt one
fails to decode instead of decoding to wrong pixels (`segcore.store` checks both on read).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import zarr
from ome_zarr.format import FormatV05
from ome_zarr.writer import add_metadata, get_metadata, write_label_metadata
from ome_zarr.writer import write_multiscales_metadata as _write_multiscales_metadata

LABELS_GROUP = "labels"
Method = Literal["mean", "nearest"]
Region = tuple[slice, slice]

_FORMAT = FormatV05()
_RGB_COLORS = ("FF0000", "00FF00", "0000FF")
#: Zarr skips writing a chunk equal to the fill value by default and reads its absence back
#: as the fill value, so a deleted chunk would read as zeros; segflow stores every chunk.
WRITE_CONFIG = {"write_empty_chunks": True}


@dataclass(frozen=True)
class Compression:
    """Chunk compression: Blosc (zstd or lz4, byte-shuffled), plain zstd, or none."""

    codec: Literal["blosc-zstd", "blosc-lz4", "zstd", "none"] = "blosc-zstd"
    #: zstd level 1 compresses slides about as well as level 3 at a third of the time.
    level: int = 1

    def compressors(self) -> tuple:
        """The Zarr v3 codec list for `create_array(compressors=...)`, crc32c last."""
        return (*self._compressor(), zarr.codecs.Crc32cCodec())

    def _compressor(self) -> tuple:
        if self.codec == "none":
            return ()
        if self.codec == "zstd":
            return (zarr.codecs.ZstdCodec(level=self.level),)
        cname = self.codec.removeprefix("blosc-")
        return (zarr.codecs.BloscCodec(cname=cname, clevel=self.level, shuffle="shuffle"),)


def create_array(
    group: zarr.Group,
    name: str,
    shape: Sequence[int],
    dtype: np.dtype | str,
    chunks: Sequence[int],
    compression: Compression = Compression(),
    shards: Sequence[int] | None = None,
    dimension_names: Sequence[str] | None = None,
    overwrite: bool = False,
) -> zarr.Array:
    """An empty array `name` in `group` (fill value 0) that stores every chunk it is given and
    checksums each one: the only way segflow creates arrays."""
    return group.create_array(
        name,
        shape=tuple(shape),
        chunks=tuple(chunks),
        shards=tuple(shards) if shards is not None else None,
        dtype=dtype,
        compressors=compression.compressors(),
        fill_value=0,
        dimension_names=list(dimension_names) if dimension_names is not None else None,
        overwrite=overwrite,
        config=WRITE_CONFIG,
    )


def writable(array: zarr.Array) -> zarr.Array:
    """`array` as a writer must hold it: chunks equal to the fill value are stored too (an
    array opened by path or from a group forgets `create_array`'s setting)."""
    return array.with_config(WRITE_CONFIG)


def pyramid_shapes(shape: Sequence[int], min_level_size: int) -> list[tuple[int, ...]]:
    """Level shapes: halve y and x (rounding up) until the smaller side is <= min_level_size.

    Example: (3, 20000, 15000) with 1024 -> 15000, 7500, 3750, 1875, 938 px on the short side:
    five levels, the last (3, 1250, 938).
    """
    shapes = [tuple(int(n) for n in shape)]
    while min(shapes[-1][-2:]) > min_level_size:
        *lead, h, w = shapes[-1]
        shapes.append((*lead, math.ceil(h / 2), math.ceil(w / 2)))
    return shapes


def level_shapes(shape: Sequence[int], n_levels: int) -> list[tuple[int, ...]]:
    """The first `n_levels` shapes of the halving pyramid over `shape`."""
    shapes = [tuple(int(n) for n in shape)]
    for _ in range(n_levels - 1):
        *lead, h, w = shapes[-1]
        shapes.append((*lead, math.ceil(h / 2), math.ceil(w / 2)))
    return shapes


def level_regions(shape: Sequence[int], region_size: int) -> list[Region]:
    """(y, x) slices tiling the last two axes of `shape` in squares of `region_size`."""
    h, w = shape[-2:]
    return [
        (slice(y, min(y + region_size, h)), slice(x, min(x + region_size, w)))
        for y in range(0, h, region_size)
        for x in range(0, w, region_size)
    ]


def grown_region(region: Region, margin: int, shape: Sequence[int]) -> tuple[Region, Region]:
    """`region` grown by `margin` px on every side and clipped to the (y, x) `shape`, and where
    `region` lies inside the grown one: the read window of a task that needs context.

    Example: grown_region((slice(0, 64), slice(64, 128)), 8, (100, 150))
    -> ((slice(0, 72), slice(56, 136)), (slice(0, 64), slice(8, 72))).
    """
    grown = tuple(
        slice(max(r.start - margin, 0), min(r.stop + margin, n))
        for r, n in zip(region, shape[-2:], strict=True)
    )
    inner = tuple(
        slice(r.start - g.start, r.stop - g.start) for r, g in zip(region, grown, strict=True)
    )
    return grown, inner


def downsample2(block: np.ndarray, method: Method) -> np.ndarray:
    """Halve the last two axes of `block` (rounding up).

    "mean" averages each 2x2 block with integer rounding; an odd last row or column is padded
    by repeating it, which makes a partial block the mean of its real pixels. "nearest" keeps
    the top-left pixel of each block, so label ids survive unchanged.
    """
    if method == "nearest":
        return np.ascontiguousarray(block[..., ::2, ::2])
    h, w = block.shape[-2:]
    if h % 2 or w % 2:
        pad = [(0, 0)] * (block.ndim - 2) + [(0, h % 2), (0, w % 2)]
        block = np.pad(block, pad, mode="edge")
    quarters = [block[..., dy::2, dx::2] for dy in (0, 1) for dx in (0, 1)]
    if block.dtype.kind == "f":
        return (sum(q.astype(np.float64) for q in quarters) / 4).astype(block.dtype)
    # Four strided adds in a dtype wide enough for 4x the maximum: several times faster than
    # a reshape-and-sum over the interleaved 2x2 axes.
    wide = np.uint32 if block.dtype.itemsize <= 2 else np.int64
    total = quarters[0].astype(wide)
    for q in quarters[1:]:
        total += q
    total += 2
    total //= 4
    return total.astype(block.dtype)


def downsample_region(src: zarr.Array, dst: zarr.Array, region: Region, method: Method) -> None:
    """Fill `region` (y, x slices) of level k+1 array `dst` from level k array `src`."""
    ys, xs = region
    src_y = slice(2 * ys.start, min(2 * ys.stop, src.shape[-2]))
    src_x = slice(2 * xs.start, min(2 * xs.stop, src.shape[-1]))
    dst[..., ys, xs] = downsample2(src[..., src_y, src_x], method)


def downsample_array(src: zarr.Array | np.ndarray, factor: int) -> np.ndarray:
    """`src` averaged over factor x factor blocks (rounding the shape up), read in row bands so
    memory stays bounded by a few bands of `src`."""
    *lead, h, w = src.shape
    out_h, out_w = math.ceil(h / factor), math.ceil(w / factor)
    out = np.empty((*lead, out_h, out_w), dtype=np.float32)
    band_rows = max(1, (1 << 24) // max(1, w * factor * int(np.prod(lead, dtype=np.int64))))
    for row in range(0, out_h, band_rows):
        rows = slice(row * factor, min((row + band_rows) * factor, h))
        band = np.asarray(src[..., rows, :])
        bh = math.ceil(band.shape[-2] / factor)
        pad = [(0, 0)] * len(lead) + [(0, bh * factor - band.shape[-2]), (0, out_w * factor - w)]
        band = np.pad(band, pad, mode="edge")
        blocks = band.reshape(*lead, bh, factor, out_w, factor)
        out[..., row : row + bh, :] = blocks.mean(axis=(-3, -1), dtype=np.float32)
    return out


def label_factors(n_levels: int, downsample: int = 1) -> list[int]:
    """Level-0 image px per label px at each of a label's `n_levels` levels, for a label whose
    level 0 covers the image at 1/`downsample`: its own grid at the image levels finer than it
    (2^k < `downsample`), then halving level by level with the image. For a power of two
    that is max(2^k, `downsample`): from there on, the image level's own grid.

    NGFF 0.5 gives every label as many levels as its image; a coarse label (the tissue mask)
    repeats its grid where the image is finer, so each level's scale says what it holds.
    Example: label_factors(5, 4) -> [4, 4, 4, 8, 16]; label_factors(3) -> [1, 2, 4].
    """
    finer = (downsample - 1).bit_length()  # image levels finer than the label: ceil(log2)
    return [downsample << max(0, k - finer) for k in range(n_levels)]


def _scales(ndim: int, factors: Sequence[int], pixel_size: float) -> list[dict]:
    return [
        {
            "path": str(k),
            "coordinateTransformations": [
                {"type": "scale", "scale": [1.0] * (ndim - 2) + [pixel_size * factor] * 2}
            ],
        }
        for k, factor in enumerate(factors)
    ]


def write_multiscales(
    group: zarr.Group,
    axes: str,
    factors: Sequence[int],
    mpp: float | None,
    method: Method = "mean",
    omero: dict | None = None,
) -> None:
    """NGFF "multiscales" for levels "0".."n-1" of `group`: a pixel of level k is `factors[k]`
    level-0 image pixels across, in micrometres when `mpp` is known."""
    metadata: dict = {"method": "segcore.ngff.downsample2", "kwargs": {"method": method}}
    if omero is not None:
        metadata["omero"] = omero
    units = {"y": "micrometer", "x": "micrometer"} if mpp else None
    _write_multiscales_metadata(
        group,
        _scales(len(axes), factors, mpp or 1.0),
        fmt=_FORMAT,
        axes=list(axes),
        axes_units=units,
        name=group.basename or "image",
        metadata=metadata,
    )


def _omero(channels: int, dtype: np.dtype) -> dict:
    """Display settings: RGB channels in their colours, anything else in grey."""
    top = float(np.iinfo(dtype).max) if dtype.kind in "ui" else 1.0
    colors = _RGB_COLORS if channels == 3 else ("FFFFFF",) * channels
    return {
        "channels": [
            {
                "color": color,
                "label": f"channel {i}" if channels != 3 else "RGB"[i],
                "active": True,
                "window": {"min": 0.0, "max": top, "start": 0.0, "end": top},
            }
            for i, color in enumerate(colors)
        ],
        "rdefs": {"model": "color" if channels == 3 else "greyscale"},
    }


def _create_levels(
    group: zarr.Group,
    shapes: list[tuple[int, ...]],
    dtype: np.dtype,
    chunk_size: int,
    compression: Compression,
    dimension_names: str,
    overwrite: bool,
) -> list[zarr.Array]:
    arrays = []
    for k, shape in enumerate(shapes):
        chunks = (*shape[:-2], min(chunk_size, shape[-2]), min(chunk_size, shape[-1]))
        arrays.append(
            create_array(
                group,
                str(k),
                shape,
                dtype,
                chunks,
                compression,
                dimension_names=dimension_names,
                overwrite=overwrite,
            )
        )
    return arrays


def create_image(
    root: zarr.Group,
    shape: tuple[int, int, int],
    dtype: np.dtype | str,
    chunk_size: int = 1024,
    min_level_size: int = 1024,
    compression: Compression = Compression(),
    mpp: float | None = None,
) -> list[zarr.Array]:
    """Empty (c, y, x) image pyramid arrays "0".."n-1" in `root`, with multiscales metadata."""
    dtype = np.dtype(dtype)
    shapes = pyramid_shapes(shape, min_level_size)
    arrays = _create_levels(root, shapes, dtype, chunk_size, compression, "cyx", False)
    factors = [1 << k for k in range(len(shapes))]
    write_multiscales(root, "cyx", factors, mpp, omero=_omero(shape[0], dtype))
    return arrays


def list_labels(labels: zarr.Group, names: Sequence[str]) -> None:
    """Name `names` in the `labels` group's listing (once each, after those listed)."""
    listed = get_metadata(labels).get("labels", [])
    wanted = listed + [n for n in names if n not in listed]
    if wanted != listed:
        add_metadata(labels, {"version": _FORMAT.version, "labels": wanted}, fmt=_FORMAT)


def create_label(
    root: zarr.Group,
    name: str,
    shape: tuple[int, int],
    dtype: np.dtype | str,
    n_levels: int,
    chunk_size: int = 1024,
    compression: Compression = Compression(),
    mpp: float | None = None,
    downsample: int = 1,
    colors: list[dict] | None = None,
    properties: list[dict] | None = None,
    overwrite: bool = False,
) -> list[zarr.Array]:
    """Empty (y, x) label pyramid `labels/<name>/0..n-1` in the image group `root`, with its
    multiscales and "image-label" metadata, listed once in `labels` (re-creating a label with
    `overwrite=True` replaces it).

    `n_levels` is the image's level count (NGFF 0.5 requires the same for every label).
    `shape` is level 0 of the label, which covers the image at 1/`downsample` resolution (the
    tissue mask, for example); levels keep that grid while the image's are finer
    (`label_factors`); with a power-of-two `downsample`, level k has the shape of image level k
    wherever it is not finer.
    `colors` are NGFF {"label-value", "rgba"} entries.

    Example: a (3, 2967, 2220) image with 3 levels and a tissue mask at 1/2, shape
    (1484, 1110): label levels (1484, 1110), (1484, 1110), (742, 555).
    """
    labels = root.require_group(LABELS_GROUP)
    names = [n for n in get_metadata(labels).get("labels", []) if n != name]
    add_metadata(labels, {"version": _FORMAT.version, "labels": names}, fmt=_FORMAT)
    group = labels.create_group(name, overwrite=overwrite)
    factors = label_factors(n_levels, downsample)
    shapes = [tuple(int(n) for n in shape)]
    for previous, factor in zip(factors, factors[1:], strict=False):
        shapes.append(shapes[-1] if factor == previous else level_shapes(shapes[-1], 2)[1])
    arrays = _create_levels(
        group, shapes, np.dtype(dtype), chunk_size, compression, "yx", overwrite
    )
    write_multiscales(group, "yx", factors, mpp, method="nearest")
    write_label_metadata(
        labels,
        name,
        colors=colors,
        properties=properties,
        fmt=_FORMAT,
        source={"image": "../../"},
    )
    return arrays
