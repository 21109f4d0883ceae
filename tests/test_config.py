import importlib

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

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


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")

    workers: int = 2
    threads: int = 1
    processes: bool = True


class Stage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # The field's default differs from the section class's defaults, like InferConfig.cluster.
    cluster: Section = Field(default_factory=lambda: Section(workers=1, threads=2, processes=False))
    extra_section: Section | None = None


class Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: Stage = Field(default_factory=Stage)
    retries: int = 0


def test_a_partial_section_keeps_the_fields_default(tmp_path):
    three_in_process = Section(workers=3, threads=2, processes=False)
    assert load_config(Stage, None, ["cluster.workers=3"]).cluster == three_in_process
    path = tmp_path / "c.yaml"
    path.write_text("cluster: {workers: 3}\n")
    assert load_config(Stage, path).cluster == three_in_process
    # The override goes on top of the file, both on top of the default.
    on_top = load_config(Stage, path, ["cluster.threads=4"]).cluster
    assert on_top == Section(workers=3, threads=4, processes=False)
    # Two levels down: the outer field's default is laid under the inner one's.
    nested = load_config(Outer, None, ["stage.cluster.workers=5"])
    assert nested.stage.cluster == Section(workers=5, threads=2, processes=False)
    # A section whose default is None has only its class's defaults to keep.
    given = load_config(Stage, None, ["extra_section.threads=8"]).extra_section
    assert given == Section(workers=2, threads=8, processes=True)
    # A whole section replaced by null stays null.
    assert load_config(Stage, None, ["extra_section=null"]).extra_section is None


def test_a_partial_section_still_refuses_unknown_keys(tmp_path):
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        load_config(Stage, None, ["cluster.worker=3"])
    path = tmp_path / "c.yaml"
    path.write_text("stage:\n  cluster: {workers: 3, thread: 2}\n")
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        load_config(Outer, path)


def test_infer_cluster_override_keeps_the_in_process_default(tmp_path):
    from pipelines.infer import InferConfig

    default = InferConfig().cluster
    assert (default.n_workers, default.threads_per_worker, default.processes) == (1, 2, False)
    cluster = load_config(InferConfig, None, ["cluster.n_workers=3"]).cluster
    assert cluster == default.model_copy(update={"n_workers": 3})
    path = tmp_path / "infer.yaml"
    path.write_text("cluster:\n  n_workers: 3\n")
    assert load_config(InferConfig, path).cluster == cluster
    config = load_config(InferConfig, path, ["batch_size=2"])
    dump_config(config, tmp_path / "again.yaml")
    assert load_config(InferConfig, tmp_path / "again.yaml") == config
