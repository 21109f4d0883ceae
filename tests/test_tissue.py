"""segcore.tissue: stained tissue is kept, empty glass is dropped, images without glass are all
tissue, and slides without tissue are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from segcore.ngff import downsample_array
from segcore.readers import open_slide
from segcore.tissue import EmptySlideError, TissueConfig, tissue_downsample, tissue_mask

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def data(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not available")
    return path


def _glass(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Near-white, slightly noisy glass, (3, h, w) uint8."""
    rng = np.random.default_rng(seed)
    return np.clip(238 + rng.normal(0, 4, (3, h, w)), 0, 255).astype(np.uint8)


def test_tissue_downsample():
    assert tissue_downsample((3, 512, 512), 2048) == 1
    assert tissue_downsample((3, 2967, 2220), 2048) == 2
    assert tissue_downsample((3, 20000, 20000), 2048) == 16
    assert tissue_downsample((3, 100, 100000), 1024) == 128


def test_stained_disc_on_glass():
    image = _glass(200, 300)
    yy, xx = np.mgrid[:200, :300]
    disc = (yy - 100) ** 2 + (xx - 120) ** 2 < 50**2
    image[:, disc] = np.array([[170], [80], [160]])  # H&E pink-purple
    mask = tissue_mask(image, TissueConfig(dilation_px=3))
    assert mask[disc].all()
    dilated = (yy - 100) ** 2 + (xx - 120) ** 2 < 54**2
    assert not mask[~dilated].any()
    assert mask[(yy - 100) ** 2 + (xx - 120) ** 2 < 52**2].all()  # errs toward tissue


def test_grey_brightfield_dark_tissue_on_bright_glass():
    image = _glass(120, 120)[:1]
    image[0, 30:70, 40:90] = 90
    mask = tissue_mask(image, TissueConfig(dilation_px=0))
    assert mask[30:70, 40:90].all()
    assert mask.sum() == 40 * 50


def test_specks_on_glass_are_an_empty_slide():
    image = _glass(200, 200)
    image[:, 50, 50] = (200, 40, 150)  # one stained pixel: dust, not tissue
    with pytest.raises(EmptySlideError, match="empty slide: no tissue found"):
        tissue_mask(image)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.full((3, 50, 60), 242, np.uint8), "every pixel has the value 242"),
        (np.zeros((3, 0, 10), np.uint8), "the image has no pixels"),
    ],
)
def test_empty_slides(image, message):
    with pytest.raises(EmptySlideError, match=f"empty slide: {message}"):
        tissue_mask(image)


def test_fluorescence_channels_are_all_tissue():
    image = np.random.default_rng(0).integers(0, 50, (4, 30, 30), dtype=np.uint16)
    assert tissue_mask(image).all()


def _coarse(path: Path, page: int | None = None) -> np.ndarray:
    with open_slide(path, page) as reader:
        image = reader.read_region(0, 0, *reader.shape[1:])
    factor = tissue_downsample(image.shape, 2048)
    return np.round(downsample_array(image, factor)).astype(image.dtype) if factor > 1 else image


def test_real_slide_keeps_every_stained_pixel_and_drops_glass():
    image = _coarse(data("wsi_cmu1_small", "CMU-1-Small-Region.svs"))
    mask = tissue_mask(image)
    rgb = image.astype(np.float64)
    value = rgb.max(axis=0)
    saturation = (value - rgb.min(axis=0)) / np.maximum(value, 1)
    assert mask[saturation > 0.3].mean() > 0.999
    assert mask[value < 150].mean() > 0.999
    assert 0.2 < mask.mean() < 0.6
    glass = (saturation < 0.05) & (value > 225)
    assert mask[glass].mean() < 0.2


@pytest.mark.parametrize(
    ("parts", "page"),
    [
        (("isbi2012_em", "train-volume.tif"), 0),
        (("dsb2018_stardist", "img2d.tif"), None),
        (("monuseg_sample", "images", "TCGA-A7-A13E-01Z-00-DX1.tif"), None),
        (("monuseg_sample", "images", "TCGA-B0-5710-01Z-00-DX1.tif"), None),
    ],
)
def test_images_without_glass_are_all_tissue(parts, page):
    """EM sections, fluorescence and tissue-only crops: Otsu's split is not tissue vs glass."""
    assert tissue_mask(_coarse(data(*parts), page)).all()


def test_uint16_brightfield_is_scaled_by_its_range():
    image = (_glass(100, 100).astype(np.uint16) * 257)[:1]
    image[0, 20:60, 20:60] = 20000
    mask = tissue_mask(image, TissueConfig(dilation_px=0))
    assert mask[20:60, 20:60].all() and mask.sum() == 1600
