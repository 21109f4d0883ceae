"""Slides read from object storage: a real S3 API (moto in server mode on 127.0.0.1), never a
mock of the client.

Ingesting an archive from an S3 prefix writes stores whose every chunk is byte for byte the
one the same files give when read locally, under the same identity (TIFF and PNG read by
range requests, an SVS slide staged through the bounded local cache); an endpoint that
cannot be reached fails in one line within seconds; `segflow ingest` writes its stores into a
workdir on object storage without a local folder (tests/test_cli_s3.py runs every stage so);
and what segflow does not do on object storage (export, manifests, the demo, MLflow's
embedded store) is refused in one line through the `segflow` command, never turned into a
local folder named `s3:`.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from s3_helpers import CREDENTIALS, new_bucket, objects, upload, write_small_archive
from server_helpers import free_port

from flows.cli import main
from pipelines.cluster import ClusterConfig, dask_client
from pipelines.ingest import IngestConfig, ingest_archive
from pipelines.location import (
    LocationError,
    ObjectStorageConfig,
    ObjectUrl,
    local_path,
    parse_location,
    url_of,
)
from pipelines.runtime import Runtime
from pipelines.sources import find_slides
from pipelines.staging import StagingCache

SEGFLOW = Path(sys.executable).with_name("segflow")
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SMALL = IngestConfig(chunk_size=128, region_chunks=2, min_level_size=128)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """A labelled tiled TIFF slide and a PNG with its mask."""
    return write_small_archive(tmp_path_factory.mktemp("archive"))


@pytest.fixture(scope="module")
def client():
    with dask_client(ClusterConfig(n_workers=1, threads_per_worker=2, processes=False)) as c:
        yield c


def chunk_files(store: Path) -> dict[str, bytes]:
    """Every file of a store but its metadata documents, by relative path."""
    return {
        p.relative_to(store).as_posix(): p.read_bytes()
        for p in sorted(store.rglob("*"))
        if p.is_file() and p.name != "zarr.json"
    }


def assert_same_stores(local: list, remote: list) -> None:
    assert [r.status for r in local] == ["written"] * len(local)
    assert [r.status for r in remote] == ["written"] * len(remote), [r.error for r in remote]
    assert [r.store.name for r in remote] == [r.store.name for r in local]
    for ours, theirs in zip(remote, local, strict=True):
        assert ours.identity == theirs.identity  # the same checksum: not re-ingested if moved
        assert ours.checksum == theirs.checksum
        chunks = chunk_files(ours.store)
        assert len(chunks) > 3
        assert chunks == chunk_files(theirs.store)


def test_ingest_from_s3_equals_local(tmp_path, archive, s3_storage, client):
    prefix = new_bucket(s3_storage) / "archive"
    upload(archive, prefix)
    found = find_slides([prefix])
    assert [str(s.image) for s in found.sources] == [f"{prefix}/p1.png", f"{prefix}/s1.tif"]
    assert [str(s.labels) for s in found.sources] == [
        f"{prefix}/p1_mask.png",
        f"{prefix}/s1_labels.tif",
    ]
    local = ingest_archive(find_slides([archive]).sources, tmp_path / "local", SMALL, client=client)
    remote = ingest_archive(found.sources, tmp_path / "remote", SMALL, client=client)
    assert_same_stores(local, remote)
    assert not (tmp_path / "staged").exists()  # TIFF and PNG are read where they are
    again = ingest_archive(found.sources, tmp_path / "remote", SMALL, client=client)
    assert [r.status for r in again] == ["skipped", "skipped"]


def test_svs_is_staged_and_equals_local(tmp_path, s3_storage, client):
    svs = DATA / "wsi_cmu1_small" / "CMU-1-Small-Region.svs"
    if not svs.is_file():
        pytest.skip(f"{svs} is not available")
    prefix = new_bucket(s3_storage) / "wsi"
    prefix.filesystem().put_file(str(svs), f"{prefix.path}/{svs.name}")
    config = IngestConfig(chunk_size=512, min_level_size=256)
    local = ingest_archive(
        find_slides([svs]).sources, tmp_path / "local" / "stores", config, client=client
    )
    remote_sources = find_slides([prefix]).sources
    remote = ingest_archive(remote_sources, tmp_path / "remote" / "stores", config, client=client)
    assert_same_stores(local, remote)
    staged = list((tmp_path / "remote" / "staged").glob("*/*.svs"))
    assert [p.read_bytes() == svs.read_bytes() for p in staged] == [True]

    tiny = s3_storage.model_copy(update={"stage_cache_mb": 1})
    url = parse_location(str(remote_sources[0].image), tiny)
    failed = ingest_archive(
        find_slides([url]).sources, tmp_path / "tiny" / "stores", config, client=client
    )
    assert failed[0].status == "failed"
    assert failed[0].error == (
        f"{url}: 1.8 MiB does not fit the staging cache of 1.0 MiB in "
        f"{tmp_path / 'tiny' / 'staged'} (raise stage_cache_mb)"
    )


def test_staging_cache_removes_least_recently_used(tmp_path, s3_storage):
    prefix = new_bucket(s3_storage) / "blobs"
    fs = prefix.filesystem()
    for name in ("a.svs", "b.svs", "c.svs"):
        fs.pipe_file(f"{prefix.path}/{name}", bytes(400_000))
    cache = StagingCache(tmp_path / "cache", max_bytes=1_000_000)
    with cache.staged(prefix / "a.svs") as a:
        with cache.staged(prefix / "b.svs"):
            pass
        with cache.staged(prefix / "c.svs") as c:  # b goes: a is in use
            assert a.is_file() and c.is_file()
    assert cache.removed == 1
    assert sorted(p.name for p in cache.copies()) == ["a.svs", "c.svs"]
    with cache.staged(prefix / "a.svs") as again:  # a hit: no download, now the most recent
        assert again == a
    assert cache.copies()[-1] == a


def test_unreachable_endpoint_fails_in_one_line_within_seconds(tmp_path):
    port = free_port()  # nothing listens there
    url = parse_location(
        "s3://segflow/archive",
        ObjectStorageConfig(endpoint_url=f"http://127.0.0.1:{port}", **CREDENTIALS),
    )
    started = time.monotonic()
    with pytest.raises(LocationError) as raised:
        find_slides([url])
    assert time.monotonic() - started < 15
    message = str(raised.value)
    assert message.startswith("s3://segflow/archive: cannot list it (")
    assert "\n" not in message


def run_segflow(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | env
    return subprocess.run(
        [str(SEGFLOW), *args], cwd=cwd, env=environ, capture_output=True, text=True, timeout=120
    )


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("segflow")]


def test_cli_refuses_what_stays_local_without_a_local_s3_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    work = "s3://segflow/work"
    refused = "segflow: error: object storage for {} is not supported yet: {}"
    no_store = (
        f"segflow: error: {work}: a workdir on object storage has no embedded MLflow store; "
        "give --tracking-uri or MLFLOW_TRACKING_URI"
    )
    cases = [
        (
            ["export", "s3://segflow/stores/s1.zarr"],
            refused.format("export", "s3://segflow/stores/s1.zarr"),
        ),
        (["export", "--workdir", work], refused.format("export", f"{work}/stores")),
        (
            ["ingest", "--manifest", "s3://segflow/p.csv"],
            refused.format("manifests", "s3://segflow/p.csv"),
        ),
        (["demo", "--workdir", work], refused.format("the demo's workdir", work)),
        (["train", "--workdir", work], no_store),
        (["infer", "--workdir", work], no_store),
    ]
    for args, line in cases:
        assert main(args) == 2, args
        assert [x for x in capsys.readouterr().err.splitlines() if x.startswith("segflow")] == [
            line
        ]
    assert list(tmp_path.iterdir()) == []  # no ./s3: and no ./segflow-work


def test_cli_reads_the_endpoint_from_the_environment(tmp_path, monkeypatch, capsys):
    port = free_port()  # nothing listens there
    environment = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "eu-west-1",
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert Runtime.from_environment().object_storage == ObjectStorageConfig(
        endpoint_url=f"http://127.0.0.1:{port}", **CREDENTIALS
    )
    code = main(["ingest", "s3://segflow/archive", "--workdir", str(tmp_path / "work")])
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("segflow")]
    assert code == 2
    assert line.startswith("segflow: error: s3://segflow/archive: cannot list it (")
    assert f"127.0.0.1:{port}" in line
    assert not (tmp_path / "work").exists()


@pytest.mark.slow
def test_cli_ingests_an_s3_prefix_into_a_workdir_there(tmp_path, archive, s3_storage, s3_endpoint):
    bucket = new_bucket(s3_storage)
    upload(archive, bucket / "archive")
    cwd, home = tmp_path / "cwd", tmp_path / "prefect-home"
    cwd.mkdir()
    result = run_segflow(
        ["ingest", f"{bucket}/archive", "--workdir", f"{bucket}/work", "chunk_size=128"],
        cwd,
        PREFECT_HOME=str(home),
        AWS_ENDPOINT_URL=s3_endpoint,
        AWS_ACCESS_KEY_ID=CREDENTIALS["key"],
        AWS_SECRET_ACCESS_KEY=CREDENTIALS["secret"],
        AWS_DEFAULT_REGION=CREDENTIALS["region"],
    )
    assert result.returncode == 0, result.stderr
    stored = objects(bucket / "work")
    assert {"stores/p1.zarr/zarr.json", "stores/s1.zarr/zarr.json"} <= set(stored)
    assert list(cwd.iterdir()) == []  # no ./s3: and no local workdir
    assert CREDENTIALS["secret"] not in result.stdout + result.stderr
    # Nothing the run wrote down holds the secret: not the stores, not Prefect's database or
    # the task results it pickled into its storage (base64 inside JSON records), which for a
    # workdir on object storage are local, in Prefect's home.
    secret = CREDENTIALS["secret"].encode()
    assert [key for key, data in stored.items() if secret in data] == []
    written = [p for p in home.rglob("*") if p.is_file()]
    results = list(home.glob("segflow/*/storage/*"))
    assert results and [p for p in written if secret in p.read_bytes()] == []
    pickled = [base64.b64decode(json.loads(p.read_text())["result"]) for p in results]
    assert [record for record in pickled if secret in record] == []


def test_locations_parse_once_and_keep_credentials_out_of_text():
    storage = ObjectStorageConfig(endpoint_url="http://u:pw@127.0.0.1:9", **CREDENTIALS)
    url = parse_location("s3://lab/archive/a.ome.tif", storage)
    assert isinstance(url, ObjectUrl) and url.storage == storage
    assert (str(url), url.name, url.suffix) == ("s3://lab/archive/a.ome.tif", "a.ome.tif", ".tif")
    assert str(url.parent.parent.parent) == "s3://lab"  # a bucket is its own parent
    assert parse_location("file:///data/a.tif") == Path("/data/a.tif")
    assert parse_location("slides/a.tif") == Path("slides/a.tif")
    assert url_of(Path("s3://segflow/work")) == "s3://segflow/work"
    with pytest.raises(LocationError, match="not supported yet: s3://segflow/work$"):
        local_path(Path("s3://segflow/work"))
    with pytest.raises(LocationError, match="^http://x/a.tif: unsupported location"):
        parse_location("http://x/a.tif")
    dumped = Runtime(object_storage=storage).model_dump_json()
    assert "testing-secret" not in dumped and "pw" not in dumped and "***" in dumped
    assert "testing-secret" not in repr(storage) + repr(url)
