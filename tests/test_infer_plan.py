"""Block planning: every block runs exactly the whole-slide tiles it owns, on whole chunks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.inference.plan import block_side, plan_slide
from segcore.geometry import UNetGeometry
from segcore.model import UNet
from segcore.tiling import plan_tiles, predict_padded, predict_tiled


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    depth=st.sampled_from([3, 4, 5]),
    h=st.integers(1, 3000),
    w=st.integers(1, 3000),
    tile=st.integers(100, 700),
    block=st.one_of(st.none(), st.integers(1, 1500)),
)
def test_blocks_own_whole_chunks_and_the_whole_slide_tiles(depth, h, w, tile, block):
    geometry = UNetGeometry(depth)
    tile = max(tile, geometry.valid_input_size(1))
    plan = plan_slide((h, w), geometry, tile, block)
    whole = plan_tiles((h, w), geometry, tile)
    assert plan.tiles == whole
    covered = np.zeros((h, w), np.int32)
    origins = set()
    for b in plan.blocks:
        covered[b.region] += 1
        # Whole chunks only: a block starts on the chunk grid and ends on it or at the edge.
        side = plan.chunk_side
        assert b.y0 % side == 0 and b.x0 % side == 0
        assert b.y1 == h or b.y1 % side == 0
        assert b.x1 == w or b.x1 % side == 0
        assert b.tiles.tile_size == whole.tile_size and b.tiles.stride == whole.stride
        origins |= {(b.y0 + y, b.x0 + x) for y, x in b.tiles.origins}
        # Its tiles cover it: the last one reaches its end.
        assert b.tiles.origins_y[-1] + b.tiles.output_size[0] >= b.y1 - b.y0
        assert b.tiles.origins_x[-1] + b.tiles.output_size[1] >= b.x1 - b.x0
    assert (covered == 1).all()
    assert origins == set(whole.origins)


def test_block_side_is_a_stride_multiple():
    assert block_side(384, None) == 1920
    assert block_side(2048, None) == 2048
    assert block_side(384, 1000) == 768
    assert block_side(384, 10) == 384


def test_sliver_at_the_slide_end_joins_the_block_before():
    """3844 rows, stride 384, output 388: rows 3840..3843 come from the tile at 3456."""
    geometry = UNetGeometry(5)
    plan = plan_slide((3844, 500), geometry, 572, 1920)
    assert [(b.y0, b.y1) for b in plan.blocks if b.x0 == 0] == [(0, 1920), (1920, 3844)]
    assert plan.chunk_side == 1920


@pytest.mark.parametrize("shape", [(190, 230), (61, 45), (157, 129), (30, 300)])
def test_blocks_reproduce_predict_tiled_bitwise(shape):
    """Blocks computed alone and pasted together equal the whole-slide prediction exactly."""
    torch.manual_seed(0)
    model = UNet(2, 3, base_channels=4, depth=3, dropout=0.0)
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d):
            torch.nn.init.normal_(m.bias, std=0.2)
    model.eval()
    image = np.random.default_rng(1).random((2, *shape), dtype=np.float32)
    reference = predict_tiled(model, image, tile_size=68, batch_size=3)
    plan = plan_slide(shape, model.geometry, 68, 50)
    assert len(plan.blocks) > 1 or shape == (61, 45)
    out = np.full_like(reference, np.nan)
    for b in plan.blocks:
        rows, cols = b.input_indices(shape)
        padded = torch.from_numpy(image[:, rows][:, :, cols])
        out[:, b.y0 : b.y1, b.x0 : b.x1] = predict_padded(model, padded, b.tiles, 3).numpy()
    np.testing.assert_array_equal(out, reference)
