"""The command line as the README tells it: the demo's model serves `segflow infer`, training
reports what it made, configuration keys are listed, and `segflow train` finds its stores."""

from __future__ import annotations

import random
import re

import pytest
from mlflow.tracking import MlflowClient
from train_stores import disk_store, tiny_config

from flows.configs import load
from flows.demo import DEMO_CONFIG
from flows.pipeline import CHAMPION, PipelineConfig
from pipelines.train import TrainConfig, train
from pipelines.training.tracking import unique_run_name


def test_the_demo_registers_the_model_infer_uses_by_default(tmp_path):
    config = load(PipelineConfig, None, [], {"archive": str(tmp_path), **DEMO_CONFIG})
    assert f"models:/{config.train.registered_model_name}@champion" == CHAMPION


def test_run_names_do_not_follow_the_seed():
    names = set()
    for _ in range(3):
        random.seed(0)  # what Lightning's seed_everything does before MLflow names a run
        names.add(unique_run_name("segflow-unet"))
    assert len(names) == 3


@pytest.mark.slow  # ~15 s on an idle 2-core machine, 45 s on a busy one: trains twice
def test_two_trainings_with_one_seed_get_different_run_names(tmp_path):
    store = disk_store(tmp_path / "train.zarr", size=72, seed=0)
    config = TrainConfig.model_validate(
        tiny_config(tmp_path, [store], [], max_steps=1, steps_per_epoch=1, checkpoint_every=1)
    )
    runs = [train(config).run_id for _ in range(2)]
    client = MlflowClient(config.resolved_tracking_uri)
    names = [client.get_run(run).info.run_name for run in runs]
    assert names[0] != names[1]
    assert all(re.fullmatch(r"test-unet-\d{8}-\d{6}-[0-9a-f]{4}", name) for name in names), names
