"""The `segflow` command line: help for every command, one-line errors with non-zero exits on
bad input (no tracebacks unless --debug), and per-slide failures reported by the stage flows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from flow_helpers import TINY, prefect_api

from flows.cli import main
from segcore.store import SlideStore
from segcore.synthetic import write_synthetic_slide

COMMANDS = ("ingest", "weights", "train", "infer", "run", "serve", "demo")
SEGFLOW = Path(sys.executable).with_name("segflow")
TINY_INGEST = ["chunk_size=128", "min_level_size=64", "cluster.processes=false"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *fragments: str) -> None:
    """One `segflow:` line (stderr may also hold the final frame of the progress bars)."""
    lines = [line for line in err.splitlines() if line.startswith("segflow")]
    assert len(lines) == 1, err
    assert lines[0].startswith("segflow: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: segflow {command}")
    assert "--config" in out and "--workdir" in out


def test_console_script_and_module_entry_point():
    for argv in ([str(SEGFLOW)], [sys.executable, "-m", "flows.cli"]):
        done = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert all(command in done.stdout for command in COMMANDS)


def test_missing_slide_is_a_one_line_error_from_the_installed_command(tmp_path):
    missing = tmp_path / "nope.svs"
    done = subprocess.run(
        [str(SEGFLOW), "ingest", str(missing), "--workdir", str(tmp_path / "w")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert_one_line_error(done.stderr, f"{missing}: no such file or folder")
    assert not (tmp_path / "w").exists()


def test_configuration_errors_name_the_file_and_the_problem(tmp_path, capsys):
    slide = tmp_path / "s.tif"
    slide.write_bytes(b"not read: the configuration fails first")
    broken = tmp_path / "broken.yaml"
    broken.write_text("chunk_size: [1, 2\n")
    code, _, err = run(capsys, "ingest", str(slide), "--config", str(broken))
    assert code == 2
    assert_one_line_error(err, f"{broken}: cannot read configuration")

    invalid = tmp_path / "invalid.yaml"
    invalid.write_text("chunk_size: -5\n")
    code, _, err = run(capsys, "ingest", str(slide), "--config", str(invalid))
    assert code == 2
    assert_one_line_error(err, f"{invalid}: invalid IngestConfig: chunk_size:")

    code, _, err = run(capsys, "ingest", str(slide), "no_such_setting=3")
    assert code == 2
    assert_one_line_error(err, "command line: invalid IngestConfig: no_such_setting:")

    code, _, err = run(capsys, "train", "--config", str(tmp_path / "absent.yaml"))
    assert code == 2
    assert_one_line_error(err, "absent.yaml: no such configuration file")

    code, _, err = run(capsys, "train", "--workdir", str(tmp_path / "w"))
    assert code == 2
    assert_one_line_error(err, f"{tmp_path / 'w' / 'stores'}: no stores named and none here")


def test_debug_shows_the_traceback(tmp_path, capsys):
    code, _, err = run(capsys, "infer", str(tmp_path / "absent.zarr"), "--debug")
    assert code == 2
    assert "Traceback" in err
    assert err.rstrip().splitlines()[-1].startswith("segflow: error: ")


def test_infer_with_a_missing_model_file(tmp_path, capsys):
    store = tmp_path / "s.zarr"
    store.mkdir()
    model = tmp_path / "model.pt"
    code, _, err = run(capsys, "infer", str(store), "--model", str(model))
    assert code == 2
    assert_one_line_error(err, f"{model}: no such file or folder")


@pytest.mark.integration
def test_stage_commands_fail_bad_slides_alone(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # set by other tests' training
    archive = tmp_path / "archive"
    archive.mkdir()
    write_synthetic_slide(archive / "good.tif", tmp_path / "truth.tif", 256, 256, seed=5)
    broken = archive / "broken.tif"
    broken.write_bytes(b"II*\x00" + bytes(range(256)))
    workdir = tmp_path / "work"
    common = ["--workdir", str(workdir)]

    with prefect_api():
        code, out, err = run(capsys, "ingest", str(archive), *TINY_INGEST, *common)
        assert code == 1
        assert_one_line_error(err, f"{broken}: truncated or corrupt TIFF")
        store = workdir / "stores" / "good.zarr"
        assert SlideStore.open(store).shape == (3, 256, 256)
        assert "good" in out and "broken" in out  # the summary table names every slide

        # A store without annotations: the weights stage refuses it, naming the store.
        code, _, err = run(capsys, "weights", "cluster.processes=false", *common)
        assert code == 1
        assert_one_line_error(err, f"{store}: no annotations")

        # No registered model yet: each slide fails with the reason.
        code, _, err = run(capsys, "infer", "--model", "models:/absent@champion", *common)
        assert code == 1
        assert_one_line_error(err, "models:/absent@champion: no such model version")
        assert SlideStore.open(store).segmentation is None


@pytest.mark.slow  # ~50 s: trains a model, then segments in a fresh process
@pytest.mark.integration
def test_each_stage_command_runs_alone_one_after_another(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    archive = tmp_path / "archive"
    archive.mkdir()
    write_synthetic_slide(archive / "s.tif", archive / "s_labels.tif", 256, 256, seed=6)
    workdir = tmp_path / "work"
    common = ["--workdir", str(workdir)]
    store = workdir / "stores" / "s.zarr"
    train = [f"{item.removeprefix('train.')}" for item in TINY if item.startswith("train.")]

    with prefect_api():
        assert run(capsys, "ingest", str(archive), *TINY_INGEST, *common)[0] == 0
        weights = ["block_size=128", "cluster.processes=false"]
        assert run(capsys, "weights", *weights, *common)[0] == 0
        assert SlideStore.open(store).weight is not None
        code, out, err = run(capsys, "train", str(store), *train, *common)
        assert code == 0, err
        assert "training" not in err

    # A fresh process, as a user runs it, with nothing configured: the model comes from the
    # embedded registry. (Training in this process set MLFLOW_TRACKING_URI; not inherited.)
    infer = ["tile_size=124", "block_size=128", "cluster.processes=false"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    done = subprocess.run(
        [str(SEGFLOW), "infer", *infer, *common],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert SlideStore.open(store).segmentation is not None
    assert "models:/segflow-unet/1" in str(
        SlideStore.open(store).group["labels/segmentation"].attrs["segflow"]["model_uri"]
    )
    assert not (tmp_path / "mlflow.db").exists()  # nothing written to the working directory
