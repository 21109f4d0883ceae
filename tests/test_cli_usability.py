"""The command line as the README tells it: the demo's model serves `segflow infer`, training
reports what it made, configuration keys are listed, and `segflow train` finds its stores."""

from __future__ import annotations

from flows.configs import load
from flows.demo import DEMO_CONFIG
from flows.pipeline import CHAMPION, PipelineConfig


def test_the_demo_registers_the_model_infer_uses_by_default(tmp_path):
    config = load(PipelineConfig, None, [], {"archive": str(tmp_path), **DEMO_CONFIG})
    assert f"models:/{config.train.registered_model_name}@champion" == CHAMPION
