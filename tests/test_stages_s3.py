"""Stages writing their stores on object storage (moto in server mode on 127.0.0.1, a real S3
API): ingest into an `s3://` prefix, weight maps and bootstrap labels installed into a store
there. Each output equals the local run's chunk for chunk (every object but the Zarr metadata
documents byte for byte, the documents equal but for their timestamps), a rerun is "skipped",
a failed slide leaves nothing under the prefix, and nothing local is written for an S3 output.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from s3_helpers import new_bucket, objects, upload, write_small_archive

from pipelines.bootstrap import BootstrapConfig, bootstrap_archive
from pipelines.cluster import ClusterConfig, dask_client
from pipelines.ingest import IngestConfig, SlideSource, ingest_archive, ingest_slide
from pipelines.location import ObjectUrl
from pipelines.sources import find_slides
from pipelines.weightmaps import WeightsConfig, compute_weight_maps, recorded_classes
from segcore.bootstrap import ClusteringConfig
from segcore.store import SlideStore
from segcore.synthetic import write_synthetic_slide
from segcore.tissue import TissueConfig

THREADS = ClusterConfig(n_workers=1, threads_per_worker=2, processes=False)
SMALL = IngestConfig(chunk_size=128, region_chunks=2, min_level_size=128)
#: What differs between two writes of the same output: when each was written.
TIMESTAMPS = {"written_at", "ingested_at"}


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """A labelled tiled TIFF slide and a PNG with its mask."""
    return write_small_archive(tmp_path_factory.mktemp("archive"))


@pytest.fixture(scope="module")
def client():
    with dask_client(THREADS) as c:
        yield c


def _untimed(document: object) -> object:
    """A Zarr metadata document without its timestamps, at any depth."""
    if isinstance(document, dict):
        return {k: _untimed(v) for k, v in document.items() if k not in TIMESTAMPS}
    if isinstance(document, list):
        return [_untimed(v) for v in document]
    return document


def local_objects(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_same_output(remote: ObjectUrl, local: Path) -> None:
    """Every object under `remote` equals the file at the same place under `local`: data byte
    for byte, metadata documents but for their timestamps; neither has anything more."""
    ours, theirs = objects(remote), local_objects(local)
    assert sorted(ours) == sorted(theirs)
    assert sum(1 for key in ours if not key.endswith("zarr.json")) > 3
    for key, content in ours.items():
        if key.endswith("zarr.json"):
            assert _untimed(json.loads(content)) == _untimed(json.loads(theirs[key])), key
        else:
            assert content == theirs[key], key


def test_ingest_and_weights_on_s3_equal_local(tmp_path, archive, s3_storage, client, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a local folder made from the URL (./s3:) would land here
    sources = find_slides([archive]).sources
    local = ingest_archive(sources, tmp_path / "local", SMALL, client=client)
    bucket = new_bucket(s3_storage)
    # The URL's text, reached with the configuration's storage settings.
    config = SMALL.model_copy(update={"object_storage": s3_storage})
    remote = ingest_archive(sources, f"{bucket}/stores", config, client=client)
    assert [r.status for r in local] == ["written", "written"]
    assert [r.status for r in remote] == ["written", "written"], [r.error for r in remote]
    for ours, theirs in zip(remote, local, strict=True):
        assert isinstance(ours.store, ObjectUrl)
        assert str(ours.store) == f"{bucket}/stores/{theirs.store.name}"
        assert (ours.identity, ours.checksum, ours.shape) == (
            theirs.identity,
            theirs.checksum,
            theirs.shape,
        )
        assert ours.mb_written == pytest.approx(theirs.mb_written, rel=0.01)
        assert_same_output(ours.store, theirs.store)

    weights = WeightsConfig(block_size=128)
    for ours, theirs in zip(remote, local, strict=True):
        written = [compute_weight_maps(r.store, weights, client) for r in (ours, theirs)]
        assert [w.status for w in written] == ["written", "written"], [w.error for w in written]
        assert written[0].identity == written[1].identity
        assert written[0].class_counts == written[1].class_counts
        assert_same_output(ours.store, theirs.store)  # training/ and the root's metadata
        assert recorded_classes(ours.store) == ("background", "cell")
        stored = SlideStore.open(ours.store)
        stored.verified(stored.weight)  # every chunk listed under the prefix

    again = ingest_archive(sources, f"{bucket}/stores", config, client=client)
    assert [r.status for r in again] == ["skipped", "skipped"]
    assert compute_weight_maps(remote[0].store, weights, client).status == "skipped"
    # Only the two stores: no temporaries, no probes left behind.
    names = {key.split("/")[1] for key in objects(bucket)}
    assert names == {"p1.zarr", "s1.zarr"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local"]


def test_a_failed_slide_leaves_nothing_under_the_prefix(tmp_path, s3_storage, client, monkeypatch):
    """A white slide fails at its tissue mask, after its pixels were written to S3."""
    monkeypatch.chdir(tmp_path)
    white = tmp_path / "white.png"
    Image.fromarray(np.full((300, 300, 3), 245, np.uint8)).save(white)
    prefix = new_bucket(s3_storage) / "stores"
    (result,) = ingest_archive([SlideSource(image=white)], prefix, SMALL, client=client)
    assert result.status == "failed"
    assert result.error.startswith(f"{white}: empty slide") and "\n" not in result.error
    assert objects(prefix.parent) == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["white.png"]


def test_bootstrap_labels_on_s3_equal_local(tmp_path, s3_storage, client, monkeypatch):
    monkeypatch.chdir(tmp_path)
    slide = write_synthetic_slide(
        tmp_path / "s.tif", tmp_path / "s_labels.tif", 128, 192, seed=5, tile=64
    )
    ingest = IngestConfig(chunk_size=64, min_level_size=32, tissue=TissueConfig(max_size=96))
    plain = ingest_slide(SlideSource(image=slide.image_path), tmp_path / "local", ingest, client)
    remote = new_bucket(s3_storage) / "stores" / "s.zarr"
    upload(plain.store, remote)
    config = BootstrapConfig(
        clustering=ClusteringConfig(channels=8, n_clusters=8, max_iterations=10, min_labels=3),
        tile_size=64,
        n_tiles=2,
        block_size=64,
        cluster=THREADS,
    )
    results = [
        bootstrap_archive([store], config, client=client)[0] for store in (remote, plain.store)
    ]
    assert [r.status for r in results] == ["written", "written"], [r.error for r in results]
    assert results[0].identity == results[1].identity
    assert results[0].nucleus == results[1].nucleus
    assert_same_output(remote, plain.store)
    assert bootstrap_archive([remote], config, client=client)[0].status == "skipped"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local", "s.tif", "s_labels.tif"]
