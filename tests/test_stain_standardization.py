"""Per-slide stain standardisation: the map itself, a slide's moments, and a model trained with
it segmenting through inference exactly as it validated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader
from train_stores import synthetic_store, tiny_config, write_store

from pipelines.cluster import ClusterConfig
from pipelines.infer import InferConfig, infer_archive
from pipelines.inference.source import resolve_model
from pipelines.models import load_model
from pipelines.train import TrainConfig, train
from pipelines.training.data import (
    SlideTileDataModule,
    TileDataset,
    TrainingDataError,
    tile_shape,
)
from segcore import ngff
from segcore.geometry import UNetGeometry
from segcore.metrics import segmentation_scores
from segcore.stain import hed_to_rgb, rgb_to_hed, stain_statistics
from segcore.stain_standardization import (
    MAX_SAMPLE_CHUNKS,
    StainInputError,
    StainMoments,
    StainStandardization,
    reference_moments,
    slide_stain_moments,
)
from segcore.store import SlideStore
from segcore.synthetic import SlideSpec, render_region
from segcore.tiling import predict_tiled

REFERENCE = StainMoments(0.53, 0.47, 0.33, 0.14, 0.47, 0.18)


def he_image(seed: int, shape: tuple[int, int] = (120, 150)) -> np.ndarray:
    """Random H, E and D concentrations mixed into RGB: every colour an H&E slide can hold."""
    rng = np.random.default_rng(seed)
    hed = rng.gamma(2.0, 0.3, (3, *shape)) * np.array([1.0, 0.6, 0.4])[:, None, None]
    rgb = hed_to_rgb(torch.from_numpy(hed))
    return (rgb * 255).round().to(torch.uint8).numpy()


def float_reference(image: np.ndarray, slide: StainMoments, reference: StainMoments):
    """The same map in float64 torch: HED, per-stain affine, back to RGB, rounded."""
    hed = rgb_to_hed(torch.from_numpy(image).double() / 255)
    scale = torch.from_numpy(reference.stds / slide.stds)[:, None, None]
    hed = (hed - torch.from_numpy(slide.means)[:, None, None]) * scale
    hed += torch.from_numpy(reference.means)[:, None, None]
    return (hed_to_rgb(hed) * 255).round().to(torch.uint8).numpy()


def test_the_map_equals_its_float_definition_and_moves_moments_to_the_reference():
    image = he_image(0)
    slide = StainMoments.from_dict(stain_statistics([image]))
    standardize = StainStandardization(slide, REFERENCE)
    out = standardize(image)
    np.testing.assert_array_equal(out, float_reference(image, slide, REFERENCE))
    moved = StainMoments.from_dict(stain_statistics([out]))
    # Within what uint8 rounding and the clip to [0, 1] leave.
    np.testing.assert_allclose(moved.means, REFERENCE.means, atol=0.03)
    np.testing.assert_allclose(moved.stds, REFERENCE.stds, rtol=0.1)
    assert np.abs(slide.means - REFERENCE.means).max() > 0.1  # the map had work to do
    # To its own moments, a slide is unchanged.
    np.testing.assert_array_equal(StainStandardization(slide, slide)(image), image)


def test_the_map_is_per_pixel_so_any_window_maps_to_the_same_window():
    image = he_image(1)
    standardize = StainStandardization(StainMoments.from_dict(stain_statistics([image])), REFERENCE)
    whole = standardize(image)
    rng = np.random.default_rng(0)
    for _ in range(10):
        y0, x0 = rng.integers(0, 100, 2)
        h, w = rng.integers(1, 40, 2)
        window = np.ascontiguousarray(image[:, y0 : y0 + h, x0 : x0 + w])
        np.testing.assert_array_equal(standardize(window), whole[:, y0 : y0 + h, x0 : x0 + w])


def test_moments_are_checked():
    with pytest.raises(StainInputError, match="positive"):
        StainMoments(0.5, 0.0, 0.3, 0.1, 0.4, 0.2)
    with pytest.raises(StainInputError, match="finite"):
        StainMoments.from_dict({**REFERENCE.to_dict(), "e_mean": float("nan")})
    assert reference_moments([REFERENCE, REFERENCE]) == REFERENCE
    with pytest.raises(StainInputError, match="uint8 RGB"):
        StainStandardization(REFERENCE, REFERENCE)(np.zeros((1, 4, 4), np.uint8))


def _array(path: Path, image: np.ndarray, chunk: int) -> zarr.Array:
    root = zarr.open_group(path, mode="w")
    array = ngff.create_array(root, "0", image.shape, image.dtype, (image.shape[0], chunk, chunk))
    array[...] = image
    return array


def test_slide_moments_read_the_whole_small_slide_and_a_bounded_sample_of_a_large_one(tmp_path):
    image = he_image(2, (100, 130))
    small = _array(tmp_path / "small.zarr", image, chunk=32)  # 4 x 5 chunks: all read
    whole = StainMoments.from_dict(stain_statistics([image]))
    np.testing.assert_allclose(  # merged chunk by chunk: equal but for the summation order
        list(slide_stain_moments(small).to_dict().values()),
        list(whole.to_dict().values()),
        rtol=1e-12,
    )
    large = _array(tmp_path / "large.zarr", he_image(3, (300, 300)), chunk=16)  # 361 chunks
    reads = []
    original = large.__class__.__getitem__

    class Counting(large.__class__):
        def __getitem__(self, selection):
            reads.append(selection)
            return original(self, selection)

    large.__class__ = Counting
    slide_stain_moments(large)
    assert len(reads) == MAX_SAMPLE_CHUNKS
    rows = {s[1].start for s in reads}
    assert min(rows) == 0 and max(rows) == 288  # spread over the slide, first to last chunk


def test_a_slide_without_tissue_or_colour_is_refused(tmp_path):
    glass = _array(tmp_path / "glass.zarr", np.full((3, 40, 40), 250, np.uint8), chunk=16)
    with pytest.raises(StainInputError, match="no tissue"):
        slide_stain_moments(glass)
    grey = _array(tmp_path / "grey.zarr", np.full((1, 40, 40), 90, np.uint8), chunk=16)
    with pytest.raises(StainInputError, match="RGB"):
        slide_stain_moments(grey)


def pale_store(path: Path, size: int, seed: int) -> Path:
    """A synthetic H&E store with its haematoxylin halved, as a paler stain would leave it."""
    image, labels = render_region(SlideSpec(size, size, seed), 0, 0, size, size)
    hed = rgb_to_hed(torch.from_numpy(image.transpose(2, 0, 1).copy()).double() / 255)
    hed[0] *= 0.5
    pale = (hed_to_rgb(hed) * 255).round().to(torch.uint8).numpy()
    return write_store(path, pale, labels)


def test_training_tiles_are_standardised_per_store(tmp_path):
    stores = [synthetic_store(tmp_path / f"{i}.zarr", size=96, seed=i) for i in range(2)]
    stores.append(pale_store(tmp_path / "pale.zarr", size=96, seed=0))  # the first, paler
    config = TrainConfig.model_validate(
        tiny_config(tmp_path, stores, [stores[1]], stain_standardization=True)
    )
    geometry = UNetGeometry(depth=3)
    datamodule = SlideTileDataModule(config, geometry, tile_shape(geometry, None, 32))
    moments = [slide_stain_moments(SlideStore.open(p).image(0)) for p in stores]
    assert datamodule.stain_reference == reference_moments(moments)
    assert datamodule.regions[0].stain == StainStandardization(
        moments[1], reference_moments(moments)
    )
    raw = TileDataset(stores, datamodule.tile, with_weight=False)
    dataset = datamodule.dataset()
    for s in range(3):
        tile = dataset[(s, 20, 30)]["image"].numpy()
        np.testing.assert_array_equal(tile, datamodule.stains[s](raw[(s, 20, 30)]["image"].numpy()))
    # Standardised, the pale copy is close to its original again; raw, it is not.
    original, copy = dataset[(0, 20, 30)]["image"].numpy(), dataset[(2, 20, 30)]["image"].numpy()
    raw_gap = np.abs(
        raw[(0, 20, 30)]["image"].numpy().astype(int) - raw[(2, 20, 30)]["image"].numpy()
    )
    assert np.abs(original.astype(int) - copy).mean() < raw_gap.mean() / 3


def test_a_store_without_tissue_is_named(tmp_path):
    glass = np.full((3, 96, 96), 250, np.uint8)
    store = write_store(tmp_path / "glass.zarr", glass, np.zeros((96, 96), np.uint32))
    good = synthetic_store(tmp_path / "good.zarr", size=96, seed=0)
    config = TrainConfig.model_validate(
        tiny_config(tmp_path, [good, store], [], stain_standardization=True)
    )
    geometry = UNetGeometry(depth=3)
    with pytest.raises(TrainingDataError, match="glass.zarr.*no tissue"):
        SlideTileDataModule(config, geometry, tile_shape(geometry, None, 32))


def test_a_standardising_model_segments_through_inference_as_it_validated(tmp_path):
    """Training standardises tiles and validation blocks; inference must standardise each
    slide to the recorded reference the same way, or its IoU would not be validation's."""
    train_store = synthetic_store(tmp_path / "train.zarr", size=128, seed=0)
    val_store = pale_store(tmp_path / "val.zarr", size=96, seed=1)  # stained unlike training
    config = TrainConfig.model_validate(
        tiny_config(tmp_path, [train_store], [val_store], stain_standardization=True)
    )
    result = train(config)
    uri = config.resolved_tracking_uri
    model = f"models:/{config.registered_model_name}@champion"
    infer = InferConfig(
        output_dir=tmp_path / "out",
        progress=False,
        tracking_uri=uri,
        tile_size=72,
        block_size=48,  # several blocks: standardised reads meet at their borders
        probabilities="float16",
        cluster=ClusterConfig(n_workers=1, threads_per_worker=2, processes=False),
    )
    (inferred,) = infer_archive([val_store], model, infer)
    assert inferred.status == "written", inferred.error
    classes = zarr.open_group(tmp_path / "out" / "val.zarr", mode="r")["labels/segmentation/0"]
    target = np.asarray(SlideStore.open(val_store).target[...])
    scores = segmentation_scores(target, np.asarray(classes[...]))
    assert scores["iou"] == pytest.approx(result.metrics["best_val_iou"], abs=1e-6)
    # The registered model carries its reference: the one training store's own moments.
    recorded = StainMoments.from_dict(resolve_model(model, uri).config["stain_reference"])
    assert recorded == slide_stain_moments(SlideStore.open(train_store).image(0))
    # Block by block, inference is one whole-slide pass over the standardised slide.
    image = np.asarray(SlideStore.open(val_store).image(0)[...])
    net = load_model(model, tracking_uri=uri)
    standardized = StainStandardization(
        slide_stain_moments(SlideStore.open(val_store).image(0)), recorded
    )
    expected = torch.softmax(
        torch.from_numpy(predict_tiled(net, standardized(image), tile_size=72)), 0
    )
    np.testing.assert_array_equal(classes[...], expected.argmax(0))
    written = zarr.open_array(tmp_path / "out" / "val.zarr" / "probabilities" / "0", mode="r")
    probabilities = np.asarray(written[...], np.float32)
    np.testing.assert_allclose(probabilities, expected.numpy(), atol=1e-3)
    record = zarr.open_group(tmp_path / "out" / "val.zarr" / "labels" / "segmentation").attrs
    assert (
        record["segflow"]["stain_moments"]
        == slide_stain_moments(SlideStore.open(val_store).image(0)).to_dict()
    )
    raw = torch.softmax(torch.from_numpy(predict_tiled(net, image, tile_size=72)), 0)
    assert np.abs(raw.numpy() - probabilities).mean() > 0.01  # unstandardised: other outputs


def test_loader_worker_processes_standardise_alike(tmp_path):
    """The maps travel to forkserver workers (pickled) and give the in-process tiles."""
    store = pale_store(tmp_path / "p.zarr", size=96, seed=2)
    moments = slide_stain_moments(SlideStore.open(store).image(0))
    tile = tile_shape(UNetGeometry(depth=3), None, 32)
    stains = [StainStandardization(moments, REFERENCE)]
    dataset = TileDataset([store], tile, with_weight=False, cache_bytes=2**20, stains=stains)
    positions = [(0, y, x) for y in (-10, 20, 64) for x in (0, 33, 70)]

    def images(workers: int) -> list[torch.Tensor]:
        loader = DataLoader(
            dataset,
            batch_size=3,
            sampler=positions,
            num_workers=workers,
            multiprocessing_context="forkserver" if workers else None,
        )
        return [batch["image"] for batch in loader]

    single, parallel = images(0), images(2)
    assert len(single) == 3
    for a, b in zip(single, parallel, strict=True):
        assert torch.equal(a, b)
    raw = TileDataset([store], tile, with_weight=False)[positions[0]]["image"].numpy()
    np.testing.assert_array_equal(single[0][0].numpy(), stains[0](raw))
