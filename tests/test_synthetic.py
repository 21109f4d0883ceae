"""Synthetic slides: deterministic, tile-by-tile equals whole, readable, bounded memory."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from scipy import ndimage

from segcore import synthetic
from segcore.synthetic import (
    NUCLEUS_BOX,
    SlideSpec,
    SyntheticSlideError,
    _nuclei_near,
    _rasterise,
    render_labels,
    render_region,
    write_synthetic_slide,
)

GLASS_MIN = 225  # every channel of glass (no tissue) is at least this bright


def _write(tmp_path: Path, name: str, height: int, width: int, seed: int, tile: int = 256):
    return write_synthetic_slide(
        tmp_path / f"{name}.tif", tmp_path / f"{name}-labels.tif", height, width, seed, tile
    )


def _reduce_mean(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.int64)
    pad = ((0, a.shape[0] % 2), (0, a.shape[1] % 2)) + ((0, 0),) * (a.ndim - 2)
    a = np.pad(a, pad, mode="edge")
    return (a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2] + 2) // 4


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """A small slide with partial edge tiles (1100 x 1300 in 256 px tiles)."""
    return _write(tmp_path_factory.mktemp("slide"), "s", 1100, 1300, seed=11)


@pytest.fixture(scope="module")
def region():
    spec = SlideSpec(1024, 1024, seed=5)
    return spec, *render_region(spec, 0, 0, 1024, 1024)


def test_render_is_deterministic_by_seed(region):
    spec, rgb, labels = region
    rgb2, labels2 = render_region(SlideSpec(1024, 1024, seed=5), 0, 0, 1024, 1024)
    np.testing.assert_array_equal(rgb, rgb2)
    np.testing.assert_array_equal(labels, labels2)
    other_rgb, other_labels = render_region(SlideSpec(1024, 1024, seed=6), 0, 0, 1024, 1024)
    assert np.mean(other_rgb != rgb) > 0.5
    assert np.mean((other_labels > 0) != (labels > 0)) > 0.02


def test_tiles_equal_the_whole_region(region):
    spec, rgb, labels = region
    # Irregular tiles, so tile borders cut through nuclei and cell bodies at odd places.
    edges_y, edges_x = [0, 77, 300, 301, 640, 1024], [0, 200, 333, 512, 999, 1024]
    crossing = 0
    for y0, y1 in zip(edges_y, edges_y[1:], strict=False):
        for x0, x1 in zip(edges_x, edges_x[1:], strict=False):
            tile_rgb, tile_labels = render_region(spec, y0, x0, y1 - y0, x1 - x0)
            np.testing.assert_array_equal(tile_rgb, rgb[y0:y1, x0:x1])
            np.testing.assert_array_equal(tile_labels, labels[y0:y1, x0:x1])
            np.testing.assert_array_equal(
                render_labels(spec, y0, x0, y1 - y0, x1 - x0), labels[y0:y1, x0:x1]
            )
    for y in edges_y[1:-1]:
        above, below = labels[y - 1], labels[y]
        crossing += np.count_nonzero((above == below) & (above > 0))
    assert crossing > 0, "no nucleus crosses a tile border: the test proves nothing"


def test_label_ids_are_unique_nuclei(region):
    _, _, labels = region
    ids = np.unique(labels[labels > 0])
    assert len(ids) > 100
    # One id is one nucleus: its pixels fit in one nucleus' box, never two places.
    for box in ndimage.find_objects(labels):
        if box is not None:
            assert all(s.stop - s.start <= 2 * NUCLEUS_BOX + 2 for s in box)


def test_nuclei_touch_overlap_and_stand_alone(region):
    spec, _, labels = region
    # Touching: neighbouring pixels with two different ids.
    touching = (labels[:, 1:] != labels[:, :-1]) & (labels[:, 1:] > 0) & (labels[:, :-1] > 0)
    assert touching.sum() > 50
    # Overlapping: pixels that lie inside more than one nucleus' ellipse.
    nuclei = _nuclei_near(spec, 0, 0, 1024, 1024)
    rows, cols, _ = _rasterise(nuclei, 0, 0, 1024, 1024, 1.0, NUCLEUS_BOX)
    assert (np.bincount(rows * 1024 + cols) > 1).sum() > 100
    # Isolated: connected foreground components that hold a single id.
    components, n = ndimage.label(labels > 0)
    single = sum(
        len(np.unique(labels[box][components[box] == i + 1])) == 1
        for i, box in enumerate(ndimage.find_objects(components))
    )
    assert n > 50 and single > 0.5 * n


def test_nuclei_are_darker_than_stroma(region):
    _, rgb, labels = region
    grey = rgb.astype(np.float64).mean(axis=-1)
    near_nucleus = ndimage.binary_dilation(labels > 0, iterations=25)
    stroma = ~near_nucleus & (rgb.min(axis=-1) < GLASS_MIN)
    assert stroma.sum() > 1000
    stroma_mean = grey[stroma].mean()
    ids = np.unique(labels[labels > 0])
    nucleus_means = ndimage.mean(grey, labels, ids)
    assert np.mean(nucleus_means < stroma_mean - 30) > 0.95
    # Hematoxylin is blue-purple: blue above green inside nuclei.
    inside = rgb[labels > 0].astype(np.int64)
    assert np.mean(inside[:, 2] > inside[:, 1]) > 0.95


def test_background_is_glass_without_nuclei(region):
    spec, rgb, labels = region
    glass = rgb.min(axis=-1) >= GLASS_MIN
    assert 0.05 < glass.mean() < 0.95
    assert not labels[glass].any()
    assert abs(float(rgb[glass].mean()) - 240) < 5
    # The slide's frame is always glass.
    frame = int(spec.border / 2)
    for edge in (labels[:frame], labels[-frame:], labels[:, :frame], labels[:, -frame:]):
        assert not edge.any()
    assert (rgb[:frame].min(axis=-1) >= GLASS_MIN).all()


def test_written_slide_equals_rendering_and_tifffile_reads_levels(slide):
    assert slide.image_path.exists() and slide.labels_path.exists()
    spec = SlideSpec(1100, 1300, seed=11)
    rgb, labels = render_region(spec, 0, 0, 1100, 1300)
    np.testing.assert_array_equal(tifffile.imread(slide.image_path, level=0), rgb)
    read_labels = tifffile.imread(slide.labels_path, level=0)
    assert read_labels.dtype == np.uint32
    np.testing.assert_array_equal(read_labels, labels)
    assert slide.n_nuclei == len(np.unique(labels)) - 1
    for path, reduce in ((slide.image_path, _reduce_mean), (slide.labels_path, None)):
        with tifffile.TiffFile(path) as tif:
            levels = [level.asarray() for level in tif.series[0].levels]
        assert [level.shape[:2] for level in levels] == [
            (1100, 1300),
            (550, 650),
            (275, 325),
            (138, 163),
        ]
        assert len(levels) == slide.n_levels
        for big, small in zip(levels, levels[1:], strict=False):
            expected = reduce(big) if reduce else big[0::2, 0::2]
            np.testing.assert_array_equal(small, expected)


def test_openslide_opens_the_image(slide):
    with openslide.OpenSlide(slide.image_path) as osr:
        assert osr.properties[openslide.PROPERTY_NAME_VENDOR] == "generic-tiff"
        assert osr.level_count == slide.n_levels
        assert osr.dimensions == (1300, 1100)
        assert float(osr.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
        region = np.asarray(osr.read_region((300, 200), 0, (400, 500)))
    level0 = tifffile.imread(slide.image_path, level=0)
    assert (region[..., 3] == 255).all()
    np.testing.assert_array_equal(region[..., :3], level0[200:700, 300:700])


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, slide):
    again = _write(tmp_path, "again", 1100, 1300, seed=11)
    assert again.image_path.read_bytes() == slide.image_path.read_bytes()
    assert again.labels_path.read_bytes() == slide.labels_path.read_bytes()
    other = _write(tmp_path, "other", 1100, 1300, seed=12)
    assert other.image_path.read_bytes() != slide.image_path.read_bytes()
    assert other.labels_path.read_bytes() != slide.labels_path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "again-labels.tif",
        "again.tif",
        "other-labels.tif",
        "other.tif",
    ]


def _traced_peak(tmp_path: Path, side: int, tile: int) -> int:
    """Peak traced allocation (numpy arrays included) while writing one slide."""
    tracemalloc.start()
    try:
        written = _write(tmp_path, f"slide-{side}", side, side, seed=3, tile=tile)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert tifffile.TiffFile(written.image_path).series[0].shape == (side, side, 3)
    return peak


def test_memory_does_not_grow_with_the_slide(tmp_path):
    small = _traced_peak(tmp_path, 1024, tile=256)
    big = _traced_peak(tmp_path, 4096, tile=256)
    full_rgb_bytes = 4096 * 4096 * 3
    # Measured ~8 MB for both (a few tiles and their temporaries), against 50 MB for the
    # 4096 px RGB level 0 alone and 117 MB with its labels.
    assert big < full_rgb_bytes / 4, f"peak traced {big / 1e6:.1f} MB"
    assert big < 1.25 * small, f"peak {small / 1e6:.1f} MB -> {big / 1e6:.1f} MB for 16x pixels"


@pytest.mark.parametrize(
    ("height", "width", "tile", "labels_name", "message"),
    [
        (0, 100, 256, "bad-labels.tif", "is empty"),
        (100, 100, 100, "bad-labels.tif", "not a multiple of 16"),
        (100, 100, 256, "bad.tif", "must be different files"),
        (100, 100, 256, "missing/bad-labels.tif", "does not exist"),
    ],
)
def test_bad_arguments_fail_naming_the_file(tmp_path, height, width, tile, labels_name, message):
    image, labels = tmp_path / "bad.tif", tmp_path / labels_name
    with pytest.raises(SyntheticSlideError, match=message) as info:
        write_synthetic_slide(image, labels, height, width, 1, tile)
    assert str(image) in str(info.value) or str(labels) in str(info.value)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_failure_midway_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []

    def failing_labels(*args):
        calls.append(args)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return render_labels(*args)

    # The image file is complete by the time the labels fail: it must not appear either.
    monkeypatch.setattr(synthetic, "render_labels", failing_labels)
    with pytest.raises(RuntimeError, match="disk full"):
        write_synthetic_slide(tmp_path / "a.tif", tmp_path / "a-labels.tif", 600, 600, 1, 256)
    assert len(calls) == 3
    assert list(tmp_path.iterdir()) == []


def test_region_outside_the_slide_is_refused():
    with pytest.raises(SyntheticSlideError, match="not inside"):
        render_region(SlideSpec(100, 100, seed=1), 50, 50, 60, 10)
