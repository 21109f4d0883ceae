"""Overlap-tile prediction must equal one forward pass over the whole mirror-padded image."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segcore.model import UNet
from segcore.tiling import plan_tiles, predict_padded, predict_tiled, reflect_indices


def _expressive_unet(depth: int, seed: int = 0) -> UNet:
    """He init plus non-zero biases, so every level shapes the output (a near-zero deep path
    would hide misplaced tiles)."""
    torch.manual_seed(seed)
    model = UNet(2, 3, base_channels=4, depth=depth, dropout=0.0)
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d):
            torch.nn.init.normal_(m.bias, std=0.2)
    return model.eval()


def _whole_image_logits(model: UNet, image: np.ndarray) -> np.ndarray:
    """One forward pass over the image mirror-padded by the margin (and up to a valid size)."""
    g = model.geometry
    h, w = image.shape[-2:]
    rows = reflect_indices(-g.margin, g.valid_input_size(h) - g.margin, h)
    cols = reflect_indices(-g.margin, g.valid_input_size(w) - g.margin, w)
    padded = torch.from_numpy(image[:, rows][:, :, cols])[None]
    with torch.no_grad():
        return model(padded)[0, :, :h, :w].numpy()


MODELS = {depth: _expressive_unet(depth) for depth in (3, 4, 5)}


def test_deep_path_matters():
    """Sanity check for the test nets: zeroing the bottleneck changes the output a lot."""
    model = _expressive_unet(4)
    image = np.random.default_rng(0).random((2, 100, 100), dtype=np.float32)
    before = _whole_image_logits(model, image)
    with torch.no_grad():
        model.down[-1][-2].bias.add_(5.0)
    after = _whole_image_logits(model, image)
    assert np.abs(after - before).max() > 0.1


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
@given(
    depth=st.sampled_from([3, 4, 5]),
    h=st.integers(1, 300),
    w=st.integers(1, 300),
    tile_extra=st.integers(0, 300),
    batch_size=st.integers(1, 5),
)
def test_tiled_equals_whole_image(depth, h, w, tile_extra, batch_size):
    model = MODELS[depth]
    # From tiles with a 16 px output up: smaller ones only multiply the tile count.
    tile = model.geometry.valid_input_size(16) + tile_extra
    image = np.random.default_rng(h * 1000 + w).random((2, h, w), dtype=np.float32)
    tiled = predict_tiled(model, image, tile_size=tile, batch_size=batch_size)
    assert tiled.shape == (3, h, w)
    np.testing.assert_allclose(tiled, _whole_image_logits(model, image), atol=1e-4, rtol=0)


@pytest.mark.parametrize("depth", [3, 4, 5])
def test_odd_sized_image(depth):
    model = MODELS[depth]
    image = np.random.default_rng(1).random((2, 257, 611), dtype=np.float32)
    whole = _whole_image_logits(model, image)
    g = model.geometry
    for tile in (g.valid_input_size(64), g.valid_input_size(200), 1000):
        tiled = predict_tiled(model, image, tile_size=tile)
        assert np.abs(tiled - whole).max() < 1e-4


def test_origins_off_the_pooling_grid_are_not_seamless():
    """The property the planner protects: tiles stepped by the output size (not a multiple of
    the pooling grid) disagree with the whole-image pass."""
    model = MODELS[4]
    g = model.geometry
    image = np.random.default_rng(2).random((2, 300, 300), dtype=np.float32)
    plan = plan_tiles((300, 300), g, 140)
    assert plan.output_size[0] % g.pool_factor != 0
    assert all(y % g.pool_factor == 0 for y in plan.origins_y)
    misaligned = type(plan)(
        **{
            **plan.__dict__,
            "stride": plan.output_size,
            "origins_y": tuple(range(0, 300, plan.output_size[0])),
            "origins_x": tuple(range(0, 300, plan.output_size[1])),
        }
    )
    rows = reflect_indices(-g.margin, misaligned.padded_shape[0] - g.margin, 300)
    cols = reflect_indices(-g.margin, misaligned.padded_shape[1] - g.margin, 300)
    padded = torch.from_numpy(image[:, rows][:, :, cols])
    off_grid = predict_padded(model, padded, misaligned).numpy()
    assert np.abs(off_grid - _whole_image_logits(model, image)).max() > 1e-2


def test_plan_is_shared_by_blocks():
    """A block starting at a multiple of the stride gets the whole-slide plan's tiles."""
    model = MODELS[5]
    whole = plan_tiles((5000, 5000), model.geometry, 572)
    assert whole.stride == (384, 384) and whole.output_size == (388, 388)
    block = plan_tiles((1536, 1536), model.geometry, 572)
    offset = 3 * 1536
    shifted = {y + offset for y in block.origins_y}
    assert shifted <= set(whole.origins_y) | {o for o in shifted if o >= 5000}


def test_reflect_indices_match_numpy_pad():
    a = np.arange(7)
    for pad in (0, 1, 6, 13, 40):
        expected = np.pad(a, pad, mode="reflect")
        assert np.array_equal(a[reflect_indices(-pad, 7 + pad, 7)], expected)
    assert np.array_equal(reflect_indices(-3, 4, 1), np.zeros(7, dtype=int))


def test_tensor_in_tensor_out_and_bad_shape():
    model = MODELS[3]
    out = predict_tiled(model, torch.rand(2, 50, 60), tile_size=100)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 50, 60)
    with pytest.raises(ValueError, match="C x H x W"):
        predict_tiled(model, np.zeros((50, 60), np.float32))
    with pytest.raises(ValueError, match="below the smallest valid input"):
        plan_tiles((50, 50), model.geometry, 10)


def test_default_tile_size_is_valid():
    model = MODELS[5]
    image = np.random.default_rng(3).random((2, 90, 70), dtype=np.float32)
    out = predict_tiled(model, image)
    np.testing.assert_allclose(out, _whole_image_logits(model, image), atol=1e-4)
