"""pipelines.ingest: real slides become valid OME-Zarr slide stores equal to their sources, reruns
skip unchanged slides, and bad input fails with one line naming the file and leaves nothing."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Multiscales, Reader
from PIL import Image
from scipy import ndimage

from pipelines.cluster import ClusterConfig, dask_client
from pipelines.config import load_config
from pipelines.ingest import IngestConfig, ingest_archive, ingest_slide
from pipelines.sources import IngestError, SlideSource, discover_sources, expand_pages
from segcore import ngff
from segcore.store import SlideStore

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SMALL = IngestConfig(chunk_size=128, region_chunks=2, min_level_size=128)


def data(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not available")
    return path


@pytest.fixture(scope="module")
def client():
    with dask_client(ClusterConfig(n_workers=1, threads_per_worker=2, processes=False)) as c:
        yield c


def assert_same_partition(ours: np.ndarray, reference: np.ndarray) -> None:
    """Same background and a one-to-one map between our instance ids and the reference's."""
    np.testing.assert_array_equal(ours == 0, reference == 0)
    fg = reference != 0
    pairs = np.unique(np.stack([ours[fg], reference[fg]]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


def assert_pyramid(levels: list, method: ngff.Method) -> None:
    """Every level is the 2x downsampling of the level above it."""
    for upper, lower in zip(levels, levels[1:], strict=False):
        np.testing.assert_array_equal(lower[...], ngff.downsample2(upper[...], method))


def ome_nodes(store: Path) -> dict[str, list[tuple]]:
    """Shapes of every multiscale node ome-zarr's reader finds, by node name."""
    nodes = {}
    for node in Reader(parse_url(str(store)))():
        if node.load(Multiscales) is not None:
            kind = "label" if node.load(Label) is not None else "image"
            name = Path(str(node.zarr.path).rstrip("/")).name
            nodes[f"{kind}:{name}"] = [d.shape for d in node.data]
    return nodes


def test_isbi_stack_pages_become_stores(tmp_path, client):
    image, labels = data("isbi2012_em", "train-volume.tif"), data("isbi2012_em", "train-labels.tif")
    pages = expand_pages(SlideSource(image=image, labels=labels))
    assert [p.page for p in pages] == list(range(30))
    chosen = [pages[0], pages[29]]
    results = ingest_archive(chosen, tmp_path, SMALL, client=client)
    assert [r.status for r in results] == ["written", "written"]
    assert [r.store.name for r in results] == ["train-volume-p000.zarr", "train-volume-p029.zarr"]
    for page, result in zip((0, 29), results, strict=True):
        store = SlideStore.open(result.store)
        np.testing.assert_array_equal(store.image(0)[0], tifffile.imread(image, key=page))
        cells = tifffile.imread(labels, key=page) == 255  # ISBI: 255 = cell, 0 = membrane
        annotations = store.annotations[...]
        assert annotations.dtype == np.uint32
        assert_same_partition(annotations, ndimage.label(cells)[0])
        assert store.metadata["labels"]["kind"] == "binary"
        assert store.metadata["labels"]["n_instances"] == annotations.max() > 50
        assert store.tissue[...].all()  # EM: no glass, everything is tissue
        assert store.n_levels == 3 and result.shape == (1, 512, 512)
        label_group = zarr.open_group(result.store / "labels" / "annotations")
        assert_pyramid([label_group[str(k)] for k in range(3)], "nearest")
        assert ome_nodes(result.store) == {
            "image:" + result.store.name: [(1, 512, 512), (1, 256, 256), (1, 128, 128)],
            "label:annotations": [(512, 512), (256, 256), (128, 128)],
            "label:tissue": [(512, 512), (256, 256), (128, 128)],
        }


def test_isbi_png_pair_in_many_chunks(tmp_path):
    image = data("isbi2012_em", "train", "image", "7.png")
    labels = data("isbi2012_em", "train", "label", "7.png")
    result = ingest_slide(SlideSource(image=image, labels=labels), tmp_path, SMALL)
    store = SlideStore.open(result.store)
    assert result.store.name == "7.zarr"
    np.testing.assert_array_equal(store.image(0)[0], np.asarray(Image.open(image)))
    assert store.image(0).chunks == (1, 128, 128)
    assert_pyramid([store.image(k) for k in range(store.n_levels)], "mean")
    # Components across 16 chunks equal whole-image labelling.
    assert_same_partition(
        store.annotations[...], ndimage.label(np.asarray(Image.open(labels)) > 0)[0]
    )


def test_openslide_slide_equals_its_source(tmp_path, client):
    path = data("wsi_cmu1_small", "CMU-1-Small-Region.svs")
    config = IngestConfig(chunk_size=512, region_chunks=1, min_level_size=600)
    result = ingest_slide(SlideSource(image=path), tmp_path, config, client)
    store = SlideStore.open(result.store)
    with openslide.OpenSlide(path) as slide:
        expected = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    np.testing.assert_array_equal(np.moveaxis(store.image(0)[...], 0, -1), expected)
    meta = store.metadata
    assert meta["mpp"] == pytest.approx(0.499)
    assert meta["source"] == str(path) and meta["source_bytes"] == path.stat().st_size
    assert meta["tissue_downsample"] == 2 and 0.2 < meta["tissue_fraction"] < 0.6
    assert store.tissue.shape == (1484, 1110) and store.annotations is None
    assert meta["segflow_version"] and meta["identity"]["settings"] == config.settings()
    assert len(meta["checksum"]) == 64
    assert_pyramid([store.image(k) for k in range(store.n_levels)], "mean")
    assert ome_nodes(result.store)["image:" + result.store.name] == [
        (3, 2967, 2220),
        (3, 1484, 1110),
        (3, 742, 555),
    ]
    scale = store.group.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    assert scale[0]["scale"] == pytest.approx([1.0, 0.499, 0.499])


def test_two_level_svs_ingests_level_zero(tmp_path, client):
    path = data("wsi_tcga_cr7395", "tcga-cr-7395-01a-01-ts1.svs")
    result = ingest_slide(SlideSource(image=path), tmp_path, IngestConfig(), client)
    store = SlideStore.open(result.store)
    assert store.shape == (3, 3567, 4443) and store.n_levels == 3
    assert store.metadata["mpp"] is None
    with openslide.OpenSlide(path) as slide:
        corner = np.asarray(slide.read_region((4000, 3000), 0, (443, 567)).convert("RGB"))
    np.testing.assert_array_equal(np.moveaxis(store.image(0)[:, 3000:, 4000:], 0, -1), corner)
    assert 0.4 < store.metadata["tissue_fraction"] < 0.9


def test_dsb_instance_mask_and_uint16_image(tmp_path):
    image, mask = data("dsb2018_stardist", "img2d.tif"), data("dsb2018_stardist", "mask2d.tif")
    result = ingest_slide(SlideSource(image=image, labels=mask), tmp_path, SMALL)
    store = SlideStore.open(result.store)
    assert store.image(0).dtype == np.uint16
    np.testing.assert_array_equal(store.image(0)[0], tifffile.imread(image))
    np.testing.assert_array_equal(store.annotations[...], tifffile.imread(mask))  # ids kept
    assert store.metadata["labels"]["kind"] == "instances"


def test_monuseg_lzw_tiff_with_binary_png_mask(tmp_path):
    name = "TCGA-CH-5767-01Z-00-DX1"
    image = data("monuseg_sample", "images", f"{name}.tif")
    mask = data("monuseg_sample", "binary_masks", f"{name}.png")
    result = ingest_slide(
        SlideSource(image=image, labels=mask), tmp_path, IngestConfig(chunk_size=256)
    )
    store = SlideStore.open(result.store)
    np.testing.assert_array_equal(np.moveaxis(store.image(0)[...], 0, -1), tifffile.imread(image))
    reference, n = ndimage.label(np.asarray(Image.open(mask)) > 0)
    assert_same_partition(store.annotations[...], reference)
    assert store.metadata["labels"]["n_instances"] == n > 150


def test_synthetic_slide_ingests_like_any_slide(tmp_path):
    synthetic = pytest.importorskip("segcore.synthetic")
    slide = synthetic.write_synthetic_slide(
        tmp_path / "syn.tif", tmp_path / "syn_labels.tif", 1100, 1500, seed=3, tile=256
    )
    (source,) = discover_sources(tmp_path)
    assert source == SlideSource(image=slide.image_path, labels=slide.labels_path)
    result = ingest_slide(
        source, tmp_path / "out", IngestConfig(chunk_size=256, min_level_size=256)
    )
    store = SlideStore.open(result.store)
    expected = tifffile.imread(slide.image_path, level=0)
    np.testing.assert_array_equal(np.moveaxis(store.image(0)[...], 0, -1), expected)
    np.testing.assert_array_equal(
        store.annotations[...], tifffile.imread(slide.labels_path, level=0)
    )
    assert store.metadata["mpp"] == pytest.approx(0.5)
    assert 0.05 < store.metadata["tissue_fraction"] < 1.0  # it has glass around the tissue
    assert store.n_levels == 4  # 1100 -> 550 -> 275 -> 138 px on the short side


def test_rerun_skips_unchanged_and_rewrites_on_change(tmp_path):
    image = tmp_path / "src" / "slide.png"
    image.parent.mkdir()
    shutil.copy(data("isbi2012_em", "train", "image", "3.png"), image)
    source = SlideSource(image=image)
    first = ingest_slide(source, tmp_path / "out", SMALL)
    assert first.status == "written" and first.mb_written > 0
    again = ingest_slide(source, tmp_path / "out", SMALL)
    assert again.status == "skipped" and again.checksum == first.checksum
    assert again.shape == first.shape
    changed = ingest_slide(source, tmp_path / "out", SMALL.model_copy(update={"chunk_size": 64}))
    assert changed.status == "written"
    assert SlideStore.open(changed.store).image(0).chunks == (1, 64, 64)
    forced = SMALL.model_copy(update={"chunk_size": 64, "overwrite": True})
    assert ingest_slide(source, tmp_path / "out", forced).status == "written"
    labels = tmp_path / "src" / "slide_labels.png"
    shutil.copy(data("isbi2012_em", "train", "label", "3.png"), labels)
    with_labels = ingest_slide(SlideSource(image=image, labels=labels), tmp_path / "out", forced)
    assert with_labels.status == "written" and with_labels.checksum != first.checksum
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["slide.zarr"]


def test_failed_rerun_keeps_the_previous_store(tmp_path):
    image = data("isbi2012_em", "train", "image", "3.png")
    labels = tmp_path / "3_labels.png"
    shutil.copy(data("isbi2012_em", "train", "label", "3.png"), labels)
    good = ingest_slide(SlideSource(image=image, labels=labels), tmp_path / "out", SMALL)
    before = SlideStore.open(good.store).annotations[...]
    Image.fromarray(np.zeros((100, 120), np.uint8)).save(labels)
    with pytest.raises(IngestError, match="label image is 100 x 120 px"):
        ingest_slide(SlideSource(image=image, labels=labels), tmp_path / "out", SMALL)
    np.testing.assert_array_equal(SlideStore.open(good.store).annotations[...], before)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["3.zarr"]


def test_stale_temporary_store_is_removed(tmp_path):
    out = tmp_path / "out"
    dead = out / ".0.zarr.tmp-999999999-0badf00d"  # no such process
    dead.mkdir(parents=True)
    (dead / "junk").write_text("half-written")
    alive = out / f".0.zarr.tmp-{os.getppid()}-00c0ffee"  # another live run's work: left alone
    alive.mkdir()
    # Another thread of this very process (a flow ingests slides on threads): also left alone.
    sibling = out / f".0.zarr.tmp-{os.getpid()}-0000beef"
    sibling.mkdir()
    ingest_slide(SlideSource(image=data("isbi2012_em", "train", "image", "0.png")), out, SMALL)
    assert not dead.exists() and alive.exists() and sibling.exists()
    assert (out / "0.zarr").is_dir()


def _float_labels(d: Path) -> SlideSource:
    tifffile.imwrite(d / "f.tif", np.ones((512, 512), np.float32))
    return SlideSource(image=data("isbi2012_em", "train", "image", "0.png"), labels=d / "f.tif")


def _negative_labels(d: Path) -> SlideSource:
    ids = np.zeros((512, 512), np.int16)
    ids[300, 400] = -3
    tifffile.imwrite(d / "n.tif", ids)
    return SlideSource(image=data("isbi2012_em", "train", "image", "0.png"), labels=d / "n.tif")


def _wrong_shape_labels(d: Path) -> SlideSource:
    Image.fromarray(np.zeros((100, 120), np.uint8)).save(d / "w.png")
    return SlideSource(image=data("isbi2012_em", "train", "image", "0.png"), labels=d / "w.png")


def _file(name: str, content: bytes) -> Callable[[Path], SlideSource]:
    def make(d: Path) -> SlideSource:
        (d / name).write_bytes(content)
        return SlideSource(image=d / name)

    return make


def _truncated(parts: tuple[str, ...], name: str) -> Callable[[Path], SlideSource]:
    def make(d: Path) -> SlideSource:
        src = data(*parts).read_bytes()
        (d / name).write_bytes(src[: len(src) // 2])
        return SlideSource(image=d / name)

    return make


def _white_slide(d: Path) -> SlideSource:
    Image.fromarray(np.full((64, 64, 3), 245, np.uint8)).save(d / "white.png")
    return SlideSource(image=d / "white.png")


GARBAGE = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()


@pytest.mark.parametrize(
    ("make", "culprit", "message"),
    [
        (_truncated(("dsb2018_stardist", "img2d.tif"), "cut.tif"), "image", "truncated TIFF"),
        (
            _truncated(("wsi_cmu1_small", "CMU-1-Small-Region.svs"), "cut.svs"),
            "image",
            "truncated or corrupt TIFF",
        ),
        (_file("garbage.svs", GARBAGE), "image", "not a readable .svs slide"),
        (_file("empty.tif", b""), "image", "empty file (0 bytes)"),
        (_file("slide.bmp", b"BM" + GARBAGE), "image", "unsupported format '.bmp'"),
        (_file("corrupt.png", b"\x89PNG\r\n\x1a\n" + GARBAGE), "image", "cannot decode image"),
        (_wrong_shape_labels, "labels", "label image is 100 x 120 px but the slide"),
        (_float_labels, "labels", "non-integer labels (dtype float32)"),
        (_negative_labels, "labels", "negative label -3"),
        (_white_slide, "image", "empty slide"),
    ],
)
def test_bad_input_fails_with_one_line_and_leaves_nothing(tmp_path, make, culprit, message):
    source = make(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(IngestError) as info:
        ingest_slide(source, out, SMALL)
    text = str(info.value)
    assert text.startswith(str(getattr(source, culprit)) + ": ")
    assert message in text and "\n" not in text
    assert list(out.iterdir()) == []


def test_one_bad_slide_does_not_stop_the_archive(tmp_path, client):
    good = [data("isbi2012_em", "train", "image", f"{i}.png") for i in (1, 2)]
    bad = tmp_path / "bad.svs"
    bad.write_bytes(GARBAGE)
    sources = [SlideSource(image=good[0]), SlideSource(image=bad), SlideSource(image=good[1])]
    results = ingest_archive(sources, tmp_path / "out", SMALL, client=client)
    assert [r.status for r in results] == ["written", "failed", "written"]
    assert results[1].error.startswith(f"{bad}: not a readable .svs slide")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["1.zarr", "2.zarr"]
    twice = ingest_archive(sources[:1] * 2, tmp_path / "out", SMALL, client=client)
    # Two sources of one store name: neither is written, each error names both sources.
    assert [r.status for r in twice] == ["failed", "failed"]
    assert all(f"store name 1.zarr is shared by {good[0]}, {good[0]}" in r.error for r in twice)


def test_process_cluster_workers_open_their_own_readers(tmp_path):
    """Tasks pickle paths and Zarr arrays, never open readers, so worker processes work."""
    image = data("monuseg_sample", "images", "TCGA-B0-5710-01Z-00-DX1.tif")
    config = IngestConfig(
        chunk_size=256,
        region_chunks=1,
        cluster=ClusterConfig(n_workers=2, threads_per_worker=1, processes=True),
    )
    (result,) = ingest_archive([SlideSource(image=image)], tmp_path, config)
    assert result.status == "written", result.error
    store = SlideStore.open(result.store)
    np.testing.assert_array_equal(np.moveaxis(store.image(0)[...], 0, -1), tifffile.imread(image))


def test_discover_sources_pairs_labels_and_expands_stacks(tmp_path):
    png = np.zeros((16, 16), np.uint8)
    for name in ("a.png", "a_labels.png", "b.tif", "c.jpg", "c_mask.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    Image.fromarray(png).save(tmp_path / "b.tif")
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "b.png").write_bytes(b"")
    tifffile.imwrite(
        tmp_path / "stack.tif", np.zeros((3, 16, 16), np.uint8), photometric="minisblack"
    )
    sources = discover_sources(tmp_path)
    assert sources == [
        SlideSource(image=tmp_path / "a.png", labels=tmp_path / "a_labels.png"),
        SlideSource(image=tmp_path / "b.tif", labels=tmp_path / "labels" / "b.png"),
        SlideSource(image=tmp_path / "c.jpg", labels=tmp_path / "c_mask.png"),
        *[SlideSource(image=tmp_path / "stack.tif", page=p) for p in range(3)],
    ]
    isbi = discover_sources(data("isbi2012_em", "train", "image"))
    assert len(isbi) == 30
    assert isbi[0].labels == data("isbi2012_em", "train", "label", "0.png")


def test_config_from_yaml_with_overrides(tmp_path):
    (tmp_path / "ingest.yaml").write_text("chunk_size: 512\ntissue:\n  dilation_px: 5\n")
    config = load_config(
        IngestConfig, tmp_path / "ingest.yaml", ["compression.codec=zstd", "cluster.n_workers=3"]
    )
    assert config.chunk_size == 512 and config.tissue.dilation_px == 5
    assert config.compression == ngff.Compression(codec="zstd", level=1)
    assert config.cluster.n_workers == 3
    assert "cluster" not in config.settings() and config.settings()["chunk_size"] == 512
