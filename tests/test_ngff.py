"""segcore.ngff: pyramids built region by region equal whole-array downsampling, and the stores
read as NGFF 0.5 images with labels in ome-zarr's own reader (tests/test_ngff_validation.py
runs an independent validator on the stores the stages write)."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Labels, Multiscales, Reader

from segcore import ngff


def test_pyramid_shapes_worked_example():
    shapes = ngff.pyramid_shapes((3, 20000, 15000), 1024)
    assert [s[-1] for s in shapes] == [15000, 7500, 3750, 1875, 938]
    assert shapes[-1] == (3, 1250, 938)
    assert ngff.pyramid_shapes((1, 512, 512), 1024) == [(1, 512, 512)]
    assert ngff.level_shapes((5, 7), 3) == [(5, 7), (3, 4), (2, 2)]


def test_label_factors_follow_the_image_where_it_is_coarser():
    assert ngff.label_factors(5, 4) == [4, 4, 4, 8, 16]
    assert ngff.label_factors(3) == [1, 2, 4]
    assert ngff.label_factors(2, 16) == [16, 16]
    assert ngff.label_factors(4, 3) == [3, 3, 3, 6]  # 4 > 3 px: halving starts after


def _reference_mean(block: np.ndarray) -> np.ndarray:
    """Mean of the real pixels of every 2x2 block, rounded half up."""
    h, w = block.shape[-2:]
    out = np.zeros((*block.shape[:-2], -(-h // 2), -(-w // 2)))
    for i in range(out.shape[-2]):
        for j in range(out.shape[-1]):
            out[..., i, j] = block[..., 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean(axis=(-2, -1))
    return np.floor(out + 0.5)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_downsample2_mean_is_rounded_mean_of_real_pixels(dtype):
    rng = np.random.default_rng(3)
    block = rng.integers(0, np.iinfo(dtype).max, (2, 9, 12), endpoint=True).astype(dtype)
    out = ngff.downsample2(block, "mean")
    assert out.dtype == dtype and out.shape == (2, 5, 6)
    np.testing.assert_array_equal(out, _reference_mean(block.astype(np.float64)))
    labels = rng.integers(0, 2**32, (9, 12), dtype=np.uint32)
    np.testing.assert_array_equal(ngff.downsample2(labels, "nearest"), labels[::2, ::2])


@pytest.mark.parametrize("region_size", [8, 24])
def test_pyramid_from_regions_equals_whole_array_chain(tmp_path, region_size):
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (3, 75, 61), dtype=np.uint8)
    root = zarr.open_group(tmp_path / "s.zarr", mode="w", zarr_format=3)
    levels = ngff.create_image(root, image.shape, np.uint8, chunk_size=8, min_level_size=9)
    assert [a.shape for a in levels] == [(3, 75, 61), (3, 38, 31), (3, 19, 16), (3, 10, 8)]
    levels[0][...] = image
    for src, dst in zip(levels, levels[1:], strict=False):
        for region in ngff.level_regions(dst.shape, region_size):
            ngff.downsample_region(src, dst, region, "mean")
    expected = image
    for level in levels[1:]:
        expected = ngff.downsample2(expected, "mean")
        np.testing.assert_array_equal(level[...], expected)


def test_downsample_array_is_block_mean():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (3, 40, 36), dtype=np.uint8)
    out = ngff.downsample_array(image, 4)
    assert out.shape == (3, 10, 9)
    expected = image.reshape(3, 10, 4, 9, 4).mean(axis=(2, 4))
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_store_validates_as_image_with_labels(tmp_path):
    path = tmp_path / "slide.zarr"
    root = zarr.open_group(path, mode="w", zarr_format=3)
    levels = ngff.create_image(
        root, (3, 300, 200), "uint8", chunk_size=64, min_level_size=64, mpp=0.5
    )
    ngff.create_label(
        root, "annotations", (300, 200), "uint32", len(levels), chunk_size=64, mpp=0.5
    )
    ngff.create_label(root, "tissue", (75, 50), "uint8", len(levels), mpp=0.5, downsample=4)
    # Re-creating a label (inference re-runs) replaces it without listing it twice.
    tissue_levels = ngff.create_label(
        root, "tissue", (150, 100), "uint8", len(levels), mpp=0.5, downsample=2, overwrite=True
    )
    assert [a.shape for a in tissue_levels] == [(150, 100), (150, 100), (75, 50)]

    nodes = list(Reader(parse_url(str(path)))())
    image = nodes[0]
    assert image.load(Multiscales) is not None
    assert [d.shape for d in image.data] == [(3, 300, 200), (3, 150, 100), (3, 75, 50)]
    labels = [n for n in nodes if n.load(Label) is not None]
    assert sorted(n.zarr.path.rstrip("/").rsplit("/", 1)[-1] for n in labels) == [
        "annotations",
        "tissue",
    ]
    assert any(n.load(Labels) is not None for n in nodes)
    assert zarr.open_group(path / "labels").attrs["ome"]["labels"] == ["annotations", "tissue"]

    multiscales = root.attrs["ome"]["multiscales"][0]
    assert root.attrs["ome"]["version"] == "0.5"
    scales = [d["coordinateTransformations"][0]["scale"] for d in multiscales["datasets"]]
    assert scales == [[1.0, 0.5, 0.5], [1.0, 1.0, 1.0], [1.0, 2.0, 2.0]]
    assert [a.get("unit") for a in multiscales["axes"]] == [None, "micrometer", "micrometer"]
    tissue = zarr.open_group(path / "labels" / "tissue").attrs["ome"]
    datasets = tissue["multiscales"][0]["datasets"]
    # The mask's own 1 um grid where the image is finer, then the image's 2 um.
    assert [d["coordinateTransformations"][0]["scale"] for d in datasets] == [
        [1.0, 1.0],
        [1.0, 1.0],
        [2.0, 2.0],
    ]
    assert tissue["image-label"]["source"] == {"image": "../../"}
