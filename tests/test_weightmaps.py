"""Chunked weight maps of a slide store must equal `weight_map` of the whole image."""

from pathlib import Path

import numpy as np
import psutil
import pytest
import zarr
from pydantic import ValidationError

import pipelines.weightmaps as weightmaps
from pipelines.cluster import ClusterConfig, dask_client
from pipelines.ingest import SLIDE_STORE, IngestConfig, ingest_slide
from pipelines.sources import SlideSource
from pipelines.weightmaps import (
    WEIGHT_MAPS,
    WeightsConfig,
    WeightsError,
    compute_weight_maps,
    recorded_classes,
)
from segcore import ngff
from segcore.store import STORE_FORMAT, SlideStore, StoreError
from segcore.synthetic import write_synthetic_slide
from segcore.weights import (
    class_weights_from_counts,
    separate_touching,
    training_target,
    weight_map,
)


def dead_pid() -> int:
    """A process id that no process has now."""
    pid = 4_000_000
    while psutil.pid_exists(pid):
        pid += 1
    return pid


DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def client():
    with dask_client(ClusterConfig(n_workers=1, threads_per_worker=2, processes=False)) as c:
        yield c


def make_store(
    path: Path,
    labels: np.ndarray | None,
    chunk: int = 256,
    shard: int | None = None,
    shape: tuple[int, int] | None = None,
) -> Path:
    """A minimal segflow slide store (image level 0 + annotations) in the segcore.store layout."""
    shape = shape or labels.shape
    root = zarr.open_group(path, mode="w")
    root.attrs["segflow"] = {
        "store_format": STORE_FORMAT,
        "source": "test",
        "checksum": "test-checksum",
    }
    root.attrs["ome"] = {"multiscales": [{"datasets": [{"path": "0"}]}]}
    ngff.create_array(
        root,
        "0",
        (3, *shape),
        np.uint8,
        (3, chunk, chunk),
        shards=(3, shard, shard) if shard else None,
    )
    if labels is not None:
        annotations = root.create_group("labels").create_group("annotations")
        ngff.create_array(annotations, "0", labels.shape, np.uint32, (chunk, chunk))[...] = labels
    return path


def cells_across_chunks(shape: tuple[int, int], chunk: int, n_cells: int, seed: int) -> np.ndarray:
    """Touching disks, half of them centred on chunk borders or the image edge."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, dtype=np.uint32)
    for cell in range(1, n_cells + 1):
        centre = rng.uniform(0, shape)
        if cell % 2:  # snap one coordinate onto a chunk border or the image edge
            axis = cell % 4 // 2
            grid = np.arange(0, shape[axis] + 1, chunk)
            centre[axis] = grid[np.abs(grid - centre[axis]).argmin()] + rng.uniform(-3, 3)
        radius = rng.uniform(3, 13)
        lo = np.maximum((centre - radius).astype(int), 0)
        hi = np.minimum((centre + radius).astype(int) + 2, shape)
        yy, xx = np.mgrid[lo[0] : hi[0], lo[1] : hi[1]]
        disk = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < radius**2
        labels[lo[0] : hi[0], lo[1] : hi[1]][disk] = cell * 7919  # non-contiguous ids
    return labels


def stored(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """The maps, and their record: the stage's metadata with the identity's settings."""
    slide = SlideStore.open(path)
    record = dict(zarr.open_group(WEIGHT_MAPS.node(path), mode="r").attrs["segflow"])
    return slide.target[:], slide.weight[:], {**record, **record["identity"]["settings"]}


def test_chunked_weight_map_equals_whole_image(tmp_path, client):
    labels = cells_across_chunks((1100, 1300), chunk=256, n_cells=500, seed=0)
    path = make_store(tmp_path / "slide.zarr", labels, chunk=256)
    config = WeightsConfig(block_size=256)  # 5 x 6 blocks, thin last column (1300 = 5*256 + 20)
    result = compute_weight_maps(path, config, client)
    assert result.status == "written"

    separated = separate_touching(labels)
    n_cell = int((separated > 0).sum())
    assert result.class_counts == (labels.size - n_cell, n_cell)
    whole = weight_map(separated)  # own class counts = the slide's, default tolerance 1e-4
    target, weight, attrs = stored(path)
    assert np.abs(weight - whole).max() <= 1e-3
    # Same tolerance: the halo makes every block see what the whole image sees.
    same_cutoff = weight_map(separated, tolerance=config.tolerance)
    np.testing.assert_allclose(weight, same_cutoff, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(target, training_target(labels))
    # The border term crosses chunk borders (else this test would prove nothing).
    border = whole - np.where(separated > 0, result.class_weights[1], result.class_weights[0])
    assert (border[255:257, :] > 1.0).sum() > 20 and (border[:, 767:769] > 1.0).sum() > 20

    slide = SlideStore.open(path)
    assert slide.weight.dtype == np.float32 and slide.target.dtype == np.uint8
    assert slide.weight.chunks == slide.target.chunks == (256, 256)
    assert attrs["halo"] == result.halo == 22
    assert attrs["w0"] == 10.0 and attrs["sigma"] == 5.0 and attrs["tolerance"] == 1e-3
    assert attrs["class_counts"] == list(result.class_counts)
    assert not [p.name for p in path.iterdir() if p.name.startswith(".")]


def test_reruns_skip_until_settings_or_annotations_change(tmp_path, client):
    labels = cells_across_chunks((300, 260), chunk=128, n_cells=60, seed=1)
    path = make_store(tmp_path / "slide.zarr", labels, chunk=128)
    config = WeightsConfig(block_size=128)
    assert compute_weight_maps(path, config, client).status == "written"
    assert compute_weight_maps(path, config, client).status == "skipped"
    # Where the work is cut is not what it writes: other blocks, same maps, nothing redone.
    other_blocks = config.model_copy(update={"block_size": 256})
    assert compute_weight_maps(path, other_blocks, client).status == "skipped"

    sharper = config.model_copy(update={"sigma": 3.0})
    assert compute_weight_maps(path, sharper, client).status == "written"
    assert stored(path)[2]["sigma"] == 3.0

    annotations = zarr.open_array(path / "labels" / "annotations" / "0", mode="r+")
    annotations[10:20, 10:20] = 99_999
    assert compute_weight_maps(path, sharper, client).status == "written"
    expected = weight_map(separate_touching(annotations[:]), sigma=3.0, tolerance=1e-3)
    np.testing.assert_allclose(stored(path)[1], expected, atol=1e-6)


def test_configured_class_weights_are_used(tmp_path, client):
    labels = cells_across_chunks((200, 200), chunk=64, n_cells=30, seed=2)
    path = make_store(tmp_path / "slide.zarr", labels, chunk=64)
    config = WeightsConfig(block_size=64, class_weights=(1.0, 4.0), w0=0.0)
    result = compute_weight_maps(path, config, client)
    assert result.class_weights == (1.0, 4.0) and result.halo == 0
    target, weight, _ = stored(path)
    np.testing.assert_array_equal(weight, np.where(target == 1, 4.0, 1.0).astype(np.float32))


def test_real_nuclei_with_sharded_level_zero(tmp_path, client):
    path = DATA / "dsb2018_stardist" / "mask2d.tif"
    if not path.exists():
        pytest.skip(f"{path} not present")
    tifffile = pytest.importorskip("tifffile")
    labels = tifffile.imread(path)
    store = make_store(tmp_path / "dsb.zarr", labels, chunk=64, shard=128)
    result = compute_weight_maps(store, WeightsConfig(block_size=64), client)
    _, weight, _ = stored(store)
    assert np.abs(weight - weight_map(separate_touching(labels))).max() <= 1e-3
    assert result.class_counts[1] > 0.15 * labels.size
    slide = SlideStore.open(store)
    assert slide.weight.shards == (128, 128) and slide.weight.chunks == (64, 64)


def test_failed_run_keeps_previous_maps_and_leaves_nothing_behind(tmp_path, client, monkeypatch):
    labels = cells_across_chunks((256, 256), chunk=64, n_cells=40, seed=3)
    path = make_store(tmp_path / "slide.zarr", labels, chunk=64)
    compute_weight_maps(path, WeightsConfig(block_size=64), client)
    before = stored(path)
    crashed = path / f".training.tmp-{dead_pid()}-0badc0de"  # what a killed run leaves
    live = path / ".training.tmp-1-5afe5afe"  # another run's, still writing (pid 1 is alive)
    crashed.mkdir()
    live.mkdir()

    def explode(*args, **kwargs):
        raise RuntimeError("worker lost")

    monkeypatch.setattr(weightmaps, "_write_block", explode)
    with pytest.raises(RuntimeError, match="worker lost"):
        compute_weight_maps(path, WeightsConfig(block_size=64, sigma=4.0), client)
    after = stored(path)
    np.testing.assert_array_equal(after[1], before[1])
    assert after[2] == before[2]

    # A run clears what a dead run left, and only that; its own temporary goes when it fails.
    assert [p.name for p in path.iterdir() if p.name.startswith(".")] == [live.name]

    monkeypatch.undo()
    compute_weight_maps(path, WeightsConfig(block_size=64, sigma=4.0), client)
    assert stored(path)[2]["sigma"] == 4.0
    assert [p.name for p in path.iterdir() if p.name.startswith(".")] == [live.name]


@pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning")
def test_consolidated_store_shows_the_new_maps(tmp_path, client):
    labels = cells_across_chunks((128, 128), chunk=64, n_cells=10, seed=4)
    path = make_store(tmp_path / "slide.zarr", labels, chunk=64)
    zarr.consolidate_metadata(path)
    compute_weight_maps(path, WeightsConfig(block_size=64), client)
    assert zarr.open_group(path, mode="r")["training/weight"].shape == (128, 128)


def test_store_without_annotations_is_named_in_the_error(tmp_path, client):
    path = make_store(tmp_path / "bare.zarr", None, shape=(64, 64))
    with pytest.raises(WeightsError, match=r"bare\.zarr: no annotations"):
        compute_weight_maps(path, WeightsConfig(), client)
    assert not (path / "training").exists()


def test_mismatched_annotations_are_rejected(tmp_path, client):
    path = make_store(tmp_path / "odd.zarr", np.zeros((64, 60), np.uint32), shape=(64, 64))
    with pytest.raises(WeightsError, match=r"odd\.zarr: annotations shape \(64, 60\)"):
        compute_weight_maps(path, WeightsConfig(), client)


def test_not_a_store_is_rejected(tmp_path, client):
    with pytest.raises(StoreError, match="nothing.zarr"):
        compute_weight_maps(tmp_path / "nothing.zarr", WeightsConfig(), client)


def test_ingested_synthetic_slide(tmp_path, client):
    slide = write_synthetic_slide(
        tmp_path / "s.tif", tmp_path / "s_labels.tif", 600, 700, seed=3, tile=256
    )
    source = SlideSource(image=slide.image_path, labels=slide.labels_path)
    ingested = ingest_slide(source, tmp_path / "out", IngestConfig(chunk_size=128), client)
    result = compute_weight_maps(ingested.store, WeightsConfig(block_size=256), client)
    store = SlideStore.open(ingested.store)
    annotations = store.annotations[:]
    assert len(np.unique(annotations)) > 100
    assert np.abs(store.weight[:] - weight_map(separate_touching(annotations))).max() <= 1e-3
    assert store.weight.chunks == store.image(0).chunks[1:] == (128, 128)
    # The maps name the store they were made from (its ingest identity).
    assert stored(ingested.store)[2]["store"] == SLIDE_STORE.recorded_key(ingested.store)
    assert SLIDE_STORE.recorded_key(ingested.store) == ingested.identity is not None
    assert result.status == "written"


def test_chunked_three_class_target_equals_whole_image(tmp_path, client):
    labels = cells_across_chunks((500, 420), chunk=128, n_cells=160, seed=4)
    path = make_store(tmp_path / "slide.zarr", labels, chunk=128)
    # No border term: the halo is the boundary's alone, so the test shows it suffices.
    config = WeightsConfig(block_size=128, target="cells+boundaries", boundary_width=3, w0=0.0)
    result = compute_weight_maps(path, config, client)
    assert result.status == "written" and result.halo == 3

    expected = training_target(labels, "cells+boundaries", boundary_width=3)
    counts = np.bincount(expected.ravel(), minlength=3)
    target, weight, attrs = stored(path)
    np.testing.assert_array_equal(target, expected)
    assert result.classes == ("background", "cell", "boundary")
    assert attrs["classes"] == ["background", "cell", "boundary"]
    assert recorded_classes(path) == ("background", "cell", "boundary")
    assert result.class_counts == tuple(counts.tolist()) and all(counts > 0)
    weights = class_weights_from_counts(counts)
    np.testing.assert_allclose(weight, weights[expected].astype(np.float32), rtol=1e-6)
    # Boundaries cross block borders (else this test would prove nothing).
    assert (target[127:129, :] == 2).sum() > 10 and (target[:, 255:257] == 2).sum() > 10

    # With the border term too, whole-image maps agree block by block.
    full = config.model_copy(update={"w0": 10.0})
    assert compute_weight_maps(path, full, client).status == "written"
    whole = weight_map(
        separate_touching(labels), 10.0, 5.0, weights, classes=expected, tolerance=1e-3
    )
    np.testing.assert_allclose(stored(path)[1], whole, rtol=1e-6, atol=1e-6)


def test_target_settings_decide_the_identity(tmp_path, client):
    cells = WeightsConfig()
    assert cells.settings()["target"] == "cells" and "boundary_width" not in cells.settings()
    # The width does not change a "cells" target, so it does not change its identity.
    assert WeightsConfig(boundary_width=5).settings() == cells.settings()
    three = WeightsConfig(target="cells+boundaries")
    assert three.settings()["boundary_width"] == 2 and three.settings() != cells.settings()
    assert three.settings() != WeightsConfig(target="cells+boundaries", boundary_width=3).settings()
    with pytest.raises(ValidationError, match="one weight per class"):
        WeightsConfig(target="cells+boundaries", class_weights=(1.0, 2.0))
    assert WeightsConfig(target="cells+boundaries", class_weights=(1, 2, 3)).class_weights

    labels = cells_across_chunks((200, 200), chunk=64, n_cells=30, seed=2)
    path = make_store(tmp_path / "slide.zarr", labels, chunk=64)
    assert compute_weight_maps(path, WeightsConfig(block_size=64), client).status == "written"
    assert recorded_classes(path) == ("background", "cell")
    three = WeightsConfig(block_size=64, target="cells+boundaries")
    assert compute_weight_maps(path, three, client).status == "written"
    assert compute_weight_maps(path, three, client).status == "skipped"
    assert set(np.unique(stored(path)[0])) == {0, 1, 2}
