"""Safe at the edges: a missing or corrupt chunk is never read as zeros, and a 16-bit slide is
never run through an 8-bit model. Real stores made by pipelines.ingest from synthetic slides,
damaged on disk the way disks and copies damage them, then read by the real stages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from flow_helpers import prefect_api

from flows.cli import main
from pipelines.cluster import ClusterConfig, dask_client
from pipelines.infer import InferConfig, InferError, infer_archive, infer_slide
from pipelines.ingest import IngestConfig, ingest_slide
from pipelines.sources import SlideSource
from pipelines.training.data import TileDataset, TileShape, TrainingDataError, open_training_store
from pipelines.weightmaps import WeightsConfig, compute_weight_maps
from segcore import ngff
from segcore.store import STORE_FORMAT, SlideStore, StoreError, chunk_keys
from segcore.synthetic import write_synthetic_slide

INGEST = IngestConfig(chunk_size=128, min_level_size=64)
THREADS = ClusterConfig(n_workers=1, threads_per_worker=2, processes=False)
ANNOTATIONS = "labels/annotations/0"


@pytest.fixture(scope="module")
def client():
    with dask_client(THREADS) as c:
        yield c


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """An ingested 256 x 384 labelled synthetic slide: 2 x 3 chunks of 128 px per array."""
    folder = tmp_path_factory.mktemp("pristine")
    slide = write_synthetic_slide(
        folder / "s.tif", folder / "s_labels.tif", 256, 384, seed=4, tile=128
    )
    source = SlideSource(image=slide.image_path, labels=slide.labels_path)
    return ingest_slide(source, folder / "stores", INGEST).store


@pytest.fixture
def store(pristine, tmp_path) -> Path:
    """A fresh copy of the pristine store, for one test to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "s.zarr"))


def infer_config(**overrides) -> InferConfig:
    settings = {"tile_size": 92, "batch_size": 2, "block_size": 128, "cluster": THREADS}
    return InferConfig(progress=False, **(settings | overrides))


def corrupt(chunk: Path) -> None:
    """Flip one bit in the middle of a stored chunk (what a bad disk or copy does)."""
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))


def test_ingest_stores_every_chunk_with_a_checksum_and_a_manifest(pristine):
    slide = SlideStore.open(pristine)
    meta = slide.metadata
    assert meta["store_format"] == STORE_FORMAT
    for path, count in meta["arrays"].items():
        array = slide.group[path]
        assert count == array.nchunks
        for key in chunk_keys(array):
            assert (pristine / path / key).is_file(), f"{path}/{key}"
        assert type(array.metadata.codecs[-1]).__name__ == "Crc32cCodec"
    assert set(meta["arrays"]) >= {"0", "1", ANNOTATIONS, "labels/tissue/0"}
    image = tifffile.imread(meta["source"], level=0)
    assert meta["dtype"] == "uint8"
    assert meta["value_range"] == [int(image.min()), int(image.max())]


def test_background_chunks_are_stored_too(tmp_path):
    """Zarr leaves out chunks equal to the fill value by default; a segflow store keeps them,
    so an absent chunk is damage, never background."""
    rng = np.random.default_rng(1)
    tifffile.imwrite(tmp_path / "b.tif", rng.integers(0, 200, (200, 300, 3), dtype=np.uint8))
    labels = np.zeros((200, 300), np.uint32)
    labels[10:40, 10:40] = 5  # one cell in chunk (0, 0); the other five chunks are background
    tifffile.imwrite(tmp_path / "b_labels.tif", labels)
    source = SlideSource(image=tmp_path / "b.tif", labels=tmp_path / "b_labels.tif")
    store = ingest_slide(source, tmp_path / "stores", INGEST).store
    annotations = SlideStore.open(store).annotations
    assert annotations.nchunks == 6 and not annotations[128:, :].any()
    stored = sorted(
        p.relative_to(store / ANNOTATIONS).as_posix()
        for p in (store / ANNOTATIONS / "c").rglob("*")
    )
    assert [k for k in stored if k.count("/") == 2] == chunk_keys(annotations)


def test_weights_refuse_a_missing_label_chunk(store, client):
    (store / ANNOTATIONS / "c" / "1" / "2").unlink()
    with pytest.raises(StoreError) as failure:
        compute_weight_maps(store, WeightsConfig(block_size=128), client)
    assert str(failure.value) == f"{store}/{ANNOTATIONS}: chunk c/1/2: missing"
    assert not (store / "training").exists()


def test_weights_name_a_corrupt_label_chunk(store, client):
    corrupt(store / ANNOTATIONS / "c" / "1" / "0")
    with pytest.raises(StoreError) as failure:
        compute_weight_maps(store, WeightsConfig(block_size=128), client)
    message = str(failure.value)
    assert message.startswith(f"{store}/{ANNOTATIONS}: chunk c/1/0: corrupt (")
    assert "checksum" in message and "\n" not in message
    assert not (store / "training").exists()


def test_missing_array_metadata_names_the_array(store, client):
    (store / ANNOTATIONS / "zarr.json").unlink()
    with pytest.raises(StoreError, match=f"{store}/{ANNOTATIONS}: missing array metadata"):
        compute_weight_maps(store, WeightsConfig(block_size=128), client)
    (store / "0" / "zarr.json").unlink()
    with pytest.raises(StoreError, match=f"{store}/0: missing array metadata"):
        SlideStore.open(store).image(0)


def test_infer_fails_the_damaged_slide_only_and_installs_nothing(
    pristine, tmp_path, untrained_rgb_unet, client
):
    missing = Path(shutil.copytree(pristine, tmp_path / "missing.zarr"))
    (missing / "0" / "c" / "0" / "1" / "1").unlink()
    corrupted = Path(shutil.copytree(pristine, tmp_path / "corrupted.zarr"))
    corrupt(corrupted / "0" / "c" / "0" / "1" / "0")
    no_tissue = Path(shutil.copytree(pristine, tmp_path / "no_tissue.zarr"))
    (no_tissue / "labels" / "tissue" / "0" / "zarr.json").unlink()
    good = Path(shutil.copytree(pristine, tmp_path / "good.zarr"))
    results = {
        r.name: r
        for r in infer_archive(
            [missing, corrupted, no_tissue, good], untrained_rgb_unet, infer_config(), client
        )
    }
    assert results["missing"].error == f"{missing}/0: chunk c/0/1/1: missing"
    assert results["no_tissue"].error == (
        f"{no_tissue}/labels/tissue/0: missing array metadata (zarr.json)"
    )
    error = results["corrupted"].error
    assert error.startswith(f"{corrupted}: block ") and "\n" not in error
    assert f"failed: {corrupted}/0: chunk c/0/1/0: corrupt (" in error
    for name in ("missing", "corrupted", "no_tissue"):
        assert results[name].status == "failed"
        assert SlideStore.open(tmp_path / f"{name}.zarr").segmentation is None
    assert results["good"].status == "written"
    assert SlideStore.open(good).segmentation is not None


def test_inference_writes_every_chunk_even_on_glass(store, untrained_rgb_unet, client):
    tissue = ngff.writable(zarr.open_array(store / "labels" / "tissue" / "0", mode="r+"))
    tissue[...] = 0  # all glass: every block is skipped as background
    result = infer_slide(store, untrained_rgb_unet, infer_config(), client)
    assert result.blocks["background"] == result.blocks["total"]
    segmentation = SlideStore.open(store).segmentation
    for key in chunk_keys(segmentation):
        assert (store / "labels" / "segmentation" / "0" / key).is_file()


def test_training_refuses_missing_and_names_corrupt_chunks(store, client):
    compute_weight_maps(store, WeightsConfig(block_size=128), client)
    open_training_store(store, with_weight=True)  # intact: accepted
    corrupt(store / "training" / "target" / "c" / "0" / "1")
    dataset = TileDataset([store], TileShape(input=92, output=52), with_weight=True)
    with pytest.raises(StoreError, match=rf"{store}/training/target: chunk c/0/1: corrupt \("):
        dataset[(0, 100, 150)]
    (store / "training" / "weight" / "c" / "1" / "1").unlink()
    with pytest.raises(StoreError, match=f"{store}/training/weight: chunk c/1/1: missing"):
        open_training_store(store, with_weight=True)


def test_stores_of_the_previous_format_are_refused_then_rewritten(pristine, tmp_path):
    out = tmp_path / "stores"
    shutil.copytree(pristine, out / "s.zarr")
    store = out / "s.zarr"
    attrs = json.loads((store / "zarr.json").read_text())
    meta = attrs["attributes"]["segflow"]
    del meta["store_format"], meta["identity"]  # format 1 stores predate both
    (store / "zarr.json").write_text(json.dumps(attrs))
    with pytest.raises(StoreError, match=f"{store}: store format 1, this segflow reads format 2"):
        SlideStore.open(store)
    source = SlideSource(image=Path(meta["source"]), labels=Path(meta["labels_source"]))
    assert ingest_slide(source, out, INGEST).status == "written"
    assert SlideStore.open(store).metadata["store_format"] == STORE_FORMAT
    assert ingest_slide(source, out, INGEST).status == "skipped"


def test_a_16_bit_slide_is_recorded_and_refused_by_an_8_bit_model(
    tmp_path, untrained_rgb_unet, client
):
    rng = np.random.default_rng(0)
    pixels = rng.integers(100, 4096, size=(200, 240, 3), dtype=np.uint16)  # 12-bit camera
    tifffile.imwrite(tmp_path / "cam.tif", pixels, photometric="rgb")
    result = ingest_slide(SlideSource(image=tmp_path / "cam.tif"), tmp_path / "stores", INGEST)
    slide = SlideStore.open(result.store)
    assert slide.image(0).dtype == np.uint16
    assert slide.metadata["dtype"] == "uint16"
    assert slide.metadata["value_range"] == [int(pixels.min()), int(pixels.max())]
    with pytest.raises(InferError) as failure:
        infer_slide(result.store, untrained_rgb_unet, infer_config(), client)
    assert str(failure.value) == (
        f"{result.store}: image is uint16 (values {pixels.min()}..{pixels.max()}) but model "
        f"{untrained_rgb_unet} takes uint8 pixels (0..255); segflow does not rescale it silently"
    )
    assert slide.segmentation is None
    with pytest.raises(TrainingDataError, match=r"cam\.zarr: image must be .* uint8, got .*uint16"):
        open_training_store(result.store, with_weight=False)


@pytest.mark.slow  # ~30 s, most of it starting a temporary Prefect server
@pytest.mark.integration
def test_commands_end_in_one_line_naming_the_array_and_chunk(
    pristine, tmp_path, untrained_rgb_unet, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    workdir = tmp_path / "work"
    store = Path(shutil.copytree(pristine, workdir / "stores" / "s.zarr"))
    corrupt(store / ANNOTATIONS / "c" / "0" / "1")
    corrupt(store / "0" / "c" / "0" / "0" / "2")
    common = ["--workdir", str(workdir), "cluster.processes=false"]
    with prefect_api():
        code = main(["weights", str(store), "block_size=128", *common])
        err = capsys.readouterr().err
        assert code == 1
        (line,) = [line for line in err.splitlines() if line.startswith("segflow")]
        assert line.startswith(f"segflow: error: {store}/{ANNOTATIONS}: chunk c/0/1: corrupt (")
        assert "Traceback" not in err and not (store / "training").exists()

        infer = ["tile_size=92", "block_size=128", "--model", str(untrained_rgb_unet)]
        code = main(["infer", str(store), *infer, *common])
        err = capsys.readouterr().err
        assert code == 1
        (line,) = [line for line in err.splitlines() if line.startswith("segflow")]
        assert f"{store}/0: chunk c/0/0/2: corrupt (" in line and "Traceback" not in err
        assert SlideStore.open(store).segmentation is None
