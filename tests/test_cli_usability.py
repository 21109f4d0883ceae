"""The command line as the README tells it: the demo's model serves `segflow infer`, training
reports what it made, configuration keys are listed, and `segflow train` finds its stores."""

from __future__ import annotations

import io
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from flow_helpers import prefect_api
from mlflow.tracking import MlflowClient
from rich.console import Console
from train_stores import disk_store, tiny_config, write_store

from flows.cli import build_parser, main
from flows.config_help import COMMAND_STAGES, EXAMPLES, STAGE_CONFIGS, config_keys, stage_config
from flows.configs import load
from flows.console import print_report
from flows.demo import DEMO_CONFIG, WIRING_NOTE
from flows.outcomes import RunSummary, StageOutcome, TrainedModel
from flows.pipeline import CHAMPION, PipelineConfig
from pipelines.train import TrainConfig, train
from pipelines.training.stores import training_stores
from pipelines.training.tracking import unique_run_name
from segcore.store import StoreError


def test_the_demo_registers_the_model_infer_uses_by_default(tmp_path):
    config = load(PipelineConfig, None, [], {"archive": str(tmp_path), **DEMO_CONFIG})
    assert f"models:/{config.train.registered_model_name}@champion" == CHAMPION
    # Its artifact says what a synthetic score means, and where real ones are measured.
    assert config.note == WIRING_NOTE and "benchmarks/monuseg.py" in config.note


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


def printed(summary: RunSummary, tracking_uri: str) -> str:
    console = Console(width=60, record=True, file=io.StringIO())  # narrower than its lines
    print_report(console, summary, tracking_uri)
    return console.export_text()


def trained_summary() -> RunSummary:
    model = TrainedModel(
        name="segflow-unet",
        version="7",
        run_id="0123456789abcdef0123456789abcdef",
        champion=True,
        metrics={"best_val_iou": 0.8125, "train_loss": 0.25, "lr-SGD": 0.01, "val_dice": 0.875},
        experiment_id="4",
        aliases=("candidate", "champion"),
    )
    train = StageOutcome("train", "training", "written", seconds=12.0)
    return RunSummary("train", outcomes=[train], trained=model)


def test_train_report_names_run_version_aliases_and_metrics():
    text = printed(trained_summary(), "https://ml:s3cret@mlflow.example.org:5000/base/")
    lines = text.splitlines()
    assert lines[0] == "train: trained segflow-unet version 7"
    assert "slide(s)" not in text
    assert lines[1] == (
        "model:      segflow-unet version 7 (became champion; aliases moved: candidate, champion)"
    )
    assert lines[2] == (
        "MLflow run: 0123456789abcdef0123456789abcdef  https://mlflow.example.org:5000/base"
        "/#/experiments/4/runs/0123456789abcdef0123456789abcdef"
    )
    assert lines[3] == "metrics:    best_val_iou 0.8125  train_loss 0.2500  val_dice 0.8750"
    assert "s3cret" not in text and "lr-SGD" not in text


def test_train_report_without_a_server_has_no_link(tmp_path):
    text = printed(trained_summary(), f"sqlite:///{tmp_path}/mlflow.db")
    assert "MLflow run: 0123456789abcdef0123456789abcdef\n" in text
    assert "://" not in text


def test_a_failed_training_says_so():
    failed = StageOutcome("train", "training", "failed", detail="x.zarr: no weight map")
    assert printed(RunSummary("train", outcomes=[failed]), "").splitlines() == [
        "train: training failed"
    ]


#: What each configuration needs before a key=value can be checked against it.
REQUIRED = {"run": {"archive": "archive"}}


@pytest.mark.parametrize("stage", list(STAGE_CONFIGS))
def test_every_listed_key_and_default_is_accepted_back(stage):
    config = stage_config(stage)
    keys = config_keys(config)
    default = load(config, None, [], REQUIRED.get(stage))
    assert len({k.name for k in keys}) == len(keys)
    for key in keys:
        assert key.type, key
        if key.default == "required":
            continue
        loaded = load(config, None, [f"{key.name}={key.default}"], REQUIRED.get(stage))
        assert dotted(loaded, key.name) == dotted(default, key.name), key


def dotted(config: object, name: str) -> object:
    for part in name.split("."):
        config = getattr(config, part)
    return config


def test_config_lists_nested_keys_with_type_default_and_meaning(capsys):
    assert main(["config", "train"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split(maxsplit=1)[1] for line in out.splitlines()[1:]}
    assert out.startswith("train: TrainConfig (")
    assert lines["stores"].split()[:2] == ["list[path|url]", "[]"]
    assert "<workdir>/stores" in lines["stores"]
    assert lines["optimizer.lr"].split()[:2] == ["float", "0.01"]
    assert "Learning rate" in lines["optimizer.lr"]
    assert lines["optimizer.name"].split()[:4] == ["'sgd'", "|", "'adamw'", "sgd"]
    assert lines["augment.elastic_sigma"].split() == ["float", "10.0"]
    assert lines["model.in_channels"].startswith("int | None")
    assert "Image channels" in lines["model.in_channels"]
    # Each pipeline section is listed under its prefix, with the pipeline's own keys.
    assert main(["config", "run"]) == 0
    out = capsys.readouterr().out
    assert "\n  train.optimizer.lr " in out and "\n  ingest.chunk_size " in out
    assert "\n  holdout " in out
    assert "\n  archive " in out and out.split("\n  archive ")[1].split()[1] == "required"


def test_config_without_a_stage_lists_them_all(capsys):
    assert main(["config"]) == 0
    headers = [line.split(":")[0] for line in capsys.readouterr().out.splitlines()]
    assert [h for h in headers if h in STAGE_CONFIGS] == list(STAGE_CONFIGS)


@pytest.mark.parametrize("command", list(COMMAND_STAGES))
def test_each_help_shows_a_valid_example_of_its_own_stage(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"e.g. {EXAMPLES[command]}" in out
    stage = COMMAND_STAGES[command]
    load(stage_config(stage), None, EXAMPLES[command].split(), REQUIRED.get(stage))


def test_config_refuses_an_unknown_stage(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["config", "trian"])
    assert exit_.value.code == 2
    assert "invalid choice: 'trian'" in capsys.readouterr().err


def unweighted_store(path: Path) -> Path:
    """A labelled store before `segflow weights`: image and tissue, no training group."""
    write_store(path, np.full((1, 64, 64), 100, np.uint8), np.zeros((64, 64), np.uint32))
    shutil.rmtree(path / "training")
    (path / "training").mkdir()  # an empty folder is no array either
    return path


@pytest.fixture
def workdir(tmp_path) -> Path:
    """<workdir>/stores with two weighted stores and one without weight maps."""
    stores = tmp_path / "work" / "stores"
    stores.mkdir(parents=True)
    for name, seed in (("a", 0), ("b", 1)):
        disk_store(stores / f"{name}.zarr", size=64, seed=seed)
    unweighted_store(stores / "c.zarr")
    return tmp_path / "work"


def test_training_defaults_to_the_weighted_stores_of_the_workdir(workdir):
    config = TrainConfig(workdir=workdir)
    assert training_stores(config) == [workdir / "stores" / "a.zarr", workdir / "stores" / "b.zarr"]


def test_a_folder_of_stores_leaves_out_validation_stores_and_keeps_named_ones(workdir):
    stores = workdir / "stores"
    config = TrainConfig(
        workdir=workdir, stores=[stores, stores / "c.zarr"], val_stores=[stores / "b.zarr"]
    )
    assert training_stores(config) == [stores / "a.zarr", stores / "c.zarr"]


def test_a_folder_without_weight_maps_is_an_error_naming_it(tmp_path):
    folder = tmp_path / "stores"
    folder.mkdir()
    unweighted_store(folder / "c.zarr")
    with pytest.raises(StoreError, match=f"^{folder}: none of its 1 store"):
        training_stores(TrainConfig(stores=[folder]))


def test_train_without_stores_or_workdir_stores_is_one_line(tmp_path, capsys):
    workdir = tmp_path / "empty"
    assert main(["train", "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"segflow: error: {workdir / 'stores'}: no stores named and none here")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not workdir.exists()


def test_train_on_a_folder_of_unweighted_stores_is_one_line(tmp_path, capsys):
    folder = tmp_path / "stores"
    folder.mkdir()
    unweighted_store(folder / "c.zarr")
    assert main(["train", str(folder), "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"segflow: error: {folder}: none of its 1 store(s) has weight maps to train on "
        "(run `segflow weights` first)\n"
    )


@pytest.mark.slow  # ~60 s: a Prefect server and a short training
@pytest.mark.integration
def test_train_with_no_stores_named_trains_on_the_workdir_and_reports_it(
    workdir, capsys, monkeypatch
):
    monkeypatch.chdir(workdir.parent)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tiny = ["model.base_channels=4", "model.depth=3", "output_size=32", "batch_size=2"]
    steps = ["max_steps=4", "steps_per_epoch=2", "checkpoint_every=2", "num_workers=0"]
    with prefect_api():
        code = main(["train", "--workdir", str(workdir), *tiny, *steps])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "train: trained segflow-unet version 1"
    assert lines[1].startswith("model:      segflow-unet version 1 (became champion;")
    run_id = lines[2].removeprefix("MLflow run: ")
    assert re.fullmatch(r"[0-9a-f]{32}", run_id), lines[2]
    assert lines[3].startswith("metrics:    ") and "train_loss" in lines[3]
    # Progress as lines (stderr is not a terminal here): the first and the last step.
    progress = [line for line in err.splitlines() if line.startswith("train: step")]
    assert progress[0].startswith("train: step 1/4") and progress[-1].startswith("train: step 4/4")
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    records = client.list_artifacts(run_id)
    assert "dataset.json" in {r.path for r in records}
    trained_on = {d.dataset.name for d in client.get_run(run_id).inputs.dataset_inputs}
    assert trained_on == {"a", "b"}  # c has no weight maps
