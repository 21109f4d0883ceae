"""Every store segflow writes is OME-NGFF 0.5 by an independent validator, ome-zarr-models (not
our reader): after ingest and after inference, for a multi-level synthetic slide and the real
3-level CMU-1 SVS (when ../shared/data holds it), with labels in the slide store and in an
output store elsewhere.

An output store elsewhere (`InferConfig.output_dir`) holds only labels: NGFF has no image group
whose pixels live in another store, so its root is a plain Zarr group, and what is NGFF there is
its `labels` group, each label linked to the slide's image by a relative `source` path."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from geojson_pydantic import FeatureCollection
from ome_zarr.io import parse_url
from ome_zarr.reader import Multiscales, Reader
from ome_zarr_models.v05 import Image, Labels

from pipelines.cluster import ClusterConfig, dask_client
from pipelines.export.outline import shoelace
from pipelines.infer import InferConfig, infer_slide
from pipelines.ingest import IngestConfig, ingest_slide
from pipelines.sources import SlideSource
from segcore import ngff
from segcore.store import SlideStore
from segcore.synthetic import write_synthetic_slide
from segcore.tissue import TissueConfig

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CMU1 = DATA / "wsi_cmu1_small" / "CMU-1-Small-Region.svs"
THREADS = ClusterConfig(n_workers=1, threads_per_worker=2, processes=False)
#: 256 x 384 px in 128 px chunks: 3 levels; a tissue mask at 1/2, so the label's level 1
#: repeats its level 0 and level 2 halves it.
SYNTHETIC = IngestConfig(chunk_size=128, min_level_size=64, tissue=TissueConfig(max_size=192))


@pytest.fixture(scope="module")
def client():
    with dask_client(THREADS) as c:
        yield c


def infer_config(**overrides) -> InferConfig:
    settings = {"tile_size": 92, "batch_size": 4, "block_size": 256, "cluster": THREADS}
    return InferConfig(progress=False, **(settings | overrides))


def validated_image(path: Path) -> Image:
    """The image group at `path` as ome-zarr-models reads it (raises when it is not NGFF 0.5):
    its multiscales, and every label listed with as many levels as the image."""
    return Image.from_zarr(zarr.open_group(path, mode="r"))


def n_levels(image: Image) -> int:
    (multiscale,) = image.ome_attributes.multiscales
    return len(multiscale.datasets)


def label_levels(store: Path, name: str) -> list[np.ndarray]:
    group = zarr.open_group(store / "labels" / name, mode="r")
    paths = [d["path"] for d in group.attrs["ome"]["multiscales"][0]["datasets"]]
    return [np.asarray(group[p][...]) for p in paths]


def assert_tissue_follows_the_image(store: Path) -> None:
    """Level 0 of labels/tissue is the mask at 1/tissue_downsample (what readers use); a level
    keeps the mask's grid where the image level is finer, else it lies on the image level's
    grid, the mask downsampled; each level's scale says which."""
    slide = SlideStore.open(store)
    d = slide.tissue_downsample
    factors = ngff.label_factors(slide.n_levels, d)
    image_shapes = [slide.image(k).shape[1:] for k in range(slide.n_levels)]
    levels = label_levels(store, "tissue")
    np.testing.assert_array_equal(levels[0], slide.tissue[...])
    assert levels[0].shape == tuple(-(-n // d) for n in image_shapes[0])
    expected = levels[0]
    for k, (level, factor) in enumerate(zip(levels, factors, strict=True)):
        if k and factor != factors[k - 1]:
            expected = ngff.downsample2(expected, "nearest")
        np.testing.assert_array_equal(level, expected)
        if factor == 1 << k:
            assert level.shape == image_shapes[k]
    tissue = zarr.open_group(store / "labels" / "tissue", mode="r").attrs["ome"]
    scales = [
        t["coordinateTransformations"][0]["scale"] for t in tissue["multiscales"][0]["datasets"]
    ]
    mpp = slide.metadata["mpp"] or 1.0
    assert scales == [pytest.approx([mpp * f] * 2) for f in factors]
    assert tissue["image-label"]["source"] == {"image": "../../"}
    assert tissue["image-label"]["properties"] == [{"label-value": 1, "class": "tissue"}]


def assert_outputs_valid(image_store: Path, output: Path, probabilities: bool) -> None:
    """The inference outputs in `output` (the slide store itself, or one elsewhere)."""
    image = validated_image(image_store)
    if output == image_store:
        assert {"segmentation", "instances", "tissue"} <= set(image.labels.label_paths)
    else:
        with pytest.raises(ValueError, match="does not contain an 'ome' key"):
            validated_image(output)  # the decision above: a labels-only store is no image
        labels = Labels.from_zarr(zarr.open_group(output / "labels", mode="r"))
        assert labels.label_paths == ["segmentation", "instances"]
        for name in labels.label_paths:
            label = labels.get_image_labels_group(name)
            assert len(label.ome_attributes.multiscales[0].datasets) == n_levels(image)
            source = label.ome_attributes.image_label.source.image
            assert (output / "labels" / name / source).resolve() == image_store.resolve()
            # ome-zarr's own reader, opening the label, finds its image through that link.
            nodes = list(Reader(parse_url(str(output / "labels" / name)))())
            assert os.path.samefile(nodes[0].zarr.path, image_store)
            assert nodes[0].load(Multiscales) is not None
    if probabilities:
        assert n_levels(validated_image(output / "probabilities")) == 1


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory, client) -> Path:
    folder = tmp_path_factory.mktemp("synthetic")
    slide = write_synthetic_slide(
        folder / "s.tif", folder / "s_labels.tif", 256, 384, seed=4, tile=128
    )
    source = SlideSource(image=slide.image_path, labels=slide.labels_path)
    return ingest_slide(source, folder / "stores", SYNTHETIC, client).store


def test_ingested_multilevel_store_is_valid_ngff(synthetic_store):
    image = validated_image(synthetic_store)
    assert n_levels(image) == 3 and SlideStore.open(synthetic_store).tissue_downsample == 2
    assert image.labels.label_paths == ["annotations", "tissue"]
    assert_tissue_follows_the_image(synthetic_store)


@pytest.mark.parametrize("elsewhere", [False, True], ids=["in-store", "output-dir"])
def test_inference_outputs_are_valid_ngff(
    synthetic_store, untrained_rgb_unet, client, tmp_path, elsewhere
):
    config = infer_config(
        probabilities="uint8",
        output_dir=tmp_path / "outputs" if elsewhere else None,
    )
    store = Path(shutil.copytree(synthetic_store, tmp_path / "s.zarr"))
    result = infer_slide(store, untrained_rgb_unet, config, client)
    assert_outputs_valid(store, result.output, probabilities=True)


def test_real_svs_is_valid_ngff_after_ingest_and_inference(tmp_path, untrained_rgb_unet, client):
    if not CMU1.exists():
        pytest.skip(f"{CMU1} is not available")
    store = ingest_slide(SlideSource(image=CMU1), tmp_path / "stores", IngestConfig(), client).store
    assert n_levels(validated_image(store)) == 3
    assert_tissue_follows_the_image(store)
    config = infer_config(tile_size=252, block_size=1024)
    assert_outputs_valid(
        store, infer_slide(store, untrained_rgb_unet, config, client).output, False
    )
    elsewhere = infer_slide(
        store,
        untrained_rgb_unet,
        config.model_copy(update={"output_dir": tmp_path / "out"}),
        client,
    )
    assert_outputs_valid(store, elsewhere.output, False)


@pytest.mark.slow  # minutes: an untrained model marks tens of thousands of specks as objects
def test_real_svs_exports_one_feature_per_instance_with_its_area(
    tmp_path, untrained_rgb_unet, client
):
    if not CMU1.exists():
        pytest.skip(f"{CMU1} is not available")
    store = ingest_slide(SlideSource(image=CMU1), tmp_path / "stores", IngestConfig(), client).store
    config = infer_config(
        tile_size=252, block_size=1024, output_dir=tmp_path / "out", export=["geojson"]
    )
    result = infer_slide(store, untrained_rgb_unet, config, client)
    (geojson,) = result.exports
    collection = json.loads(geojson.read_text())
    FeatureCollection.model_validate(collection)
    instances = zarr.open_array(result.output / "labels" / "instances" / "0", mode="r")[...]
    pixels = np.bincount(instances.ravel())
    features = collection["features"]
    assert len(features) == result.n_instances == int((pixels[1:] > 0).sum())
    for feature in features:
        geometry, label = feature["geometry"], feature["properties"]["label_id"]
        multi = geometry["type"] == "MultiPolygon"
        polygons = geometry["coordinates"] if multi else [geometry["coordinates"]]
        area = sum(shoelace(ring) for polygon in polygons for ring in polygon)
        assert abs(area - pixels[label]) <= 0.05 * pixels[label]


def test_the_validator_rejects_a_label_with_fewer_levels_than_its_image(tmp_path):
    """The gate has teeth: a one-level tissue label on a 3-level image (what segflow wrote
    before) fails ome-zarr-models."""
    root = zarr.open_group(tmp_path / "s.zarr", mode="w", zarr_format=3)
    levels = ngff.create_image(root, (3, 300, 200), "uint8", chunk_size=64, min_level_size=64)
    ngff.create_label(root, "tissue", (150, 100), "uint8", len(levels), downsample=2)
    validated_image(tmp_path / "s.zarr")
    ngff.create_label(root, "tissue", (150, 100), "uint8", 1, downsample=2, overwrite=True)
    with pytest.raises(RuntimeError, match=r"label multiscale levels \(1\) doesn't match.* \(3\)"):
        validated_image(tmp_path / "s.zarr")
