"""Scribbles for the label bootstrap (pipelines.scribbles): stroke images become a valid NGFF
label with a full pyramid, bad stroke images are refused in one line with nothing written,
strokes pin their pixels' clusters in the trained network, and new strokes redo the labels
while the same ones do not; `segflow bootstrap --scribbles FOLDER` from the command line."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from flow_helpers import prefect_api
from ome_zarr_models.v05 import Image
from PIL import Image as PILImage
from scipy import ndimage

# The bootstrap stage's own tests: their cluster and ingest settings.
from test_bootstrap_stage import INGEST, THREADS

from flows.cli import main
from pipelines.bootstrap import BootstrapConfig, bootstrap_archive, sample_tiles
from pipelines.cluster import dask_client
from pipelines.ingest import ingest_slide
from pipelines.scribbles import (
    ScribblesError,
    import_scribbles,
    scribble_files,
    stroke_index,
)
from pipelines.services import mlflow_client
from pipelines.sources import SlideSource
from segcore.bootstrap import ClusteringConfig
from segcore.store import SlideStore
from segcore.synthetic import write_synthetic_slide


@pytest.fixture(scope="module")
def client():
    with dask_client(THREADS) as c:
        yield c


CONFIG = BootstrapConfig(
    clustering=ClusteringConfig(channels=16, n_clusters=16, max_iterations=40, min_labels=2),
    tile_size=64,
    n_tiles=6,
    block_size=64,
    predict_tile=48,
    nucleus=(1,),
    cluster=THREADS,
)


@pytest.fixture(scope="module")
def slide(tmp_path_factory, client) -> tuple[Path, np.ndarray]:
    """An unlabelled store of a synthetic slide (128 x 192 px, 3 levels) and its true nuclei."""
    folder = tmp_path_factory.mktemp("scribbles")
    written = write_synthetic_slide(folder / "s.tif", folder / "t.tif", 128, 192, seed=5, tile=64)
    store = ingest_slide(SlideSource(image=written.image_path), folder / "stores", INGEST, client)
    return store.store, tifffile.imread(written.labels_path) > 0


def strokes_from(truth: np.ndarray, n: int = 4) -> np.ndarray:
    """Strokes as a user draws them: 1 on the core of `n` nuclei, 2 on a patch of stroma."""
    strokes = np.zeros(truth.shape, np.uint8)
    cores, count = ndimage.label(ndimage.binary_erosion(truth, iterations=2))
    assert count >= n
    strokes[np.isin(cores, np.arange(1, n + 1))] = 1
    # A dab on stroma: the pixels farthest from every nucleus, and those within 4 px of it.
    distance = ndimage.distance_transform_edt(~truth)
    y, x = np.unravel_index(int(np.argmax(distance)), truth.shape)
    rows, cols = np.ogrid[: truth.shape[0], : truth.shape[1]]
    strokes[((rows - y) ** 2 + (cols - x) ** 2 <= 16) & (distance > 3)] = 2
    return strokes


def copy_of(store: Path, tmp_path: Path, name: str = "s.zarr") -> Path:
    return Path(shutil.copytree(store, tmp_path / name))


def test_strokes_become_a_valid_label_with_a_full_pyramid(slide, tmp_path):
    source, truth = slide
    store = copy_of(source, tmp_path)
    strokes = strokes_from(truth)
    PILImage.fromarray(strokes).save(tmp_path / "s.png")
    result = import_scribbles(store, tmp_path / "s.png")
    assert result.status == "written", result.error
    assert result.strokes == {1: int((strokes == 1).sum()), 2: int((strokes == 2).sum())}
    image = Image.from_zarr(zarr.open_group(store, mode="r"))
    assert "scribbles" in image.labels.label_paths
    group = zarr.open_group(store / "labels" / "scribbles", mode="r")
    levels = group.attrs["ome"]["multiscales"][0]["datasets"]
    assert len(levels) == SlideStore.open(store).n_levels
    np.testing.assert_array_equal(group["0"][...], strokes)
    for k in range(1, len(levels)):
        np.testing.assert_array_equal(group[str(k)][...], group[str(k - 1)][::2, ::2])
    # The same content again is skipped; other strokes (a TIFF now) are written.
    assert import_scribbles(store, tmp_path / "s.png").status == "skipped"
    tifffile.imwrite(tmp_path / "other.tif", np.where(strokes == 2, 0, strokes))
    assert import_scribbles(store, tmp_path / "other.tif").status == "written"
    assert int(zarr.open_array(store / "labels" / "scribbles" / "0", mode="r")[...].max()) == 1


@pytest.mark.parametrize(
    ("pixels", "problem"),
    [
        (np.zeros((128, 192), np.uint8), "holds no stroke"),
        (np.ones((100, 192), np.uint8), "strokes of 192 x 100 px, the slide s is 192 x 128"),
        (np.ones((128, 192, 3), np.uint8), "3 channels; one channel expected"),
    ],
)
def test_a_bad_stroke_image_is_refused_naming_it_with_nothing_written(
    slide, tmp_path, pixels, problem
):
    store = copy_of(slide[0], tmp_path)
    PILImage.fromarray(pixels).save(tmp_path / "s.png")
    with pytest.raises(ValueError, match=problem) as error:
        import_scribbles(store, tmp_path / "s.png")
    assert str(error.value).startswith(str(tmp_path / "s.png"))
    assert not (store / "labels" / "scribbles").exists()
    assert not [p for p in (store / "labels").iterdir() if p.name.startswith(".")]


def test_stroke_images_pair_with_stores_by_name(tmp_path):
    stores = [tmp_path / "a.zarr", tmp_path / "b.zarr"]
    folder = tmp_path / "strokes"
    with pytest.raises(ScribblesError, match="no such folder"):
        scribble_files(folder, stores)
    folder.mkdir()
    with pytest.raises(ScribblesError, match="holds no stroke image"):
        scribble_files(folder, stores)
    (folder / "a.png").touch()
    (folder / "notes.txt").touch()
    assert scribble_files(folder, stores) == {stores[0]: folder / "a.png"}
    (folder / "c.tif").touch()
    with pytest.raises(ScribblesError, match=r"c\.tif: matches no store"):
        scribble_files(folder, stores)
    (folder / "c.tif").unlink()
    (folder / "a.tiff").touch()
    with pytest.raises(ScribblesError, match="already gives strokes"):
        scribble_files(folder, stores)


def test_half_the_tiles_are_centred_on_strokes(slide, tmp_path):
    source, truth = slide
    store = copy_of(source, tmp_path)
    strokes = np.zeros(truth.shape, np.uint8)
    strokes[100:104, 150:160] = 3  # one small stroke far from the slide's centre
    PILImage.fromarray(strokes).save(tmp_path / "s.png")
    plain = sample_tiles([SlideStore.open(store)], 32, 6, seed=0)
    assert plain.scribbles is None
    import_scribbles(store, tmp_path / "s.png")
    index = stroke_index(store)
    assert index is not None and index.total(3) == 40 and index.largest == 3
    sampled = sample_tiles([SlideStore.open(store)], 32, 6, seed=0, strokes={store: index})
    assert sampled.scribbles.shape == (6, 32, 32)
    stroked = (sampled.scribbles == 3).any(axis=(1, 2))
    assert stroked[:3].all()  # the first half is centred on stroked pixels
    # Windows hold the strokes where the tiles lie: read them back by position.
    assert int(sampled.scribbles.max()) == 3 and set(np.unique(sampled.scribbles)) <= {0, 3}


def test_strokes_guide_the_bootstrap_and_new_strokes_redo_it(slide, client, tmp_path):
    source, truth = slide
    store = copy_of(source, tmp_path)
    strokes = strokes_from(truth)
    PILImage.fromarray(strokes).save(tmp_path / "s.png")
    import_scribbles(store, tmp_path / "s.png")
    (first,) = bootstrap_archive([store], CONFIG, client=client)
    assert first.status == "written", first.error
    clusters = zarr.open_array(store / "labels" / "bootstrap" / "0", mode="r")[...]
    # The scribble loss pins the stroked pixels to their stroke's cluster.
    for value in (1, 2):
        assert (clusters[strokes == value] == value).mean() > 0.9
    nuclei = clusters == 1
    dice = 2 * (nuclei & truth).sum() / (nuclei.sum() + truth.sum())
    assert dice > 0.5, dice
    (again,) = bootstrap_archive([store], CONFIG, client=client)
    assert again.status == "skipped"
    PILImage.fromarray(np.where(strokes == 2, 0, strokes)).save(tmp_path / "fewer.png")
    import_scribbles(store, tmp_path / "fewer.png")
    (redone,) = bootstrap_archive([store], CONFIG, client=client)
    assert redone.status == "written" and redone.identity != first.identity


def test_strokes_without_a_cluster_or_from_elsewhere_fail_the_store(slide, client, tmp_path):
    store = copy_of(slide[0], tmp_path)
    strokes = np.zeros(slide[1].shape, np.uint8)
    strokes[10:20, 10:20] = 16  # the network has clusters 0..15
    PILImage.fromarray(strokes).save(tmp_path / "s.png")
    import_scribbles(store, tmp_path / "s.png")
    (result,) = bootstrap_archive([store], CONFIG, client=client)
    assert result.status == "failed"
    assert result.error.startswith(f"{store}: stroke value 16 has no cluster")
    # Strokes painted into the store by another tool carry no identity: refused, not guessed.
    del zarr.open_group(store / "labels" / "scribbles", mode="r+").attrs["segflow"]
    (result,) = bootstrap_archive([store], CONFIG, client=client)
    assert result.status == "failed" and "was not imported by segflow" in result.error
    assert not (store / "labels" / "bootstrap").exists()


@pytest.mark.slow  # a Prefect server and two bootstrap commands
def test_segflow_bootstrap_with_scribbles_from_the_command_line(slide, tmp_path, capsys):
    source, truth = slide
    stores = tmp_path / "stores"
    stores.mkdir()
    store = copy_of(source, stores)
    folder = tmp_path / "strokes"
    folder.mkdir()
    PILImage.fromarray(strokes_from(truth)).save(folder / "typo.png")
    tiny = [
        "tile_size=64",
        "n_tiles=6",
        "nucleus=1",
        "clustering.channels=16",
        "clustering.n_clusters=16",
        "clustering.max_iterations=40",
        "block_size=64",
        "cluster.processes=false",
    ]
    common = [str(stores), "--workdir", str(tmp_path / "work"), "--scribbles", str(folder)]
    with prefect_api():
        assert main(["bootstrap", *tiny, *common]) == 2
        err = capsys.readouterr().err
        assert f"{folder / 'typo.png'}: matches no store" in err and len(err.splitlines()) == 1
        assert not (store / "labels" / "scribbles").exists()
        (folder / "typo.png").rename(folder / "s.png")
        assert main(["bootstrap", *tiny, *common]) == 0, capsys.readouterr().err
        out = capsys.readouterr().out
    assert "scribbles" in out and "written" in out
    attrs = zarr.open_group(store / "labels" / "bootstrap", mode="r").attrs["segflow"]
    assert "scribbles" in attrs["identity"]["inputs"] and attrs["stroked_pixels"] > 0
    tracking = mlflow_client(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    params = tracking.get_run(attrs["mlflow_run_id"]).data.params
    assert int(params["stroked_pixels"]) == attrs["stroked_pixels"]
