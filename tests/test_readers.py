"""segcore.readers: every backend returns the source's pixels as (C, h, w); bad files fail with
one line that starts with the path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from segcore.readers import (
    OpenSlideReader,
    PillowReader,
    ReaderError,
    TiffReader,
    composite_over_white,
    open_labels,
    open_slide,
    page_count,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def data(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not available")
    return path


def test_tiff_stack_pages_match_tifffile():
    path = data("isbi2012_em", "train-volume.tif")
    assert page_count(path) == 30
    for page in (0, 17, 29):
        expected = tifffile.imread(path, key=page)
        with open_slide(path, page) as reader:
            assert isinstance(reader, TiffReader)
            assert reader.shape == (1, 512, 512) and reader.dtype == np.uint8
            np.testing.assert_array_equal(reader.read_region(0, 0, 512, 512)[0], expected)
            np.testing.assert_array_equal(
                reader.read_region(101, 37, 200, 311)[0], expected[101:301, 37:348]
            )
    with pytest.raises(ReaderError, match=r"multi-page TIFF stack with 30 pages"):
        open_slide(path)
    with pytest.raises(ReaderError, match=r"no page 30 \(the file holds 30 pages\)"):
        open_slide(path, 30)


def test_openslide_region_is_composited_rgb():
    path = data("wsi_cmu1_small", "CMU-1-Small-Region.svs")
    assert page_count(path) == 1
    with open_slide(path) as reader, openslide.OpenSlide(path) as slide:
        assert isinstance(reader, OpenSlideReader)
        assert reader.shape == (3, 2967, 2220) and reader.dtype == np.uint8
        assert reader.mpp == pytest.approx(0.499)
        rgba = np.asarray(slide.read_region((1000, 2000), 0, (300, 250)))
        assert (rgba[..., 3] == 255).all()
        region = reader.read_region(2000, 1000, 250, 300)
        np.testing.assert_array_equal(np.moveaxis(region, 0, -1), rgba[..., :3])


def test_openslide_two_level_slide_reads_level_zero():
    path = data("wsi_tcga_cr7395", "tcga-cr-7395-01a-01-ts1.svs")
    with open_slide(path) as reader, openslide.OpenSlide(path) as slide:
        assert reader.shape == (3, 3567, 4443)
        assert reader.mpp is None
        expected = np.asarray(slide.read_region((4300, 3400), 0, (143, 167)).convert("RGB"))
        region = reader.read_region(3400, 4300, 167, 143)
        np.testing.assert_array_equal(np.moveaxis(region, 0, -1), expected)


def test_composite_over_white():
    rgba = np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [0, 100, 200, 128]]], np.uint8)
    out = composite_over_white(rgba)
    np.testing.assert_array_equal(out[0, 0], [10, 20, 30])
    np.testing.assert_array_equal(out[0, 1], [255, 255, 255])
    expected = np.round((np.array([0, 100, 200]) * 128 + 255 * 127) / 255)
    np.testing.assert_array_equal(out[0, 2], expected)


def test_rgba_png_is_composited_over_white(tmp_path):
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:10, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    with open_slide(tmp_path / "a.png") as reader:
        assert isinstance(reader, PillowReader) and not reader.lazy
        region = reader.read_region(0, 0, 20, 30)
    np.testing.assert_array_equal(
        region[:, :10], np.broadcast_to([[[200]], [[0]], [[0]]], (3, 10, 30))
    )
    assert (region[:, 10:] == 255).all()


def test_lzw_tiff_matches_pillow():
    path = data("monuseg_sample", "images", "TCGA-B0-5710-01Z-00-DX1.tif")
    expected = np.asarray(Image.open(path).convert("RGB"))
    with open_slide(path) as reader:
        assert reader.shape == (3, 1000, 1000)
        np.testing.assert_array_equal(
            np.moveaxis(reader.read_region(0, 0, 1000, 1000), 0, -1), expected
        )


def test_uint16_grey_tiff_keeps_its_dtype():
    path = data("dsb2018_stardist", "img2d.tif")
    with open_slide(path) as reader:
        assert reader.dtype == np.uint16 and reader.shape == (1, 512, 512)
        np.testing.assert_array_equal(reader.read_region(0, 0, 512, 512)[0], tifffile.imread(path))


def test_tiled_pyramidal_tiff_reads_level_zero_with_mpp(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (700, 900, 3), dtype=np.uint8)
    path = tmp_path / "pyramid.tif"
    with tifffile.TiffWriter(path) as tif:
        options = dict(tile=(256, 256), photometric="rgb", compression="zlib")
        tif.write(
            image,
            subifds=1,
            resolution=(1e4 / 0.25, 1e4 / 0.25),
            resolutionunit="CENTIMETER",
            **options,
        )
        tif.write(image[::2, ::2], subfiletype=1, **options)
    with open_slide(path) as reader:
        assert isinstance(reader, TiffReader)
        assert reader.shape == (3, 700, 900)
        assert reader.mpp == pytest.approx(0.25)
        np.testing.assert_array_equal(
            np.moveaxis(reader.read_region(250, 300, 333, 444), 0, -1), image[250:583, 300:744]
        )


def test_ome_tiff_physical_size_is_mpp(tmp_path):
    path = tmp_path / "x.ome.tif"
    tifffile.imwrite(
        path,
        np.zeros((3, 64, 80), np.uint8),
        ome=True,
        metadata={
            "axes": "CYX",
            "PhysicalSizeX": 0.5,
            "PhysicalSizeY": 0.5,
            "PhysicalSizeXUnit": "µm",
            "PhysicalSizeYUnit": "µm",
        },
    )
    with open_slide(path) as reader:
        assert reader.shape == (3, 64, 80)
        assert reader.mpp == pytest.approx(0.5)


def test_screen_dpi_is_not_a_pixel_size(tmp_path):
    tifffile.imwrite(
        tmp_path / "x.tif", np.zeros((8, 8), np.uint8), resolution=(72, 72), resolutionunit="INCH"
    )
    with open_slide(tmp_path / "x.tif") as reader:
        assert reader.mpp is None


def test_labels_keep_palette_indices_and_reject_floats_and_colour(tmp_path):
    ids = np.arange(64, dtype=np.uint8).reshape(8, 8)
    palette = Image.fromarray(ids, "P")
    palette.putpalette(list(np.random.default_rng(1).integers(0, 256, 768)))
    palette.save(tmp_path / "p.png")
    with open_labels(tmp_path / "p.png") as labels:
        np.testing.assert_array_equal(labels.read_region(0, 0, 8, 8)[0], ids)
    tifffile.imwrite(tmp_path / "f.tif", np.ones((8, 8), np.float32))
    with pytest.raises(ReaderError, match=r"f\.tif: non-integer labels \(dtype float32\)"):
        open_labels(tmp_path / "f.tif")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ReaderError, match=r"rgb\.png: label image has 3 channels"):
        open_labels(tmp_path / "rgb.png")


def test_region_outside_the_image_is_refused():
    reader = open_slide(data("isbi2012_em", "train", "image", "0.png"))
    with pytest.raises(ReaderError, match=r"0\.png: region y=500 x=0 h=20 w=5 is outside"):
        reader.read_region(500, 0, 20, 5)


def _truncate(src: Path, dst: Path, fraction: float) -> Path:
    data_bytes = src.read_bytes()
    dst.write_bytes(data_bytes[: int(len(data_bytes) * fraction)])
    return dst


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: _empty(d / "empty.tif"), "empty file (0 bytes)"),
        (lambda d: _garbage(d / "garbage.svs"), "not a readable .svs slide"),
        (lambda d: _garbage(d / "notes.txt"), "unsupported format '.txt'"),
        (lambda d: _garbage(d / "fake.png"), "not a valid .png file"),
        (
            lambda d: _truncate(data("dsb2018_stardist", "img2d.tif"), d / "cut.tif", 0.6),
            "truncated TIFF",
        ),
        (
            lambda d: _truncate(
                data("wsi_cmu1_small", "CMU-1-Small-Region.svs"), d / "cut.svs", 0.5
            ),
            "truncated or corrupt TIFF",
        ),
        (
            lambda d: _truncate(data("isbi2012_em", "train", "image", "3.png"), d / "cut.png", 0.5),
            "cannot decode image",
        ),
        (lambda d: d / "missing.tif", "no such file"),
    ],
)
def test_bad_files_fail_with_one_line_naming_the_file(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(ReaderError) as info, open_slide(path) as reader:
        reader.read_region(0, 0, *reader.shape[1:])
    text = str(info.value)
    assert text.startswith(str(path)) and message in text and "\n" not in text


def _empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _garbage(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(7).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    return path
