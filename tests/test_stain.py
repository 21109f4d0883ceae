from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.color import hed2rgb, hed_from_rgb, rgb2hed, rgb_from_hed

from segcore.stain import (
    HED_FROM_RGB,
    RGB_FROM_HED,
    StainInputError,
    hed_to_rgb,
    rgb_to_hed,
    stain_statistics,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LN_1E6 = np.log(1e6)  # skimage divides concentrations by it


def _monuseg_tile() -> np.ndarray:
    """One real H&E tile, 3 x 1000 x 1000 uint8."""
    tifffile = pytest.importorskip("tifffile")
    paths = sorted((DATA / "monuseg_train" / "images").glob("*.tif"))
    if not paths:
        pytest.skip("monuseg_train absent")
    return np.moveaxis(tifffile.imread(paths[0])[..., :3], -1, 0).copy()


def _random_rgb(seed: int = 0) -> np.ndarray:
    """3 x 32 x 32 uint8, every value 0..255 present."""
    rng = np.random.default_rng(seed)
    flat = np.concatenate([np.arange(256), rng.integers(0, 256, 3 * 32 * 32 - 256)])
    return rng.permutation(flat).reshape(3, 32, 32).astype(np.uint8)


def _hed(rgb_uint8: np.ndarray) -> np.ndarray:
    return rgb_to_hed(torch.from_numpy(rgb_uint8 / 255.0)).numpy()


def test_stain_matrices_are_skimages():
    np.testing.assert_array_equal(RGB_FROM_HED, rgb_from_hed)
    np.testing.assert_allclose(HED_FROM_RGB, hed_from_rgb, rtol=0, atol=1e-12)


def test_conversions_match_skimage_in_both_directions():
    for rgb in (_random_rgb(), _monuseg_tile()[:, :200, :200]):
        channel_last = np.moveaxis(rgb, 0, -1)
        ours = np.moveaxis(_hed(rgb), 0, -1)
        # skimage: the same concentrations over ln(1e6), negative ones clipped to 0.
        np.testing.assert_allclose(np.maximum(ours / LN_1E6, 0), rgb2hed(channel_last), atol=1e-12)
        stains = rgb2hed(channel_last)
        back = hed_to_rgb(torch.from_numpy(np.moveaxis(stains * LN_1E6, -1, 0))).numpy()
        np.testing.assert_allclose(np.moveaxis(back, 0, -1), hed2rgb(stains), atol=1e-12)
        # skimage's round trip is ours with its clipping of negative concentrations.
        clipped = torch.from_numpy(_hed(rgb)).clamp_min(0)
        np.testing.assert_allclose(
            np.moveaxis(hed_to_rgb(clipped).numpy(), 0, -1),
            hed2rgb(rgb2hed(channel_last)),
            atol=1e-12,
        )
        # Without the clipping the round trip is exact (0 comes back as the 1e-6 floor).
        np.testing.assert_allclose(
            hed_to_rgb(torch.from_numpy(_hed(rgb))).numpy(), rgb / 255, atol=2e-6
        )


def test_worked_example_haematoxylin_is_purple():
    hed = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    rgb = hed_to_rgb(hed).flatten()
    np.testing.assert_allclose(rgb, np.exp(-np.array([0.65, 0.70, 0.29])), rtol=1e-6)
    assert rgb[2] > rgb[0] > rgb[1]  # blue over red over green
    white = torch.ones(3, 1, 1)
    assert rgb_to_hed(white).abs().max() == 0


def test_conversions_refuse_images_that_are_not_rgb():
    with pytest.raises(StainInputError, match="3 x H x W"):
        rgb_to_hed(torch.rand(1, 4, 4))
    with pytest.raises(StainInputError, match="uint8"):
        stain_statistics([np.ones((3, 4, 4))])


def _synthetic_tile(h_mean: float, h_spread: float, seed: int) -> np.ndarray:
    """3 x 64 x 64 uint8: left half white glass, right half tissue with E 0.4, D 0 and
    H = h_mean +- h_spread (each pixel one of the two, half and half: std h_spread)."""
    rng = np.random.default_rng(seed)
    hed = np.zeros((3, 64, 64))
    sign = rng.permutation(np.repeat([-1.0, 1.0], 64 * 16)).reshape(64, 32)
    hed[0, :, 32:] = h_mean + h_spread * sign
    hed[1, :, 32:] = 0.4
    rgb = hed_to_rgb(torch.from_numpy(hed)).numpy()
    return np.round(rgb * 255).astype(np.uint8)


def test_stain_statistics_recover_known_concentrations():
    stats = stain_statistics([_synthetic_tile(0.8, 0.2, 0)])
    # uint8 rounding moves a concentration by at most ~1/255 / intensity, about 0.01 here.
    assert stats["h_mean"] == pytest.approx(0.8, abs=0.01)
    assert stats["h_std"] == pytest.approx(0.2, abs=0.01)
    assert stats["e_mean"] == pytest.approx(0.4, abs=0.01) and stats["e_std"] < 0.01
    assert stats["d_mean"] == pytest.approx(0.0, abs=0.01) and stats["d_std"] < 0.01
    assert stats["tissue_fraction"] == 0.5 and stats["tissue_pixels"] == 64 * 32
    # Two tiles pool their pixels: H is then 0.4 +- 0.1 and 0.8 +- 0.2 in equal shares,
    # mean 0.6, variance (0.1^2 + 0.2^2) / 2 + 0.2^2 = 0.065.
    pooled = stain_statistics(iter([_synthetic_tile(0.4, 0.1, 1), _synthetic_tile(0.8, 0.2, 2)]))
    assert pooled["h_mean"] == pytest.approx(0.6, abs=0.01)
    assert pooled["h_std"] == pytest.approx(np.sqrt(0.065), abs=0.01)
    assert pooled["tissue_pixels"] == 2 * 64 * 32


def test_stain_statistics_of_a_real_tile_streamed_in_quarters():
    tile = _monuseg_tile()
    quarters = [tile[:, y : y + 500, x : x + 500] for y in (0, 500) for x in (0, 500)]
    stats = stain_statistics(quarters)
    # The whole tile at once with skimage's matrix and floor, in numpy.
    od = -np.log(np.maximum(np.moveaxis(tile, 0, -1) / 255.0, 1e-6))
    tissue = od.mean(axis=-1) > 0.15
    hed = od[tissue] @ hed_from_rgb
    for i, name in enumerate("hed"):
        assert stats[f"{name}_mean"] == pytest.approx(hed[:, i].mean(), abs=1e-9)
        assert stats[f"{name}_std"] == pytest.approx(hed[:, i].std(), abs=1e-9)
    assert stats["tissue_pixels"] == tissue.sum()
    # Nuclei against cytoplasm: haematoxylin varies more than eosin. (No DAB on H&E, but
    # the fixed D vector takes what H and E leave unexplained: d_mean is not 0 on real tiles.)
    assert stats["h_std"] > stats["e_std"] and 0.2 < stats["tissue_fraction"] <= 1


def test_stain_statistics_without_tissue_are_undefined():
    white = np.full((3, 8, 8), 255, np.uint8)
    stats = stain_statistics([white])
    assert np.isnan(stats["h_mean"]) and np.isnan(stats["e_std"])
    assert stats["tissue_fraction"] == 0.0 and stats["tissue_pixels"] == 0
    assert np.isnan(stain_statistics([])["tissue_fraction"])
