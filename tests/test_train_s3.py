"""Training from stores on object storage with its checkpoints there (moto in server mode on
127.0.0.1): the same weights as from the local stores, nothing written locally but the MLflow
store named, and a resume from the checkpoints on the bucket."""

from __future__ import annotations

import io
import json
from pathlib import Path

import fsspec.config
import pytest
import torch
from mlflow.tracking import MlflowClient
from s3_helpers import new_bucket, objects, upload
from train_stores import disk_store, tiny_config

from pipelines.location import ObjectUrl
from pipelines.train import TrainConfig, run_training, train
from pipelines.training.tracking import LAST_CHECKPOINT, RUN_RECORD


def _state(payload: bytes) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    return checkpoint["state_dict"]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _run_files(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run_dir.iterdir()}


def test_a_remote_workdir_needs_a_tracking_uri():
    config = TrainConfig(workdir="s3://lab/work")
    with pytest.raises(ValueError, match="object storage needs a tracking URI") as info:
        _ = config.resolved_tracking_uri
    assert "\n" not in str(info.value)
    assert TrainConfig(workdir="s3://lab/work", tracking_uri="sqlite:///x.db").checkpoint_root == (
        ObjectUrl("s3", "lab/work/checkpoints")
    )


@pytest.mark.slow
def test_training_from_stores_on_s3_checkpoints_there_and_learns_the_same_weights(
    tmp_path, monkeypatch, s3_storage
):
    stores = tmp_path / "stores"
    disk_store(stores / "train.zarr", size=96, seed=0)
    disk_store(stores / "val.zarr", size=72, seed=1)
    local_config = TrainConfig.model_validate(
        tiny_config(tmp_path / "local", [stores], [stores / "val.zarr"])
    )
    local = train(local_config)

    bucket = new_bucket(s3_storage)
    upload(stores, bucket / "stores")
    work = bucket / "work"
    remote_config = TrainConfig.model_validate(
        tiny_config(
            tmp_path / "unused",
            [bucket / "stores"],  # a folder: listed, its validation store left out
            [bucket / "stores" / "val.zarr"],
            workdir=work,
            tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        )
    ).with_storage(s3_storage)  # what the entry point does with the run's settings
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    # The flows' path: a child `python -m pipelines.train`, given the storage settings in its
    # environment (the configuration file it reads holds no credentials).
    remote = run_training(remote_config)

    assert remote.global_step == local.global_step == 6
    assert isinstance(remote.weights, ObjectUrl) and isinstance(remote.checkpoint, ObjectUrl)
    assert remote.checkpoint.name.startswith("best-")
    run_dir = work / "checkpoints" / remote.run_id
    written = objects(run_dir)
    mine = _run_files(local_config.checkpoint_root / local.run_id)
    assert sorted(written) == sorted(mine)  # last.ckpt, best-step=...ckpt, model.pt, run.json
    assert json.loads(written[RUN_RECORD])["run_id"] == remote.run_id
    # Same seed, same bytes read: the same weights, bit for bit.
    _assert_same_weights(_state(written[LAST_CHECKPOINT]), _state(mine[LAST_CHECKPOINT]))
    best = remote.checkpoint.name
    _assert_same_weights(_state(written[best]), _state(mine[best]))
    _assert_same_weights(_state(written["model.pt"]), _state(mine["model.pt"]))
    client = MlflowClient(remote_config.resolved_tracking_uri)
    assert client.get_run(remote.run_id).info.status == "FINISHED"
    assert remote.version == "1"
    # Nothing local for the S3 workdir: no `s3:` folder, no workdir, no Lightning logs.
    assert list(cwd.iterdir()) == []
    assert not list(tmp_path.rglob("s3:*")) and not (tmp_path / "unused").exists()

    # Resume from the bucket, here in this process: two more steps on the same run.
    resumed = train(remote_config.model_copy(update={"resume": True, "max_steps": 8}))
    assert (resumed.run_id, resumed.resumed_from_step, resumed.global_step) == (remote.run_id, 6, 8)
    last = torch.load(io.BytesIO(objects(run_dir)[LAST_CHECKPOINT]), weights_only=True)
    assert last["global_step"] == 8
    assert "s3" not in fsspec.config.conf  # the process-wide setting was taken back
    assert list(cwd.iterdir()) == []
