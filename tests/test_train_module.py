"""Normalisation folding, loss switching and device-side augmentation in the training module."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from train_stores import disk_store

from pipelines.training.data import TileDataset, TileSampler, open_training_store, tile_shape
from pipelines.training.module import UNetModule
from pipelines.training.normalization import RawInputUNet, estimate_normalization
from segcore.geometry import UNetGeometry
from segcore.model import UNet, center_crop
from segcore.normalization import InputNormalizer, Normalization, fold_normalization

# Calling training_step outside a Trainer: its self.log() has nowhere to go, by design here.
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")

NORM = Normalization(mean=[0.2, 0.5, 0.7], std=[0.1, 0.3, 0.05])


@pytest.mark.parametrize("batch_norm", [False, True])
def test_folded_model_on_raw_pixels_equals_model_on_normalised_input(batch_norm):
    torch.manual_seed(0)
    model = UNet(3, 2, base_channels=4, depth=3, batch_norm=batch_norm, dropout=0.0)
    if batch_norm:  # non-trivial running statistics
        model.train()
        model(torch.rand(2, 3, 60, 60) * 4)
    model.eval()
    raw = torch.randint(0, 256, (2, 3, 60, 60)).float()
    expected = RawInputUNet(model, InputNormalizer(NORM))(raw)
    folded = fold_normalization(model, NORM).eval()
    torch.testing.assert_close(folded(raw), expected, rtol=1e-4, atol=1e-4)
    # The original model is left as it was.
    assert not torch.equal(folded.down[0][0].weight, model.down[0][0].weight)


def test_estimated_normalization_is_the_tiles_statistics(tmp_path):
    store = disk_store(tmp_path / "a.zarr", size=80, seed=4, channels=2)
    tile = tile_shape(UNetGeometry(depth=3), None, 32)
    dataset = TileDataset([store], tile, with_weight=False)
    sampler = TileSampler([open_training_store(store, False)], tile, 5, seed=0)
    positions = list(sampler)
    stats = estimate_normalization(dataset, positions)
    pixels = np.stack([dataset[p]["image"].numpy() for p in positions]) / 255.0
    np.testing.assert_allclose(stats.mean, pixels.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(stats.std, pixels.std(axis=(0, 2, 3)), rtol=1e-6)


def _module(loss: str, augment: dict | None) -> UNetModule:
    unet = {"in_channels": 1, "n_classes": 2, "base_channels": 4, "depth": 3, "dropout": 0.0}
    return UNetModule(
        unet, {"mean": [0.4], "std": [0.2]}, tile_output=32, loss=loss, augment=augment
    )


def _batch(tile_input: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shape = (2, tile_input, tile_input)
    return {
        "image": torch.randint(0, 256, (2, 1, tile_input, tile_input), generator=g).to(torch.uint8),
        "target": torch.randint(0, 2, shape, generator=g).to(torch.uint8),
        "weight": torch.rand(shape, generator=g) * 5 + 1,
    }


@pytest.mark.parametrize("loss", ["weighted_ce", "ce", "weighted_ce+dice"])
def test_each_loss_trains(loss):
    module = _module(loss, augment={"elastic": True, "gray_jitter": 0.1})
    batch = _batch(tile_shape(module.model.geometry, None, 32).input)
    value = module.training_step(batch, 0)
    value.backward()
    assert value.ndim == 0 and torch.isfinite(value)
    assert all(p.grad is not None for p in module.model.parameters())


def test_losses_differ_as_configured():
    batch = _batch(tile_shape(UNetGeometry(depth=3), None, 32).input)
    values = {}
    for loss in ("weighted_ce", "ce", "weighted_ce+dice"):
        torch.manual_seed(0)
        values[loss] = _module(loss, augment=None).training_step(batch, 0).item()
    # Weights are >= 1, so weighting raises the loss; Dice adds a positive term.
    assert values["weighted_ce"] > values["ce"]
    assert values["weighted_ce+dice"] > values["weighted_ce"]


def test_augmentation_is_seeded_by_step_and_changes_the_batch():
    batch = _batch(tile_shape(UNetGeometry(depth=3), None, 32).input)
    image = batch["image"].float() / 255
    target, weight = batch["target"].long(), batch["weight"]
    module = _module("weighted_ce", augment={})
    once = module._augment(image, target, weight)
    again = module._augment(image, target, weight)
    for a, b in zip(once, again, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(once[0], image)


def test_center_crop():
    x = torch.arange(36).view(6, 6)
    assert center_crop(x, 2).tolist() == [[14, 15], [20, 21]]
