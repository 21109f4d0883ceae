"""Validation block by block: whole-slide scores from blocks, in bounded state, through Lightning.

The oracle is independent of the streamed path: the whole slide predicted in one call of
`segcore.tiling.predict_tiled` and scored with `segcore.metrics.segmentation_scores`.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from scipy import ndimage
from train_stores import disk_store

from pipelines.training.data import BlockDataset, Region, validation_loader
from pipelines.training.module import VAL_METRICS, Thumbnail, UNetModule
from pipelines.training.normalization import RawInputUNet
from segcore.block_scores import SlideScores
from segcore.geometry import UNetGeometry
from segcore.metrics import MetricInputError, segmentation_scores
from segcore.store import SlideStore
from segcore.tiling import plan_tiles, predict_padded, predict_tiled

TILE = 60  # depth-3 U-Net: 60 px in, 20 px out, tiles step by 20


def _maps(rng: np.random.Generator, h: int, w: int, density: float) -> np.ndarray:
    """Blobby 0/1 maps: 4-connected segments of many sizes, some crossing any block edge."""
    return (ndimage.uniform_filter(rng.random((h, w)), 3) < density).astype(np.uint8)


def _edges(rng: np.random.Generator, extent: int) -> list[int]:
    """0, up to three random inner edges, `extent`."""
    inner = rng.integers(1, extent, 3) if extent > 1 else []
    return sorted({0, extent, *(int(e) for e in inner)})


def _add_blocks(scores: SlideScores, target, prediction, order) -> None:
    rows, cols = scores.row_edges, scores.col_edges
    for i, j in order:
        ys, xs = slice(rows[i], rows[i + 1]), slice(cols[j], cols[j + 1])
        scores.add(i, j, target[ys, xs], prediction[ys, xs])


def test_docstring_example_two_blocks():
    scores = SlideScores((0, 1), (0, 2, 4))
    _add_blocks(scores, np.array([[1, 1, 1, 0]]), np.array([[1, 0, 1, 1]]), [(0, 1), (0, 0)])
    assert scores.result() == segmentation_scores(
        np.array([[1, 1, 1, 0]]), np.array([[1, 0, 1, 1]])
    )
    assert scores.result()["rand_error"] == 1.0


@pytest.mark.parametrize("shuffled", [False, True])
def test_block_sums_equal_whole_slide_scores(shuffled):
    rng = np.random.default_rng(7)
    for _ in range(40):
        h, w = (int(n) for n in rng.integers(1, 70, 2))
        target, prediction = _maps(rng, h, w, rng.random()), _maps(rng, h, w, rng.random())
        rows = _edges(rng, h)
        cols = _edges(rng, w)
        scores = SlideScores(rows, cols)
        order = list(itertools.product(range(len(rows) - 1), range(len(cols) - 1)))
        if shuffled:
            rng.shuffle(order)
        _add_blocks(scores, target, prediction, order)
        expected = segmentation_scores(target, prediction)
        got = scores.result()
        # Exact: the same integer counts go into the same ratios (NaN where a ratio is 0/0).
        assert got.keys() == expected.keys()
        for name in expected:
            assert got[name] == expected[name] or np.isnan(got[name]) and np.isnan(expected[name])
        assert scores.open_state == 0


@pytest.mark.parametrize("predict_all", [True, False])
def test_state_does_not_grow_with_the_slide(predict_all):
    """Raster order keeps one row of block edges: 8x the rows, the same peak state, though
    the slide holds 8x the cells (a prediction that is one big segment included)."""
    rng = np.random.default_rng(3)
    side, cols = 32, 4

    def peak(rows: int) -> tuple[int, int]:
        h, w = rows * side, cols * side
        target = _maps(rng, h, w, 0.45)
        prediction = np.ones_like(target) if predict_all else _maps(rng, h, w, 0.45)
        scores = SlideScores(range(0, h + 1, side), range(0, w + 1, side))
        most = 0
        for i, j in itertools.product(range(rows), range(cols)):
            _add_blocks(scores, target, prediction, [(i, j)])
            most = max(most, scores.open_state)
        return most, ndimage.label(target)[1]

    small, _ = peak(2)
    large, cells = peak(16)
    assert large < 1.5 * small
    assert large < cells / 2


def test_incomplete_or_repeated_blocks_are_refused():
    scores = SlideScores((0, 4, 8), (0, 8))
    block = np.zeros((4, 8), np.uint8)
    scores.add(0, 0, block, block)
    with pytest.raises(MetricInputError, match="1 block"):
        scores.result()
    with pytest.raises(MetricInputError, match="added twice"):
        scores.add(0, 0, block, block)
    with pytest.raises(MetricInputError, match=r"block \(1, 0\) is \(4, 8\)"):
        scores.add(1, 0, np.zeros((3, 8)), np.zeros((3, 8)))


def test_thumbnail_equals_the_strided_whole():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (2, 45, 70), dtype=np.uint8)
    labels = rng.integers(0, 2, (45, 70), dtype=np.uint8)
    thumb = Thumbnail((45, 70), channels=2, side=16)
    for y0, y1, x0, x1 in [(0, 32, 0, 48), (0, 32, 48, 70), (32, 45, 0, 48), (32, 45, 48, 70)]:
        thumb.add(y0, x0, image[:, y0:y1, x0:x1], labels[y0:y1, x0:x1], 1 - labels[y0:y1, x0:x1])
    sample = thumb.sample()
    assert thumb.step == 5 and sample.target.shape == (9, 14)
    np.testing.assert_array_equal(sample.image, image[:, ::5, ::5])
    np.testing.assert_array_equal(sample.target, labels[::5, ::5])
    np.testing.assert_array_equal(sample.prediction, 1 - labels[::5, ::5])


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    return disk_store(tmp_path_factory.mktemp("val") / "held.zarr", size=230, seed=5, channels=2)


def _module() -> UNetModule:
    """An untrained U-Net (seeded), as validation sees it before the first step."""
    torch.manual_seed(0)
    unet = {"in_channels": 2, "n_classes": 2, "base_channels": 4, "depth": 3, "dropout": 0.0}
    return UNetModule(unet, {"mean": [0.45, 0.45], "std": [0.2, 0.2]}, tile_output=20)


def _validate(module: UNetModule, region: Region, block_size: int) -> dict[str, float]:
    """The epoch's logged scores of Lightning validating `region` block by block."""
    loader = validation_loader([region], 0, 1, module.model.geometry, TILE, block_size)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    (logged,) = trainer.validate(module, dataloaders=loader, verbose=False)
    return {name: logged[f"val_{name}"] for name in VAL_METRICS}


def _whole_region_logits(net: torch.nn.Module, store: SlideStore, region: Region) -> np.ndarray:
    """The region predicted in one piece: its input read with real context around it and
    mirrored only beyond the slide's edges, tiles anchored at the region's origin."""
    image = np.asarray(store.image(0)[...])
    plan = plan_tiles((region.height, region.width), net.geometry, TILE)
    ph, pw = plan.padded_shape
    big = np.pad(image, ((0, 0), (ph, ph), (pw, pw)), mode="reflect")
    y, x = region.y - plan.margin + ph, region.x - plan.margin + pw
    padded = torch.from_numpy(np.ascontiguousarray(big[:, y : y + ph, x : x + pw]))
    return predict_padded(net, padded, plan).argmax(0).numpy()


@pytest.mark.parametrize(
    ("window", "n_blocks"),
    [((0, 0, 230, 230), 4 * 4), ((37, 21, 150, 190), 3 * 4)],
    ids=["whole slide", "region with real context"],
)
def test_streamed_validation_equals_whole_prediction(slide, window, n_blocks):
    """Lightning's epoch scores over ragged blocks equal the scores of one whole prediction.

    Blocks of 64 px requested are 60 px (a multiple of the 20 px tile stride); 230, 150 and
    190 px are no multiples of 60, so the last block of each axis is cut short."""
    region = Region(slide, *window)
    module = _module()
    blocks = BlockDataset([region], [1], module.model.geometry, TILE, block_size=64)
    assert len(blocks) == n_blocks
    streamed = _validate(module, region, block_size=64)

    store = SlideStore.open(slide)
    net = RawInputUNet(module.model, module.normalizer).eval()
    y, x, h, w = window
    if (h, w) == (230, 230):  # a whole slide: segcore's own overlap-tile prediction of it
        image = torch.from_numpy(np.asarray(store.image(0)[...]))
        prediction = predict_tiled(net, image, tile_size=TILE).argmax(0).numpy()
    else:
        prediction = _whole_region_logits(net, store, region)
    target = np.asarray(store.target[y : y + h, x : x + w])
    expected = segmentation_scores(target, prediction)
    assert 0 < expected["iou"] < 1 and 0 < expected["rand_error"] < 1
    # Lightning logs float32; one px predicted otherwise would move IoU by ~1e-4.
    assert streamed == pytest.approx(expected, rel=1e-6)
    # The overlay comes from the thumbnail, block by block: here the whole (small) region.
    np.testing.assert_array_equal(module.overlay.target, target)
    np.testing.assert_array_equal(module.overlay.prediction, prediction)


def test_padding_copies_read_and_score_nothing(slide):
    region = Region(slide, 0, 0, 230, 230)
    dataset = BlockDataset([region, region], [1, 0], UNetGeometry(depth=3), TILE, block_size=64)
    assert len(dataset) == 16 + 1
    assert dataset[16] == {"index": 1, "count": 0}
