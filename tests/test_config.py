import importlib

import pytest
from pydantic import BaseModel, ValidationError

from pipelines.config import ConfigError, dump_config, load_config


class Optim(BaseModel):
    name: str = "sgd"
    lr: float = 0.01


class Example(BaseModel):
    stores: list[str] = []
    devices: int = 1
    tracking_uri: str | None = "sqlite:///x.db"
    optim: Optim = Optim()


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("devices: 2\noptim:\n  lr: 0.1\n")
    config = load_config(Example, path, ["optim.name=adamw", "stores=[a.zarr, b.zarr]"])
    assert config.devices == 2
    assert config.optim == Optim(name="adamw", lr=0.1)
    assert config.stores == ["a.zarr", "b.zarr"]
    assert load_config(Example, None, ["tracking_uri=null"]).tracking_uri is None


def test_roundtrip(tmp_path):
    config = Example(stores=["s.zarr"], devices=4, optim=Optim(lr=0.5))
    dump_config(config, tmp_path / "c.yaml")
    assert load_config(Example, tmp_path / "c.yaml") == config


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Example, None, ["devices"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="bad.yaml: configuration must be a mapping"):
        load_config(Example, bad)
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(Example, tmp_path / "missing.yaml")
    with pytest.raises(ValidationError):
        load_config(Example, None, ["devices=many"])


@pytest.mark.parametrize(
    ("cls", "override"),
    [
        ("pipelines.weightmaps.WeightsConfig", "sigm=3"),
        ("pipelines.weightmaps.WeightsConfig", "cluster.n_worker=9"),
        ("pipelines.ingest.IngestConfig", "tissue.threshold_x=1"),
        ("pipelines.infer.InferConfig", "tile_sise=124"),
        ("pipelines.training.config.TrainConfig", "optimizer.learning_rate=0.1"),
        ("flows.pipeline.PipelineConfig", "infer.cluster.n_worker=2"),
    ],
)
def test_every_config_refuses_a_typo(cls, override):
    module, _, name = cls.rpartition(".")
    config_cls = getattr(importlib.import_module(module), name)
    defaults = {"archive": "a"} if name == "PipelineConfig" else {}
    defaults |= {"stores": ["s.zarr"]} if name == "TrainConfig" else {}
    refused = "Extra inputs are not permitted|Unexpected keyword argument"
    with pytest.raises(ValidationError, match=refused):
        load_config(config_cls, None, [override], defaults)
