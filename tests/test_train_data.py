"""Training data: tile geometry, mirrored reads, tissue-weighted seeded sampling, sharding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader
from train_stores import disk_store, tiny_config, write_store

from pipelines.training.config import TrainConfig
from pipelines.training.data import (
    BlockDataset,
    Region,
    TileDataset,
    TileSampler,
    TrainingDataError,
    open_training_store,
    shard_regions,
    tile_shape,
)
from segcore import ngff
from segcore.geometry import UNetGeometry
from segcore.model import UNet
from segcore.store import STORE_FORMAT, SlideStore, StoreError
from segcore.tiling import TilePlan, plan_tiles


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return disk_store(tmp_path_factory.mktemp("data") / "a.zarr", size=96, seed=0, channels=2)


def test_tile_output_is_what_the_network_predicts():
    geometry = UNetGeometry(depth=3)
    tile = tile_shape(geometry, None, 32)
    model = UNet(1, 2, base_channels=2, depth=3)
    assert model(torch.zeros(1, 1, tile.input, tile.input)).shape[-1] == tile.output >= 32
    assert tile.margin == geometry.margin
    rounded = tile_shape(geometry, tile.input + 3, 1)
    assert rounded.input == tile.input
    with pytest.raises(TrainingDataError, match="below the smallest valid input"):
        tile_shape(geometry, 10, 1)


@pytest.mark.parametrize("origin", [(0, 0), (64, 64), (30, 5), (-10, 70)])
def test_tile_is_the_mirrored_window_around_its_output(store, origin):
    tile = tile_shape(UNetGeometry(depth=3), None, 32)
    item = TileDataset([store], tile, with_weight=True)[(0, *origin)]
    slide = SlideStore.open(store)
    m, t = tile.margin, tile.input
    pad = t + 20  # more than any overhang in these cases
    y, x = origin[0] + pad - m, origin[1] + pad - m
    image = np.pad(np.asarray(slide.image(0)[...]), ((0, 0), (pad, pad), (pad, pad)), "reflect")
    target = np.pad(np.asarray(slide.target[...]), pad, "reflect")
    weight = np.pad(np.asarray(slide.weight[...]), pad, "reflect")
    np.testing.assert_array_equal(item["image"].numpy(), image[:, y : y + t, x : x + t])
    np.testing.assert_array_equal(item["target"].numpy(), target[y : y + t, x : x + t])
    np.testing.assert_array_equal(item["weight"].numpy(), weight[y : y + t, x : x + t])
    assert item["image"].dtype == torch.uint8 and item["weight"].dtype == torch.float32


def _sampler(store: Path, rank: int = 0, seed: int = 1, background: float = 0.05) -> TileSampler:
    tile = tile_shape(UNetGeometry(depth=3), None, 32)
    info = open_training_store(store, with_weight=True)
    return TileSampler([info], tile, 64, seed=seed, rank=rank, background_weight=background)


def test_sampler_is_seeded_per_epoch_and_rank(store):
    first = list(_sampler(store))
    assert first == list(_sampler(store))
    assert len(first) == 64
    assert first != list(_sampler(store, rank=1))
    assert first != list(_sampler(store, seed=2))
    later = _sampler(store)
    later.set_epoch(1)
    assert first != list(later)
    for _, y, x in first:
        assert 0 <= y <= 96 - 32 and 0 <= x <= 96 - 32


def test_sampler_prefers_tissue(tmp_path):
    size = 128
    image = np.full((1, size, size), 100, np.uint8)
    labels = np.zeros((size, size), np.uint32)
    labels[20:30, 20:30] = 1
    tissue = np.zeros((size, size), bool)
    tissue[:, :32] = True  # tissue only in the left quarter
    path = write_store(tmp_path / "t.zarr", image, labels, tissue=tissue)
    # Output windows of 32 px centred in columns < 32 start at column <= 16.
    assert max(x for _, _, x in _sampler(path, background=0.0)) <= 16
    assert max(x for _, _, x in _sampler(path, background=1.0)) > 16


def test_worker_processes_deliver_the_same_batches(store):
    tile = tile_shape(UNetGeometry(depth=3), None, 32)
    dataset = TileDataset([store], tile, with_weight=True)

    def batches(workers: int) -> list[dict]:
        loader = DataLoader(
            dataset,
            batch_size=4,
            sampler=_sampler(store),
            num_workers=workers,
            multiprocessing_context="forkserver" if workers else None,
        )
        return list(loader)

    single, parallel = batches(0), batches(2)
    assert len(single) == len(parallel) == 16
    for a, b in zip(single, parallel, strict=True):
        for key in ("image", "target", "weight"):
            assert torch.equal(a[key], b[key])


def test_store_without_target_is_refused_naming_it(tmp_path):
    path = tmp_path / "bare.zarr"
    root = zarr.open_group(path, mode="w")
    root.attrs["segflow"] = {"store_format": STORE_FORMAT, "tissue_downsample": 8}
    root.attrs["ome"] = {"multiscales": [{"datasets": [{"path": "0"}]}]}
    ngff.create_array(root, "0", (1, 16, 16), np.uint8, (1, 16, 16))[...] = 0
    with pytest.raises(TrainingDataError, match=r"bare\.zarr: no training/target"):
        open_training_store(path, with_weight=False)


def test_regions_are_shared_round_robin_with_padding():
    regions = [Region(Path(f"{i}.zarr"), 0, 0, 8, 8) for i in range(3)]
    assert shard_regions(regions, 0, 2) == ([regions[0], regions[2]], [1, 1])
    assert shard_regions(regions, 1, 2) == ([regions[1], regions[0]], [1, 0])
    assert shard_regions(regions, 0, 1) == (regions, [1, 1, 1])


def test_validation_region_reads_real_context(store):
    geometry = UNetGeometry(depth=3)
    region = Region(store, 30, 20, 40, 50)
    dataset = BlockDataset([region], [1], geometry, tile_size=72, block_size=24)
    plan = plan_tiles((40, 50), geometry, 72)
    m = plan.margin
    slide = SlideStore.open(store)
    image = np.asarray(slide.image(0)[...])
    target = np.asarray(slide.target[30:70, 20:70])
    assert len(dataset) > 1
    for item in (dataset[i] for i in range(len(dataset))):
        (i, j), rows, cols = item["block"], item["row_edges"], item["col_edges"]
        y, x = 30 + rows[i], 20 + cols[j]
        padded = item["padded"].numpy()
        assert padded.shape[1:] == TilePlan(**item["tiles"]).padded_shape
        # Rows and columns above/left of every block come from the slide, not from mirroring.
        np.testing.assert_array_equal(padded[:, :m, :m], image[:, y - m : y, x - m : x])
        block_target = target[rows[i] : rows[i + 1], cols[j] : cols[j + 1]]
        np.testing.assert_array_equal(item["target"], block_target)
    assert (rows[-1], cols[-1]) == (40, 50)


def test_config_round_trips_through_yaml(tmp_path, store):
    from pipelines.config import dump_config, load_config

    config = TrainConfig.model_validate(tiny_config(tmp_path, [store], [store]))
    dump_config(config, tmp_path / "c.yaml")
    again = load_config(
        TrainConfig, tmp_path / "c.yaml", ["optimizer.lr=0.5", "augment.flips=false"]
    )
    assert again.optimizer.lr == 0.5 and not again.augment.flips
    assert again.model_copy(update={"optimizer": config.optimizer, "augment": config.augment}) == (
        config
    )


def test_cached_tiles_equal_uncached_tiles_and_the_cache_stays_in_budget(tmp_path):
    # 96 px slide in 64 px chunks: tiles cross chunk faces and the slide's mirrored edges, and
    # the budget holds half of the 4 chunk positions' image + target + weight, so chunks go.
    path = disk_store(tmp_path / "c.zarr", size=96, seed=3, channels=2)
    tile = tile_shape(UNetGeometry(depth=3), None, 32)
    plain = TileDataset([path], tile, with_weight=True)
    chunk_bytes = 64 * 64 * (2 + 1 + 4)  # image (2 channels, uint8), target, weight (float32)
    cached = TileDataset([path], tile, with_weight=True, cache_bytes=2 * chunk_bytes)
    rng = np.random.default_rng(0)
    for y, x in rng.integers(-10, 90, size=(40, 2)):
        want, got = plain[(0, int(y), int(x))], cached[(0, int(y), int(x))]
        for key in ("image", "target", "weight"):
            np.testing.assert_array_equal(got[key].numpy(), want[key].numpy())
        assert 0 < cached.stores.cache.size <= 2 * chunk_bytes


def test_a_corrupt_chunk_is_named_through_the_cache(tmp_path):
    path = disk_store(tmp_path / "d.zarr", size=96, seed=4, channels=1)
    chunk = path / "training" / "weight" / "c" / "0" / "0"
    assert chunk.is_file()
    chunk.write_bytes(b"\x00" * 16)
    tile = tile_shape(UNetGeometry(depth=3), None, 32)
    dataset = TileDataset([path], tile, with_weight=True, cache_bytes=2**20)
    with pytest.raises(StoreError, match="chunk"):
        dataset[(0, 0, 0)]
    with pytest.raises(StoreError, match="chunk"):  # not kept as zeros after the failure
        dataset[(0, 0, 0)]
