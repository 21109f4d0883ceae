"""Synthetic H&E-like slides with instance labels, any size, deterministic by seed.

Every pixel is a pure function of (spec, y, x), so any region renders on its own and a slide
written tile by tile equals the whole region rendered at once:
  - random numbers come from a counter-based hash of (seed, stream, integer coordinates), not
    from a stateful generator, so nothing depends on the order in which regions are drawn;
  - tissue is smooth value noise (a seeded coarse grid, smoothstep-interpolated) thresholded,
    with a background frame around the slide, near-white outside;
  - nuclei are placed per 32 px bin from (seed, bin index): a bin holds up to 8 nuclei, a few
    bins hold a cluster of touching and overlapping ones. Rendering a tile needs only the bins
    within reach of it. Label ids are (bin index, slot) + 1, unique across the slide, and a
    pixel covered by several nuclei takes the largest id (the later nucleus overwrites);
  - per-pixel arithmetic uses only +, -, *, / and comparisons (no exp/sin/BLAS), which IEEE
    rounds identically wherever the pixel sits in the array being computed.

Worked example: a 4096 x 4096 slide in 512 px tiles is 64 tiles. Tile (1, 2) covers rows
512..1023, columns 1024..1535; it draws the nuclei of bins rows 15..32, columns 31..48 (the
tile plus the 20 px reach of a cell body), and its pixels equal `render_region(spec, 0, 0,
4096, 4096)[512:1024, 1024:1536]`.

`write_synthetic_slide` streams a slide tile by tile into two pyramidal tiled BigTIFFs (image
and labels) with `segcore.tiff_writer`, so memory holds a few tiles whatever the slide size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segcore.atomic import replacing
from segcore.tiff_writer import write_pyramidal_tiff

#: Nuclei are placed per bin of this many pixels; each bin has this many slots.
BIN_SIZE = 32
SLOTS_PER_BIN = 8
#: Half-size of the box a nucleus (radius <= 11 px) and its cell body are drawn in.
NUCLEUS_BOX = 12
CELL_SCALE = 1.6
CELL_BOX = 18
#: How far beyond its bin a bin's drawing can reach (centres lie inside the bin).
REACH = CELL_BOX + 2

# Colours (RGB, 0..255): glass, light and dark eosin (stroma), light and dark hematoxylin.
_GLASS = np.array([241.0, 240.0, 244.0], np.float32)
_EOSIN_LIGHT = np.array([244.0, 200.0, 224.0], np.float32)
_EOSIN_DARK = np.array([208.0, 112.0, 164.0], np.float32)
_HEMATOXYLIN_LIGHT = np.array([156.0, 112.0, 188.0], np.float32)
_HEMATOXYLIN_DARK = np.array([58.0, 30.0, 104.0], np.float32)

# Independent random streams: one per quantity drawn from the hash.
(
    _S_TISSUE1,
    _S_TISSUE2,
    _S_TISSUE3,
    _S_CELLULARITY,
    _S_EOSIN,
    _S_FIBRE1,
    _S_FIBRE2,
    _S_CHROMATIN,
    _S_PIXEL,
    _S_MODE,
    _S_COUNT,
    _S_CLUSTER_Y,
    _S_CLUSTER_X,
    _S_Y,
    _S_X,
    _S_RADIUS,
    _S_ASPECT,
    _S_ANGLE,
    _S_STAIN,
) = range(19)

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


class SyntheticSlideError(ValueError):
    """Arguments that cannot make a synthetic slide."""


@dataclass(frozen=True)
class SlideSpec:
    """Everything a synthetic slide's pixels are a function of."""

    height: int
    width: int
    seed: int
    #: Grid spacing of the coarsest tissue noise in px; None: a third of the shorter side,
    #: clipped to 128..2048, so small slides still show several tissue blobs.
    tissue_scale: float | None = None
    #: Fraction of bins in tissue that hold a cluster of touching/overlapping nuclei.
    cluster_fraction: float = 0.12

    @property
    def tissue_grid(self) -> float:
        if self.tissue_scale is not None:
            return float(self.tissue_scale)
        return float(min(max(min(self.height, self.width) / 3.0, 128.0), 2048.0))

    @property
    def bins_shape(self) -> tuple[int, int]:
        return (-(-self.height // BIN_SIZE), -(-self.width // BIN_SIZE))

    @property
    def border(self) -> float:
        """Width of the fade to glass along the slide edges, in px."""
        return max(16.0, 0.04 * min(self.height, self.width))


@dataclass(frozen=True)
class SyntheticSlide:
    """A written synthetic slide: image and label TIFFs of the same shape."""

    image_path: Path
    labels_path: Path
    height: int
    width: int
    seed: int
    tile: int
    n_levels: int
    #: Distinct nucleus ids visible in the label image.
    n_nuclei: int


# --- counter-based random numbers --------------------------------------------------------


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijective scramble of 64-bit integers (returns a new array)."""
    z = z ^ (z >> np.uint64(30))
    z *= _MIX1
    z ^= z >> np.uint64(27)
    z *= _MIX2
    z ^= z >> np.uint64(31)
    return z


def _key(seed: int, *coords: np.ndarray | int) -> np.ndarray:
    """64-bit hash of (seed, coords...), broadcast over coords; one finaliser per coordinate."""
    with np.errstate(over="ignore"):
        h = _mix(np.array([seed % (1 << 64)], np.uint64))
        for coord in coords:
            h = _mix(h ^ (np.asarray(coord, np.int64).astype(np.uint64) + _GOLDEN))
    return h


def _draw(key: np.ndarray, stream: int) -> np.ndarray:
    """Uniform floats in [0, 1), one per key, independent across streams."""
    with np.errstate(over="ignore"):
        h = _mix(key ^ np.uint64((stream + 1) * 0x632BE59BD9B4E019 % (1 << 64)))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _uniform(seed: int, stream: int, *coords: np.ndarray | int) -> np.ndarray:
    """Uniform floats in [0, 1) hashed from (seed, stream, coords...), broadcast over coords."""
    return _draw(_key(seed, *coords), stream)


def _smoothstep(t: np.ndarray) -> np.ndarray:
    return t * t * (3.0 - 2.0 * t)


def _noise_points(seed: int, stream: int, y: np.ndarray, x: np.ndarray, grid: float) -> np.ndarray:
    """Value noise in [0, 1] at points (y, x): seeded node values every `grid` px, smoothstep
    interpolated."""
    gy, gx = np.asarray(y, np.float64) / grid, np.asarray(x, np.float64) / grid
    iy, ix = np.floor(gy), np.floor(gx)
    sy, sx = _smoothstep(gy - iy), _smoothstep(gx - ix)
    iy, ix = iy.astype(np.int64), ix.astype(np.int64)
    a, b = _uniform(seed, stream, iy, ix), _uniform(seed, stream, iy, ix + 1)
    c, d = _uniform(seed, stream, iy + 1, ix), _uniform(seed, stream, iy + 1, ix + 1)
    return (a * (1.0 - sx) + b * sx) * (1.0 - sy) + (c * (1.0 - sx) + d * sx) * sy


def _noise_region(
    seed: int, stream: int, y0: int, x0: int, h: int, w: int, grid: float
) -> np.ndarray:
    """`_noise_points` on the pixel grid of a region, in float32 and separably: rows of nodes
    are interpolated along x first, then along y (a few node hashes instead of 4 per pixel)."""
    gy = np.arange(y0, y0 + h, dtype=np.float64) / grid
    gx = np.arange(x0, x0 + w, dtype=np.float64) / grid
    iy, ix = np.floor(gy), np.floor(gx)
    sy = _smoothstep(gy - iy).astype(np.float32)[:, None]
    sx = _smoothstep(gx - ix).astype(np.float32)
    iy, ix = iy.astype(np.int64), ix.astype(np.int64)
    ny0, nx0 = int(iy[0]), int(ix[0])
    nodes = _uniform(
        seed,
        stream,
        np.arange(ny0, int(iy[-1]) + 2)[:, None],
        np.arange(nx0, int(ix[-1]) + 2)[None, :],
    ).astype(np.float32)
    along_x = nodes[:, ix - nx0] * (1 - sx) + nodes[:, ix - nx0 + 1] * sx
    return along_x[iy - ny0] * (1 - sy) + along_x[iy - ny0 + 1] * sy


# --- tissue ------------------------------------------------------------------------------

#: Tissue where the field exceeds this; nuclei only where it exceeds it by _NUCLEUS_MARGIN.
_TISSUE_THRESHOLD = 0.47
_NUCLEUS_MARGIN = 0.02
#: Field units over which the tissue edge fades from glass to stroma.
_TISSUE_EDGE = 0.006


def _octaves(spec: SlideSpec, noise: Callable[[int, float], np.ndarray]) -> np.ndarray:
    g = spec.tissue_grid
    # Non-integer scale ratios keep the octaves' node grids from lining up.
    return (
        0.55 * noise(_S_TISSUE1, g)
        + 0.3 * noise(_S_TISSUE2, g / 2.3)
        + 0.15 * noise(_S_TISSUE3, g / 5.1)
    )


def _edge_fade(spec: SlideSpec, dist: np.ndarray) -> np.ndarray:
    """1 at the slide edge falling to 0 at `spec.border` px inside: no tissue near edges."""
    return np.clip((spec.border - dist) / spec.border, 0.0, 1.0)


def _tissue_points(spec: SlideSpec, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Tissue field at points; tissue where it exceeds _TISSUE_THRESHOLD."""
    field = _octaves(spec, lambda s, g: _noise_points(spec.seed, s, y, x, g))
    dist = np.minimum(
        np.minimum(y + 0.5, spec.height - 0.5 - y), np.minimum(x + 0.5, spec.width - 0.5 - x)
    )
    return field - _edge_fade(spec, dist)


def _tissue_region(spec: SlideSpec, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    field = _octaves(spec, lambda s, g: _noise_region(spec.seed, s, y0, x0, h, w, g))
    ys = np.arange(y0, y0 + h, dtype=np.float64)
    xs = np.arange(x0, x0 + w, dtype=np.float64)
    # The fade falls with distance, so the fade of the nearest edge is the larger of the
    # row's and the column's fades: two 1-D evaluations instead of one per pixel.
    fade_y = _edge_fade(spec, np.minimum(ys + 0.5, spec.height - 0.5 - ys)).astype(np.float32)
    fade_x = _edge_fade(spec, np.minimum(xs + 0.5, spec.width - 0.5 - xs)).astype(np.float32)
    return field - np.maximum.outer(fade_y, fade_x)


# --- nuclei ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Nuclei:
    """Nuclei as arrays, sorted by id (the order in which they are drawn)."""

    ids: np.ndarray  # uint32, unique across the slide
    cy: np.ndarray  # centre, px (float)
    cx: np.ndarray
    ry: np.ndarray  # semi-axes, px
    rx: np.ndarray
    cos: np.ndarray  # orientation of the rx axis
    sin: np.ndarray
    stain: np.ndarray  # hematoxylin uptake in [0, 1]


def _nuclei_near(spec: SlideSpec, y0: int, x0: int, y1: int, x1: int) -> _Nuclei:
    """All nuclei whose cell body can touch rows y0..y1-1, columns x0..x1-1."""
    nby, nbx = spec.bins_shape
    by0, by1 = max(0, (y0 - REACH) // BIN_SIZE), min(nby, (y1 - 1 + REACH) // BIN_SIZE + 1)
    bx0, bx1 = max(0, (x0 - REACH) // BIN_SIZE), min(nbx, (x1 - 1 + REACH) // BIN_SIZE + 1)
    by, bx = np.meshgrid(np.arange(by0, by1), np.arange(bx0, bx1), indexing="ij")
    by, bx = by.reshape(-1, 1), bx.reshape(-1, 1)
    slot = np.arange(SLOTS_PER_BIN)[None, :]
    seed = spec.seed
    bin_key = _key(seed, by, bx)
    slot_key = _mix(bin_key ^ slot.astype(np.uint64))

    def per_bin(stream: int) -> np.ndarray:
        return _draw(bin_key, stream)

    def per_slot(stream: int) -> np.ndarray:
        return _draw(slot_key, stream)

    top, left = (by * BIN_SIZE).astype(np.float64), (bx * BIN_SIZE).astype(np.float64)
    centre_y, centre_x = top + BIN_SIZE / 2, left + BIN_SIZE / 2
    cellularity = _noise_points(seed, _S_CELLULARITY, centre_y, centre_x, 480.0)
    clustered = per_bin(_S_MODE) < spec.cluster_fraction
    # Scattered bins: 0..4 nuclei, more where cellularity is high; clusters: 3..7 nuclei.
    count = np.where(
        clustered,
        3 + np.floor(5 * per_bin(_S_COUNT)),
        np.floor(per_bin(_S_COUNT) * (1.5 + 3.0 * cellularity)),
    )
    cy = top + per_slot(_S_Y) * BIN_SIZE
    cx = left + per_slot(_S_X) * BIN_SIZE
    # A cluster sits around a point in the bin's middle; its 3..7 nuclei (radius 4.5..9) lie
    # within 8 px of it, so they touch and overlap.
    cluster_y = top + 8 + per_bin(_S_CLUSTER_Y) * (BIN_SIZE - 16)
    cluster_x = left + 8 + per_bin(_S_CLUSTER_X) * (BIN_SIZE - 16)
    cy = np.where(clustered, cluster_y + (per_slot(_S_Y) - 0.5) * 16, cy)
    cx = np.where(clustered, cluster_x + (per_slot(_S_X) - 0.5) * 16, cx)
    major = np.where(clustered, 4.5 + 4.5 * per_slot(_S_RADIUS), 5.0 + 6.0 * per_slot(_S_RADIUS))
    minor = np.maximum(4.0, major / (1.0 + 0.7 * per_slot(_S_ASPECT)))
    # Orientation from the rational parametrisation of the half circle (t = tan(angle / 2)),
    # which needs no sin/cos and so rounds the same everywhere.
    t = 2.0 * per_slot(_S_ANGLE) - 1.0
    cos, sin = (1.0 - t * t) / (1.0 + t * t), 2.0 * t / (1.0 + t * t)
    present = slot < count
    present &= _tissue_points(spec, cy, cx) > _TISSUE_THRESHOLD + _NUCLEUS_MARGIN
    ids = ((by * nbx + bx) * SLOTS_PER_BIN + slot + 1).astype(np.uint32)
    stain = 0.55 + 0.45 * per_slot(_S_STAIN)
    # Row-major bins and ascending slots: already sorted by id.
    return _Nuclei(
        ids=np.broadcast_to(ids, present.shape)[present],
        cy=cy[present],
        cx=cx[present],
        ry=minor[present],
        rx=major[present],
        cos=cos[present],
        sin=sin[present],
        stain=stain[present],
    )


def _rasterise(
    nuclei: _Nuclei, y0: int, x0: int, h: int, w: int, scale: float, box: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixels (rows, cols within the region) inside each nucleus scaled by `scale`, and the
    index of the nucleus each belongs to. Each nucleus is tested on a (2 box + 2)^2 window."""
    offsets = np.arange(-box, box + 2)
    top, left = np.floor(nuclei.cy), np.floor(nuclei.cx)
    # Offsets from the centre are small, so float32 holds them to ~1e-6 px at any slide size.
    dy = ((top - nuclei.cy).astype(np.float32)[:, None] + offsets.astype(np.float32))[..., None]
    dx = ((left - nuclei.cx).astype(np.float32)[:, None] + offsets.astype(np.float32))[:, None]
    c = nuclei.cos.astype(np.float32)[:, None, None]
    s = nuclei.sin.astype(np.float32)[:, None, None]
    u = (dx * c + dy * s) / (scale * nuclei.rx).astype(np.float32)[:, None, None]
    v = (dy * c - dx * s) / (scale * nuclei.ry).astype(np.float32)[:, None, None]
    rows = top.astype(np.intp)[:, None] + offsets - y0
    cols = left.astype(np.intp)[:, None] + offsets - x0
    inside = u * u + v * v <= 1.0
    inside &= ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    which, iy, ix = np.nonzero(inside)
    return rows[which, iy], cols[which, ix], which


def _labels(nuclei: _Nuclei, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Instance labels: the largest id among the nuclei covering each pixel."""
    labels = np.zeros((h, w), np.uint32)
    rows, cols, which = _rasterise(nuclei, y0, x0, h, w, 1.0, NUCLEUS_BOX)
    # maximum.at, not fancy assignment: numpy does not promise which of repeated indices wins.
    np.maximum.at(labels, (rows, cols), nuclei.ids[which])
    return labels


def _check_region(spec: SlideSpec, y0: int, x0: int, h: int, w: int) -> None:
    if h < 1 or w < 1 or y0 < 0 or x0 < 0 or y0 + h > spec.height or x0 + w > spec.width:
        raise SyntheticSlideError(
            f"region ({y0}, {x0}) + ({h}, {w}) is not inside the {spec.height} x {spec.width} slide"
        )


def render_labels(spec: SlideSpec, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Instance labels (uint32, 0 = background) of rows y0..y0+h-1, columns x0..x0+w-1."""
    _check_region(spec, y0, x0, h, w)
    return _labels(_nuclei_near(spec, y0, x0, y0 + h, x0 + w), y0, x0, h, w)


def render_region(
    spec: SlideSpec, y0: int, x0: int, h: int, w: int
) -> tuple[np.ndarray, np.ndarray]:
    """RGB image (h, w, 3) uint8 and instance labels (h, w) uint32 of one region."""
    _check_region(spec, y0, x0, h, w)
    seed = spec.seed
    nuclei = _nuclei_near(spec, y0, x0, y0 + h, x0 + w)
    labels = _labels(nuclei, y0, x0, h, w)

    def noise(stream: int, grid: float) -> np.ndarray:
        return _noise_region(seed, stream, y0, x0, h, w, grid)

    # Stroma: eosin strength varies smoothly, with a fibrous texture on top; cell bodies
    # around nuclei take more eosin.
    eosin = 0.15 + 0.5 * noise(_S_EOSIN, 90.0) + 0.3 * noise(_S_FIBRE1, 7.0)
    eosin += 0.15 * noise(_S_FIBRE2, 2.7)
    rows, cols, _ = _rasterise(nuclei, y0, x0, h, w, CELL_SCALE, CELL_BOX)
    cell = np.zeros((h, w), bool)
    cell[rows, cols] = True
    eosin[cell] += 0.3
    np.clip(eosin, 0.0, 1.0, out=eosin)
    # Tissue fades into glass over a few pixels at its edge.
    alpha = np.clip((_tissue_region(spec, y0, x0, h, w) - _TISSUE_THRESHOLD) / _TISSUE_EDGE, 0, 1)
    stroma = (_EOSIN_LIGHT - _GLASS) + (_EOSIN_DARK - _EOSIN_LIGHT) * eosin[..., None]
    # +0.5 so that the final cast to uint8 rounds.
    rgb = (_GLASS + 0.5) + alpha[..., None] * stroma

    # Nuclei: per-nucleus hematoxylin uptake plus a chromatin texture.
    nucleus = labels > 0
    if nucleus.any():
        index = np.searchsorted(nuclei.ids, labels[nucleus])
        chromatin = noise(_S_CHROMATIN, 2.2)[nucleus] - 0.5
        hema = np.clip(nuclei.stain[index].astype(np.float32) + 0.5 * chromatin, 0.0, 1.0)
        rgb[nucleus] = (_HEMATOXYLIN_LIGHT + 0.5) + (_HEMATOXYLIN_DARK - _HEMATOXYLIN_LIGHT) * hema[
            :, None
        ]

    # Sensor noise, +-4 grey levels per pixel.
    ys = np.arange(y0, y0 + h)[:, None]
    xs = np.arange(x0, x0 + w)[None, :]
    rgb += (8.0 * _uniform(seed, _S_PIXEL, ys, xs) - 4.0).astype(np.float32)[..., None]
    return np.clip(rgb, 0.0, 255.0, out=rgb).astype(np.uint8), labels


# --- writing ---------------------------------------------------------------------------------


def write_synthetic_slide(
    image_path: Path,
    labels_path: Path,
    height: int,
    width: int,
    seed: int,
    tile: int = 512,
    *,
    mpp: float = 0.5,
    compression: str = "zlib",
    tissue_scale: float | None = None,
) -> SyntheticSlide:
    """Write an H&E-like RGB slide and its uint32 instance labels as pyramidal tiled TIFFs,
    tile by tile (memory does not grow with the slide). `compression` is the image's
    ('zlib' lossless, or 'jpeg'); labels are always zlib. Both files appear only when both
    are complete."""
    image_path, labels_path = Path(image_path), Path(labels_path)
    if height < 1 or width < 1:
        raise SyntheticSlideError(f"{image_path}: slide size {height} x {width} is empty")
    if tile < 16 or tile % 16:
        raise SyntheticSlideError(f"{image_path}: tile size {tile} is not a multiple of 16")
    if seed < 0:
        raise SyntheticSlideError(f"{image_path}: seed {seed} is negative")
    for path in (image_path, labels_path):
        if not path.parent.is_dir():
            raise SyntheticSlideError(f"{path}: folder {path.parent} does not exist")
    if image_path.resolve() == labels_path.resolve():
        raise SyntheticSlideError(f"{image_path}: image and labels must be different files")
    spec = SlideSpec(height, width, seed, tissue_scale=tissue_scale)
    nby, nbx = spec.bins_shape
    if nby * nbx * SLOTS_PER_BIN >= 1 << 32:
        raise SyntheticSlideError(
            f"{image_path}: {height} x {width} px has too many nuclei for uint32 label ids"
        )
    resolution = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    description = f"segflow synthetic slide seed={seed} mpp={mpp}"

    def image_tile(y0: int, x0: int, h: int, w: int) -> np.ndarray:
        return render_region(spec, y0, x0, h, w)[0]

    visible: list[np.ndarray] = []

    def labels_tile(y0: int, x0: int, h: int, w: int) -> np.ndarray:
        labels = render_labels(spec, y0, x0, h, w)
        visible.append(np.unique(labels[labels > 0]))
        return labels

    # Both files are replaced only once both are written.
    with replacing(image_path) as image_tmp, replacing(labels_path) as labels_tmp:
        n_levels = write_pyramidal_tiff(
            image_tmp,
            image_tile,
            (height, width, 3),
            np.dtype(np.uint8),
            tile,
            "mean",
            photometric="rgb",
            compression=compression,
            description=description,
            metadata=None,
            **resolution,
        )
        write_pyramidal_tiff(
            labels_tmp,
            labels_tile,
            (height, width),
            np.dtype(np.uint32),
            tile,
            "nearest",
            photometric="minisblack",
            compression="zlib",
            predictor=True,
            description=description,
            metadata=None,
            **resolution,
        )
    n_nuclei = int(np.unique(np.concatenate(visible)).size) if visible else 0
    return SyntheticSlide(
        image_path=image_path,
        labels_path=labels_path,
        height=height,
        width=width,
        seed=seed,
        tile=tile,
        n_levels=n_levels,
        n_nuclei=n_nuclei,
    )
