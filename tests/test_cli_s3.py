"""`segflow` with its workdir on object storage, against a real S3 API (moto in server mode on
127.0.0.1, never a mock of the client): ingest from an S3 prefix, weight maps, training and
inference with `--workdir s3://…` each exit 0, their stores equal those of the same commands
run with a local workdir, chunk for chunk, a rerun is answered from the cache, and nothing is
written under the current directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import prefect.settings
import pytest
from flow_helpers import prefect_api
from s3_helpers import CREDENTIALS, new_bucket, objects, upload

from flows.cli import main
from segcore.synthetic import write_synthetic_slide

INGEST = ["chunk_size=128", "min_level_size=64", "cluster.processes=false"]
WEIGHTS = ["block_size=128", "cluster.processes=false"]
TRAIN = [
    "model.base_channels=4",
    "model.depth=3",
    "max_steps=4",
    "steps_per_epoch=2",
    "output_size=64",
    "num_workers=0",
    "checkpoint_every=2",
]
INFER = ["tile_size=124", "block_size=128", "cluster.processes=false"]
#: What a store records of when and how fast it was written: not part of what it holds.
TIMINGS = frozenset({"written_at", "started", "finished", "seconds", "mpx_per_s"})


@pytest.fixture
def s3_environment(monkeypatch, s3_endpoint):
    """The standard variables, as a user sets them to reach the endpoint."""
    for name, value in {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": CREDENTIALS["key"],
        "AWS_SECRET_ACCESS_KEY": CREDENTIALS["secret"],
        "AWS_DEFAULT_REGION": CREDENTIALS["region"],
    }.items():
        monkeypatch.setenv(name, value)


def segflow(capsys, *argv: str) -> str:
    """Run one command in this process; its stdout, after checking that it exited 0."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, f"segflow {' '.join(argv)}: exit {code}\n{err}"
    return out


def files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by path relative to it (as `objects` names a prefix's)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def without_timings(value: object) -> object:
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def assert_same_stores(local: dict[str, bytes], remote: dict[str, bytes]) -> None:
    """Every chunk byte for byte; the metadata documents equal but for their timings."""
    assert sorted(remote) == sorted(local)
    for key, data in local.items():
        if Path(key).name == "zarr.json":
            assert without_timings(json.loads(remote[key])) == without_timings(json.loads(data))
        else:
            assert remote[key] == data, key


@pytest.mark.slow  # two workdirs through four commands, a training each
def test_stage_commands_with_the_workdir_on_s3_equal_a_local_run(
    tmp_path, monkeypatch, capsys, s3_storage, s3_environment
):
    archive = tmp_path / "archive"
    archive.mkdir()
    write_synthetic_slide(archive / "s.tif", archive / "s_labels.tif", 256, 256, seed=6)
    bucket = new_bucket(s3_storage)
    upload(archive, bucket / "archive")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    home = tmp_path / "prefect-home"  # where a workdir on S3 keeps Prefect's local state
    runs = {
        "local": (str(tmp_path / "local"), f"sqlite:///{tmp_path / 'local.db'}"),
        "s3": (f"{bucket}/work", f"sqlite:///{tmp_path / 'mlflow.db'}"),
    }
    with (
        prefect_api(),
        prefect.settings.temporary_settings({prefect.settings.PREFECT_HOME: str(home)}),
    ):
        for workdir, tracking_uri in runs.values():
            common = ["--workdir", workdir, "--tracking-uri", tracking_uri]
            # Both read the slides from the bucket: a store records where its slide came from.
            out = segflow(capsys, "ingest", f"{bucket}/archive", *INGEST, *common)
            assert f"stores: {workdir}/stores" in out
            segflow(capsys, "weights", *WEIGHTS, *common)
            segflow(capsys, "train", *TRAIN, *common)
            segflow(capsys, "infer", *INFER, *common)
        # Again on S3: answered from Prefect's cache, its stored result (kept without
        # credentials) reaching the bucket again to check the segmentation is still there.
        assert "cached" in segflow(capsys, "infer", *INFER, *common)

    remote = objects(bucket / "work" / "stores")
    local = files(tmp_path / "local" / "stores")
    assert {"s.zarr/labels/segmentation/zarr.json", "s.zarr/training/weight/zarr.json"} <= set(
        remote
    )
    assert_same_stores(local, remote)
    assert any(key.startswith("work/checkpoints/") for key in objects(bucket))
    assert list(cwd.iterdir()) == []  # no ./s3: and no workdir
    # Prefect's task cache for the S3 workdir is local, and holds no credential.
    secret = CREDENTIALS["secret"].encode()
    cached = [p for p in home.rglob("*") if p.is_file()]
    assert any(p.parent.name == "storage" for p in cached)
    assert [p for p in cached if secret in p.read_bytes()] == []
