"""Inference of slide stores on object storage (moto in server mode): the chunks a local run
writes, a current output skipped, a killed run resumed from its journal and lock there."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from s3_helpers import new_bucket, objects, upload

from pipelines.cluster import ClusterConfig, dask_client
from pipelines.infer import InferConfig, InferError, infer_archive, infer_slide
from pipelines.inference.journal import JOURNAL_DIR
from pipelines.ingest import IngestConfig, ingest_slide
from pipelines.location import ObjectUrl
from pipelines.sources import find_slides
from pipelines.storage import exists
from segcore.store import SlideStore
from segcore.synthetic import write_synthetic_slide

TILE, BATCH = 92, 3  # depth 3: 92 px in, 52 out, stride 52
THREADS = ClusterConfig(n_workers=1, threads_per_worker=2, processes=False)
#: What Dask's process clusters set to 1 for their workers, in this process's environment too.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
LABELS = ("labels/segmentation", "labels/instances")
#: Attributes that say when a run happened, not what it wrote.
TIMES = {"started", "finished", "seconds", "mpx_per_s", "written_at"}


@pytest.fixture(scope="module")
def client():
    with dask_client(THREADS) as c:
        yield c


def config(**overrides) -> InferConfig:
    base = {"tile_size": TILE, "batch_size": BATCH, "block_size": 104, "progress": False}
    return InferConfig(**{**base, **overrides})


def ingested(folder: Path, size: int) -> Path:
    """A synthetic slide ingested into `folder/stores/s.zarr` (chunks of 128 px)."""
    write_synthetic_slide(folder / "s.tif", folder / "s_labels.tif", size, size, seed=1, tile=128)
    (source,) = find_slides([folder / "s.tif"]).sources
    result = ingest_slide(source, folder / "stores", IngestConfig(chunk_size=128))
    assert result.status == "written", result.error
    return folder / "stores" / "s.zarr"


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    return ingested(tmp_path_factory.mktemp("slide"), 256)


def local_objects(store: Path) -> dict[str, bytes]:
    return {
        p.relative_to(store).as_posix(): p.read_bytes()
        for p in sorted(store.rglob("*"))
        if p.is_file()
    }


def labels_of(files: dict[str, bytes]) -> tuple[dict[str, bytes], dict[str, dict]]:
    """(chunks, metadata attributes less the run's times) of the segmentation and instances."""
    chunks, attributes = {}, {}
    for key, data in files.items():
        if not key.startswith(LABELS):
            continue
        if key.endswith("zarr.json"):
            attrs = json.loads(data).get("attributes", {})
            segflow = {k: v for k, v in attrs.get("segflow", {}).items() if k not in TIMES}
            attributes[key] = {**attrs, "segflow": segflow}
        else:
            chunks[key] = data
    return chunks, attributes


def assert_same_labels(local: dict[str, bytes], remote: dict[str, bytes]) -> None:
    (a, a_attrs), (b, b_attrs) = labels_of(local), labels_of(remote)
    assert len(a) > 10 and a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    assert a_attrs == b_attrs


def test_a_store_on_s3_gets_the_local_runs_chunks(
    tmp_path, monkeypatch, slide, untrained_rgb_unet, s3_storage, client
):
    monkeypatch.chdir(tmp_path)  # nothing of an S3 output may appear here
    local = tmp_path / "local" / "s.zarr"
    shutil.copytree(slide, local)
    bucket = new_bucket(s3_storage)
    remote = bucket / "stores" / "s.zarr"
    upload(slide, remote)

    ran = infer_slide(local, untrained_rgb_unet, config(), client)
    (result,) = infer_archive(bucket / "stores", untrained_rgb_unet, config(), client)
    assert result.store == remote and result.output == remote
    assert result.status == "written" and result.identity == ran.identity
    assert result.blocks == ran.blocks and result.blocks["total"] == 9
    assert result.n_instances == ran.n_instances
    assert_same_labels(local_objects(local), objects(remote))
    assert not exists(remote / JOURNAL_DIR)
    labelled = SlideStore.open(remote)
    assert set(labelled.group["labels"].attrs["ome"]["labels"]) >= {"segmentation", "instances"}

    again = infer_slide(remote, untrained_rgb_unet, config(), client)
    assert again.status == "skipped" and again.identity == result.identity
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local"]


def test_an_output_that_cannot_link_to_its_slide_is_refused(
    tmp_path, slide, untrained_rgb_unet, s3_storage, client
):
    bucket, other = new_bucket(s3_storage), new_bucket(s3_storage)
    remote = bucket / "s.zarr"
    upload(slide, remote)
    cases = ((remote, other / "out"), (slide, bucket / "out"), (remote, tmp_path / "out"))
    for store, output_dir in cases:
        with pytest.raises(InferError) as failure:
            infer_slide(store, untrained_rgb_unet, config(output_dir=output_dir), client)
        message = str(failure.value)
        assert "\n" not in message and message.startswith(str(store))
        assert "same bucket as the slide store" in message
    assert objects(other) == {} and not exists(bucket / "out") and not exists(tmp_path / "out")


def _done_markers(journal: ObjectUrl) -> int:
    return sum("/done/" in key for key in journal.filesystem().find(journal.path))


@pytest.mark.slow
def test_a_run_killed_on_s3_resumes_to_the_same_chunks(
    tmp_path, untrained_rgb_unet, s3_storage, s3_endpoint, client
):
    """kill -9 mid-run on S3, run again: the dead holder's lock is taken, only unfinished
    blocks run, and the chunks equal an uninterrupted run's."""
    slide = ingested(tmp_path, 700)
    bucket = new_bucket(s3_storage)
    remote = bucket / "stores" / "s.zarr"
    upload(slide, remote)
    uninterrupted = infer_slide(
        slide, untrained_rgb_unet, config(output_dir=tmp_path / "a"), client
    )
    settings = config(output_dir=bucket / "b")
    script = (
        "import os, sys\n"
        "from pipelines.infer import InferConfig, infer_slide\n"
        "from pipelines.location import ObjectStorageConfig, parse_location\n"
        "storage = ObjectStorageConfig(endpoint_url=os.environ['AWS_ENDPOINT_URL'],\n"
        "    key=os.environ['AWS_ACCESS_KEY_ID'], secret=os.environ['AWS_SECRET_ACCESS_KEY'])\n"
        "config = InferConfig.model_validate_json(sys.argv[3])\n"
        "config.output_dir = parse_location(str(config.output_dir), storage)\n"
        "infer_slide(parse_location(sys.argv[1], storage), sys.argv[2], config)\n"
    )
    credentials = {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": s3_storage.key,
        "AWS_SECRET_ACCESS_KEY": s3_storage.secret,
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(remote), str(untrained_rgb_unet)]
        + [settings.model_dump_json()],
        # The parent's numeric layout (an earlier process cluster may have set these to 1).
        env={
            **os.environ,
            **credentials,
            **dict.fromkeys(THREAD_VARIABLES, str(torch.get_num_threads())),
        },
    )
    output = bucket / "b" / "s.zarr"
    journal = output / JOURNAL_DIR
    deadline = time.monotonic() + 300
    try:
        while not exists(journal) or _done_markers(journal) < 5:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no block finished in time"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    done_at_kill = _done_markers(journal)
    total = uninterrupted.blocks["total"]
    assert 5 <= done_at_kill < total
    holder = json.loads(journal.filesystem().cat_file((journal / "lock").path))
    assert holder["pid"] == proc.pid  # left behind by the dead run: taken over below

    resumed = infer_slide(remote, untrained_rgb_unet, settings, client)
    assert resumed.status == "written"
    assert resumed.blocks["resumed"] == done_at_kill
    assert resumed.blocks["computed"] + resumed.blocks["background"] == total - done_at_kill
    files = objects(output)
    label = json.loads(files["labels/segmentation/zarr.json"])["attributes"]
    assert label["segflow"]["blocks"] == resumed.blocks
    # Labels in another prefix of the bucket link to the slide by a relative key.
    assert label["ome"]["image-label"]["source"]["image"] == "../../../../stores/s.zarr"
    assert not exists(journal)
    a = {k: v for k, v in local_objects(tmp_path / "a" / "s.zarr").items()}
    assert_same_labels(
        {k: v for k, v in a.items() if not k.endswith("zarr.json")},
        {k: v for k, v in files.items() if not k.endswith("zarr.json")},
    )
