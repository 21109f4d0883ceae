"""Distributed inference: equal to single-process predict_tiled, resumable after kill -9, safe."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from scipy import ndimage

from pipelines.cluster import ClusterConfig, dask_client
from pipelines.infer import (
    SEGMENTATION_OUTPUT,
    InferConfig,
    InferError,
    infer_archive,
    infer_slide,
)
from pipelines.inference.journal import JOURNAL_DIR
from pipelines.inference.report import seam_line
from segcore import ngff
from segcore.checkpoint import save_unet
from segcore.model import UNet
from segcore.orientation import orientations
from segcore.separation import cut_touching, split_at_boundaries
from segcore.store import STORE_FORMAT, SlideStore
from segcore.tiling import predict_tiled

TILE, BATCH = 92, 3  # depth 3: 92 px in, 52 out, stride 52
THREADS = ClusterConfig(n_workers=1, threads_per_worker=2, processes=False)
#: What Dask's process clusters set to 1 for their workers, in this process's environment too.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _expressive_unet(seed: int = 0) -> UNet:
    """He init, non-zero biases (every level matters), input scaled for raw 0..255 pixels and
    a head bias that splits pixels about evenly between the two classes."""
    torch.manual_seed(seed)
    model = UNet(3, 2, base_channels=4, depth=3, dropout=0.0)
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d):
            torch.nn.init.normal_(m.bias, std=0.2)
    model.eval()
    with torch.no_grad():
        model.down[0][0].weight /= 255.0
        logits = model(torch.rand(1, 3, 200, 200) * 255)
        model.head.bias[1] -= (logits[0, 1] - logits[0, 0]).median()
    return model


def make_store(path: Path, image: np.ndarray, tissue: np.ndarray | None = None, d: int = 4):
    """A slide store in the layout of segcore/store.py, built directly with the NGFF helpers."""
    root = zarr.open_group(path, mode="w")
    levels = ngff.create_image(root, image.shape, "uint8", chunk_size=128, min_level_size=100)
    levels[0][...] = image
    for k in range(1, len(levels)):
        levels[k][...] = np.asarray(levels[k - 1][...])[:, ::2, ::2]
    root.attrs["segflow"] = {"store_format": STORE_FORMAT, "tissue_downsample": d, "mpp": 0.5}
    _, h, w = image.shape
    if tissue is None:
        tissue = np.ones((-(-h // d), -(-w // d)), np.uint8)
    ngff.create_label(root, "tissue", tissue.shape, "uint8", 1, chunk_size=128)[0][...] = tissue
    return path


def smooth_image(shape: tuple[int, int], seed: int, channels: int = 3) -> np.ndarray:
    """Blobs of many sizes, so foreground components cross block borders."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal((channels, *shape)), (0, 4, 4))
    noise = (noise - noise.mean()) / noise.std()
    return np.clip(128 + 60 * noise + rng.normal(0, 10, noise.shape), 0, 255).astype(np.uint8)


def reference_classes(model: UNet, image: np.ndarray) -> np.ndarray:
    logits = predict_tiled(model, image.astype(np.float32), tile_size=TILE, batch_size=BATCH)
    return logits.argmax(0).astype(np.uint8)


def assert_same_partition(ours: np.ndarray, reference: np.ndarray) -> None:
    np.testing.assert_array_equal(ours == 0, reference == 0)
    fg = reference != 0
    pairs = np.unique(np.stack([ours[fg], reference[fg]]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


def chunk_bytes(output: Path) -> dict[str, bytes]:
    """Every chunk file of the segmentation and instance pyramids (metadata excluded)."""
    files = {}
    for name in ("segmentation", "instances"):
        for p in sorted((output / "labels" / name).rglob("*")):
            if p.is_file() and p.name != "zarr.json":
                files[str(p.relative_to(output))] = p.read_bytes()
    return files


@pytest.fixture(scope="module")
def model() -> UNet:
    return _expressive_unet()


@pytest.fixture(scope="module")
def model_file(model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "unet.pt"
    save_unet(model, path)
    return path


@pytest.fixture(scope="module")
def client():
    with dask_client(THREADS) as c:
        yield c


def config(**overrides) -> InferConfig:
    base = {"tile_size": TILE, "batch_size": BATCH, "progress": False}
    return InferConfig(**{**base, **overrides})


def test_equals_predict_tiled_on_a_process_cluster(tmp_path, model, model_file):
    """2 worker processes x 1 thread; sizes not multiples of block or tile, and one tiny slide."""
    big = smooth_image((1000, 1300), seed=1)
    tiny = smooth_image((50, 70), seed=2)
    stores = [make_store(tmp_path / "big.zarr", big), make_store(tmp_path / "tiny.zarr", tiny)]
    cluster = ClusterConfig(n_workers=2, threads_per_worker=1, processes=True)
    results = infer_archive(stores, model_file, config(block_size=250, cluster=cluster))
    assert [r.status for r in results] == ["written", "written"], [r.error for r in results]
    assert results[0].blocks["total"] == 5 * 7  # block side 208 = 4 strides of 52
    for store, image, result in zip(stores, (big, tiny), results, strict=True):
        slide = SlideStore.open(store)
        classes = slide.segmentation[...]
        expected = reference_classes(model, image)
        np.testing.assert_array_equal(classes, expected)
        assert 0.2 < expected.mean() < 0.8  # both classes present: the comparison means something
        instances = slide.instances[...]
        reference, n = ndimage.label(expected != 0)
        assert_same_partition(instances, reference)
        assert result.n_instances == n
        group = slide.group
        assert {"segmentation", "instances", "tissue"} <= set(
            group["labels"].attrs["ome"]["labels"]
        )
        seg_levels = group["labels/segmentation"]
        assert len(list(seg_levels.array_keys())) == slide.n_levels
        if slide.n_levels > 1:
            np.testing.assert_array_equal(seg_levels["1"][...], classes[::2, ::2])
        meta = seg_levels.attrs["segflow"]
        assert meta["model_uri"] == str(model_file) and meta["mpx_per_s"] > 0
        fractions = np.bincount(expected.ravel(), minlength=2) / expected.size
        np.testing.assert_allclose(result.class_fractions, fractions)
        assert not (store / JOURNAL_DIR).exists()


def test_a_batch_norm_model_segments_as_it_predicts(tmp_path, client):
    """Batch norm's buffers (a 0-d step count among them) are part of the model's identity."""
    torch.manual_seed(0)
    model = UNet(3, 2, base_channels=4, depth=3, dropout=0.0, batch_norm=True)
    model.train()
    with torch.no_grad():  # running statistics of raw 0..255 pixels: not the defaults
        model(torch.rand(4, 3, 92, 92) * 255)
    model.eval()
    path = tmp_path / "bn.pt"
    save_unet(model, path)
    image = smooth_image((130, 150), seed=4)
    store = make_store(tmp_path / "s.zarr", image)
    result = infer_slide(store, path, config(), client)
    assert result.status == "written", result.error
    np.testing.assert_array_equal(
        SlideStore.open(store).segmentation[...], reference_classes(model, image)
    )


def test_background_blocks_are_not_computed(tmp_path, model, model_file, client):
    image = smooth_image((420, 520), seed=3)
    tissue = np.zeros((105, 130), np.uint8)
    tissue[5:20, 10:30] = 1  # level-0 rows 20..80, columns 40..120
    store = make_store(tmp_path / "s.zarr", image, tissue)
    result = infer_slide(store, model_file, config(block_size=104), client)
    classes = SlideStore.open(store).segmentation[...]
    expected = reference_classes(model, image)
    assert result.blocks["background"] > 0 and result.blocks["computed"] > 0
    assert result.blocks["background"] + result.blocks["computed"] == result.blocks["total"]
    np.testing.assert_array_equal(classes[:104, :208], expected[:104, :208])
    assert not classes[208:].any() and expected[208:].any()
    assert result.tissue_fraction == pytest.approx(tissue.mean())


def test_thin_slide_blocks_share_no_chunk(tmp_path, model, model_file, client):
    """40 rows (less than one tile) by 700: square chunks of the block side along x."""
    image = smooth_image((40, 700), seed=10)
    store = make_store(tmp_path / "s.zarr", image)
    result = infer_slide(store, model_file, config(block_size=104), client)
    assert result.blocks["total"] == 7
    seg = SlideStore.open(store).segmentation
    assert seg.chunks == (40, 104)
    np.testing.assert_array_equal(seg[...], reference_classes(model, image))


def test_killed_run_resumes_to_identical_bytes(tmp_path, model_file, client):
    """kill -9 mid-run, run again: only unfinished blocks run; chunks equal an uninterrupted run."""
    store = make_store(tmp_path / "s.zarr", smooth_image((800, 800), seed=4))
    settings = config(block_size=104)
    uninterrupted = infer_slide(
        store, model_file, settings.model_copy(update={"output_dir": tmp_path / "a"}), client
    )
    killed_settings = settings.model_copy(update={"output_dir": tmp_path / "b", "cluster": THREADS})
    script = (
        "import sys\n"
        "from pipelines.infer import InferConfig, infer_slide\n"
        "infer_slide(sys.argv[1], sys.argv[2], InferConfig.model_validate_json(sys.argv[3]))\n"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            script,
            str(store),
            str(model_file),
            killed_settings.model_dump_json(),
        ],
        # The same numeric layout as the resume below: an earlier process cluster in this
        # test process left Dask's one-thread worker environment behind for children.
        env={**os.environ, **dict.fromkeys(THREAD_VARIABLES, str(torch.get_num_threads()))},
    )
    done_dir = tmp_path / "b" / "s.zarr" / JOURNAL_DIR
    deadline = time.monotonic() + 300
    try:
        while len(list(done_dir.glob("*/done/*.json"))) < 5:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no block finished in time"
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    done_at_kill = len(list(done_dir.glob("*/done/*.json")))
    total = uninterrupted.blocks["total"]
    assert 5 <= done_at_kill < total
    lock = json.loads((done_dir / "lock").read_text())
    assert lock["pid"] == proc.pid  # left behind by the dead run: taken over below

    resumed = infer_slide(store, model_file, killed_settings, client)
    # Each block counted once: the resumed ones are not counted again as computed.
    assert resumed.blocks == {
        "total": total,
        "resumed": done_at_kill,
        "computed": total - done_at_kill,
        "background": 0,
    }
    meta = zarr.open_group(tmp_path / "b" / "s.zarr" / "labels" / "segmentation", mode="r")
    assert meta.attrs["segflow"]["blocks"] == resumed.blocks
    a, b = chunk_bytes(tmp_path / "a" / "s.zarr"), chunk_bytes(tmp_path / "b" / "s.zarr")
    assert len(a) > 20 and a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    # A separate output store links its labels to the slide by a relative path.
    label = zarr.open_group(tmp_path / "b" / "s.zarr" / "labels" / "segmentation", mode="r")
    source = label.attrs["ome"]["image-label"]["source"]["image"]
    linked = (tmp_path / "b" / "s.zarr" / "labels" / "segmentation" / source).resolve()
    assert linked == store.resolve()


def test_rerun_is_skipped_and_changed_outputs_are_redone(tmp_path, model_file, client):
    store = make_store(tmp_path / "s.zarr", smooth_image((130, 150), seed=5))
    first = infer_slide(store, model_file, config(), client)
    assert first.status == "written"
    again = infer_slide(store, model_file, config(), client)
    assert again.status == "skipped" and "already segmented" in again.error
    # Where and how the work runs does not change the output: still current.
    elsewhere = infer_slide(store, model_file, config(max_in_flight=1), client)
    assert elsewhere.status == "skipped" and elsewhere.identity == first.identity
    # A setting that changes the bytes written redoes the slide, no overwrite needed.
    other = infer_slide(store, model_file, config(batch_size=2), client)
    assert other.status == "written" and other.identity != first.identity
    recorded = SEGMENTATION_OUTPUT.recorded(store)
    assert recorded.key == other.identity and recorded.settings["batch_size"] == 2
    # So does another model.
    retrained = tmp_path / "retrained.pt"
    save_unet(_expressive_unet(seed=1), retrained)
    replaced = infer_slide(store, retrained, config(batch_size=2), client)
    assert replaced.status == "written" and replaced.identity != other.identity
    forced = infer_slide(store, retrained, config(batch_size=2, overwrite=True), client)
    assert forced.status == "written" and forced.identity == replaced.identity


def test_wrong_model_fails_that_slide_only(tmp_path, model_file, client):
    grey = make_store(tmp_path / "grey.zarr", smooth_image((80, 90), seed=6, channels=1))
    good = make_store(tmp_path / "good.zarr", smooth_image((80, 90), seed=7))
    results = infer_archive(tmp_path, model_file, config(), client)
    assert [(r.name, r.status) for r in results] == [("good", "written"), ("grey", "failed")]
    error = results[1].error
    assert "\n" not in error and str(grey) in error and str(model_file) in error
    assert "3 channels" in error
    assert SlideStore.open(grey).segmentation is None
    assert SlideStore.open(good).segmentation is not None


def test_second_run_on_the_same_output_refuses(tmp_path, model_file, client):
    store = make_store(tmp_path / "s.zarr", smooth_image((80, 90), seed=8))
    lock = store / JOURNAL_DIR / "lock"
    lock.parent.mkdir()
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "start": time.time()}
    lock.write_text(json.dumps(holder))
    with pytest.raises(InferError, match="another inference run holds it"):
        infer_slide(store, model_file, config(), client)
    assert SlideStore.open(store).segmentation is None
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({**holder, "pid": dead.pid}))
    assert infer_slide(store, model_file, config(), client).status == "written"
    assert not lock.exists()


def test_probabilities_match_the_class_map(tmp_path, model, model_file, client):
    image = smooth_image((120, 140), seed=9)
    store = make_store(tmp_path / "s.zarr", image)
    infer_slide(store, model_file, config(probabilities="uint8"), client)
    assert zarr.open_group(store / "probabilities", mode="r").attrs["ome"]["multiscales"]
    probs = zarr.open_array(store / "probabilities" / "0", mode="r")[...]
    classes = SlideStore.open(store).segmentation[...]
    assert probs.shape == (2, 120, 140) and probs.dtype == np.uint8
    assert np.abs(probs.astype(int).sum(0) - 255).max() <= 1
    decided = np.abs(probs[1].astype(int) - probs[0].astype(int)) > 1
    np.testing.assert_array_equal(probs.argmax(0)[decided], classes[decided])
    # A later run without probabilities removes the ones that belonged to the replaced result.
    infer_slide(store, model_file, config(batch_size=2, overwrite=True), client)
    assert not (store / "probabilities").exists()


def test_unreadable_chunk_fails_naming_the_block_and_resumes(tmp_path, model, model_file, client):
    image = smooth_image((300, 300), seed=11)
    store = make_store(tmp_path / "s.zarr", image)
    chunk = store / "0" / "c" / "0" / "2" / "2"  # image rows and columns 256..300
    original = chunk.read_bytes()
    chunk.write_bytes(b"not a compressed chunk")
    with pytest.raises(InferError) as failure:
        infer_slide(store, model_file, config(block_size=104), client)
    message = str(failure.value)
    assert "\n" not in message and message.startswith(str(store)) and "block 2.2" in message
    assert SlideStore.open(store).segmentation is None  # nothing half-written in the store
    chunk.write_bytes(original)
    result = infer_slide(store, model_file, config(block_size=104), client)
    assert result.blocks["resumed"] > 0
    assert result.blocks["total"] == 9  # 3 x 3 blocks of 104
    assert sum(result.blocks[k] for k in ("resumed", "computed", "background")) == 9
    np.testing.assert_array_equal(
        SlideStore.open(store).segmentation[...], reference_classes(model, image)
    )


def test_caller_process_state_is_unchanged(tmp_path, model_file):
    """An in-process cluster runs the model in the caller's process: inference must leave its
    torch threads, cuDNN flag and environment as they were."""
    make_store(tmp_path / "s.zarr", smooth_image((200, 200), seed=9))
    torch.set_num_threads(2)
    before = (torch.get_num_threads(), torch.backends.cudnn.benchmark, dict(os.environ))
    in_process = ClusterConfig(n_workers=2, threads_per_worker=1, processes=False)
    (result,) = infer_archive(tmp_path, model_file, config(cluster=in_process))
    assert result.status == "written", result.error
    assert (torch.get_num_threads(), torch.backends.cudnn.benchmark, dict(os.environ)) == before


def reference_averaged(model: UNet, image: np.ndarray, which: str) -> np.ndarray:
    """Test-time averaging over the whole image: per orientation one whole-image overlap-tile
    pass of the oriented image, softmax, oriented back; the mean over orientations."""
    pixels = torch.from_numpy(image.astype(np.float32))
    total = 0
    for orientation in orientations(which):
        oriented = orientation.apply(pixels).contiguous()
        logits = predict_tiled(model, oriented, tile_size=TILE, batch_size=BATCH)
        total = total + orientation.invert(torch.softmax(logits, dim=0))
    return (total / len(orientations(which))).numpy()


@pytest.mark.parametrize("which", ["flips", "dihedral"])
def test_test_time_averaging_equals_the_whole_image_average(
    tmp_path, model, model_file, client, which
):
    # Odd sizes, several blocks per axis, and a tall slide so transposed plans differ.
    image = smooth_image((331, 205), seed=11)
    store = make_store(tmp_path / "s.zarr", image)
    tta = config(test_time_augmentation=which, block_size=104, probabilities="float16")
    result = infer_slide(store, model_file, tta, client)
    assert result.blocks["total"] > 6
    expected = reference_averaged(model, image, which)
    probabilities = zarr.open_array(store / "probabilities" / "0", mode="r")[...]
    np.testing.assert_allclose(probabilities.astype(np.float32), expected, atol=2e-3)
    classes = SlideStore.open(store).group["labels/segmentation/0"][...]
    decided = np.abs(expected[1] - expected[0]) > 1e-4  # not a tie within float rounding
    np.testing.assert_array_equal(classes[decided], expected.argmax(0)[decided])
    # Averaging changes the output: it is part of the identity, and it does differ.
    plain = reference_classes(model, image)
    assert (plain != expected.argmax(0)).mean() > 0.001
    assert SEGMENTATION_OUTPUT.recorded(store).settings["test_time_augmentation"] == which


def test_orientations_round_trip_and_map_regions():
    image = torch.arange(2 * 5 * 7).reshape(2, 5, 7)
    region = ((1, 4), (2, 6))
    assert len(orientations("dihedral")) == len(set(orientations("dihedral"))) == 8
    for orientation in orientations("dihedral"):
        oriented = orientation.apply(image)
        assert torch.equal(orientation.invert(oriented), image)
        assert tuple(oriented.shape[-2:]) == orientation.shape((5, 7))
        (a0, a1), (c0, c1) = orientation.region(region, (5, 7))
        crop = image[:, region[0][0] : region[0][1], region[1][0] : region[1][1]]
        assert torch.equal(oriented[:, a0:a1, c0:c1], orientation.apply(crop))


def test_foreground_threshold_keeps_only_confident_pixels(tmp_path, model_file, client):
    store = make_store(tmp_path / "s.zarr", smooth_image((120, 140), seed=9))
    strict = config(probabilities="float16", foreground_threshold=0.6)
    infer_slide(store, model_file, strict, client)
    nucleus = zarr.open_array(store / "probabilities" / "0", mode="r")[1].astype(np.float32)
    classes = SlideStore.open(store).segmentation[...]
    decided = np.abs(nucleus - 0.6) > 1e-2  # float16 rounding at the threshold
    np.testing.assert_array_equal(classes[decided], (nucleus > 0.6)[decided])
    assert ((nucleus > 0.5) & (nucleus < 0.58)).any()  # pixels argmax would call foreground


def test_watershed_separation_cuts_the_instances(tmp_path, model_file, client):
    store = make_store(tmp_path / "s.zarr", smooth_image((200, 230), seed=12))
    # The wiring (the cut itself is tested on real touching discs in test_separation.py). A
    # halo wider than the slide: every chunk sees everything, so the cut equals the whole's.
    cut = config(separation="watershed", separation_halo=256, block_size=104)
    result = infer_slide(store, model_file, cut, client)
    slide = SlideStore.open(store)
    classes = slide.group["labels/segmentation/0"][...]
    instances = slide.group["labels/instances/0"][...]
    expected, n = ndimage.label(cut_touching(classes != 0))
    assert result.n_instances == n == result.seams["n_components"]
    # The seam report is kept with the segmentation and shown in the summary.
    recorded = slide.group["labels/segmentation"].attrs["segflow"]["seams"]
    assert recorded == result.seams and recorded["crossing"] > 0
    assert f"{n} objects, {recorded['crossing']} across chunk borders" in seam_line(recorded)
    assert_same_partition(instances, expected)
    assert not (tmp_path / "s.zarr" / "foreground-cut").exists()


def test_export_as_inference_finishes(tmp_path, model_file, client):
    store = make_store(tmp_path / "s.zarr", smooth_image((120, 140), seed=13))
    exporting = config(export=["geojson", "table"])
    result = infer_slide(store, model_file, exporting, client)
    geojson, table = result.exports
    assert geojson == tmp_path / "s.geojson" and table.stem == "s"
    features = json.loads(geojson.read_text())["features"]
    assert len(features) == result.n_instances > 0
    # A current slide keeps its exports; one that went missing is written again.
    stamp = geojson.stat().st_mtime_ns
    again = infer_slide(store, model_file, exporting, client)
    assert again.status == "skipped" and geojson.stat().st_mtime_ns == stamp
    table.unlink()
    infer_slide(store, model_file, exporting, client)
    assert table.exists()


def test_boundary_separation_seeds_from_the_interior_class(tmp_path, model_file, client):
    torch.manual_seed(3)
    three = UNet(3, 3, base_channels=4, depth=3, dropout=0.0).eval()
    with torch.no_grad():
        three.down[0][0].weight /= 255.0
        logits = three(torch.rand(1, 3, 200, 200) * 255)[0]
        three.head.bias -= logits.flatten(1).median(dim=1).values  # every class shows up
    path = tmp_path / "three.pt"
    save_unet(three, path)
    store = make_store(tmp_path / "s.zarr", smooth_image((200, 230), seed=14))
    # A halo wider than the slide: every chunk sees everything, so the split equals the whole's.
    split = config(separation="boundary", separation_halo=256, block_size=104)
    result = infer_slide(store, path, split, client)
    slide = SlideStore.open(store)
    classes = slide.group["labels/segmentation/0"][...]
    assert set(np.unique(classes)) == {0, 1, 2}  # the class map keeps the boundary
    properties = slide.group["labels/segmentation"].attrs["ome"]["image-label"]["properties"]
    assert [p["class"] for p in properties] == ["cell", "boundary"]
    expected, n = ndimage.label(split_at_boundaries(classes))
    assert result.n_instances == n > ndimage.label(classes > 0)[1]
    assert_same_partition(slide.group["labels/instances/0"][...], expected)
    # A model without a boundary class has no seeds to split from: refused in one line.
    binary = make_store(tmp_path / "b.zarr", smooth_image((120, 140), seed=15))
    with pytest.raises(InferError, match="needs a model with a boundary class") as error:
        infer_slide(binary, model_file, split, client)
    assert "\n" not in str(error.value)
