"""Scheduled runs that fire: `segflow serve --cron` against a real `prefect server` on
127.0.0.1, where the server's own scheduler (not the test) creates the nightly runs and the
serving process runs them; every deployment it registers runs as shipped; and prefect.yaml's
deployments, deployed to a process work pool, run on a `prefect worker`.

Under SQLAlchemy 2.1 Prefect 3.8's scheduler fails every loop and creates no run at all
(pyproject.toml pins < 2.1): this test is what shows a schedule works.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import yaml
from flow_helpers import tiny_archive
from server_helpers import (
    BIN,
    FINAL_STATES,
    clean_env,
    http,
    prefect_server,
    start,
    stop,
    tiny_config,
    wait_for_deployment,
    wait_for_flow_run,
)

from flows.deployments import NIGHTLY
from segcore.store import SlideStore
from segcore.synthetic import write_synthetic_slide

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[1]
#: A cron of every minute fires within 60 s; the run itself takes seconds on tiny slides.
SCHEDULED_RUN_SECONDS = 180


def scheduled_runs(api: str, deployment_id: str) -> list[dict]:
    return http(
        f"{api}/flow_runs/filter",
        {
            "flow_runs": {"deployment_id": {"any_": [deployment_id]}},
            "sort": "EXPECTED_START_TIME_ASC",
        },
    )


def wait_for_a_scheduled_run(
    api: str, deployment_id: str, serve: subprocess.Popen, log: Path
) -> tuple[list[dict], dict]:
    """All runs of the deployment once one of them has ended, and that one."""
    deadline = time.monotonic() + SCHEDULED_RUN_SECONDS
    while time.monotonic() < deadline:
        runs = scheduled_runs(api, deployment_id)
        ended = [r for r in runs if r["state"]["type"] in FINAL_STATES]
        if ended:
            return runs, ended[0]
        if serve.poll() is not None:
            pytest.fail(f"segflow serve exited:\n{log.read_text()[-3000:]}")
        time.sleep(2)
    states = [(r["name"], r["state"]["type"]) for r in scheduled_runs(api, deployment_id)]
    pytest.fail(
        f"no scheduled run ended within {SCHEDULED_RUN_SECONDS} s (runs: {states}):\n"
        f"{log.read_text()[-3000:]}"
    )


def test_the_nightly_schedule_fires_and_every_deployment_runs_as_shipped(tmp_path):
    env = clean_env()
    archive = tiny_archive(tmp_path / "archive")
    (archive / "broken.tif").unlink()
    config = tiny_config(tmp_path / "pipeline.yaml")
    workdir = tmp_path / "work"
    common = [str(archive), "--config", str(config), "--workdir", str(workdir)]

    with prefect_server(tmp_path / "prefect", env) as api:
        segflow_env = env | {"PREFECT_API_URL": api}  # MLflow: sqlite under the workdir
        trained = subprocess.run(
            [str(BIN / "segflow"), "run", *common],
            env=segflow_env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert trained.returncode == 0, trained.stdout + trained.stderr
        assert (workdir / "mlflow.db").is_file()
        # A slide that arrives after training: only a run of the schedule can segment it.
        write_synthetic_slide(archive / "d.tif", tmp_path / "truth" / "d_labels.tif", 256, 256, 4)

        log = tmp_path / "serve.log"
        serve = start(
            [str(BIN / "segflow"), "serve", *common, "--cron", "* * * * *"], segflow_env, log
        )
        try:
            nightly = wait_for_deployment(api, NIGHTLY, serve, log)
            runs, ran = wait_for_a_scheduled_run(api, nightly["id"], serve, log)

            # The server's scheduler made the runs (the test created none), ahead of time.
            assert len(runs) >= 2 and all(r["auto_scheduled"] for r in runs)
            assert ran["state"]["type"] == "COMPLETED", log.read_text()[-3000:]
            tasks = http(f"{api}/task_runs/filter", {"flow_runs": {"id": {"any_": [ran["id"]]}}})
            states = {t["name"]: t["state"]["name"] for t in tasks}
            assert states["ingest d"] == states["infer d.zarr"] == "Completed"
            assert states["infer a.zarr"] == "Cached"  # segmented by `segflow run` already
            segmentation = SlideStore.open(workdir / "stores" / "d.zarr").group[
                "labels/segmentation"
            ]
            assert segmentation.attrs["segflow"]["model_uri"] == "models:/segflow-unet/1"

            # Every other deployment runs as shipped: no parameter beyond what it carries. The
            # schedule is paused first, so runs every minute do not queue between them.
            http(f"{api}/deployments/{nightly['id']}/pause_deployment", {})
            for name in ("train", "weights", "ingest", "infer", "pipeline"):
                (deployment,) = http(
                    f"{api}/deployments/filter",
                    {
                        "deployments": {"name": {"any_": [name]}},
                        "flows": {"name": {"any_": [f"segflow-{name}"]}},
                    },
                )
                run = http(f"{api}/deployments/{deployment['id']}/create_flow_run", {})
                state = wait_for_flow_run(api, run["id"], serve, log)
                assert state == "COMPLETED", (name, log.read_text()[-3000:])
        finally:
            stop(serve)


def shipped_prefect_yaml(path: Path, archive: Path, workdir: Path) -> Path:
    """The repository's prefect.yaml with its container paths pointed at this machine's."""
    text = (REPO / "prefect.yaml").read_text()
    for shipped, here in (
        ("/opt/segflow", REPO),
        ("/data/archive", archive),
        ("/data/segflow-work", workdir),
    ):
        assert shipped in text
        text = text.replace(shipped, str(here))
    path.write_text(text)
    return path


def test_prefect_yaml_deploys_to_a_work_pool_whose_worker_runs_them(tmp_path):
    env = clean_env()
    archive = tiny_archive(tmp_path / "archive")
    (archive / "broken.tif").unlink()
    workdir = tmp_path / "work"
    spec = shipped_prefect_yaml(tmp_path / "prefect.yaml", archive, workdir)

    with prefect_server(tmp_path / "prefect", env) as api:
        api_env = env | {"PREFECT_API_URL": api}  # MLflow: sqlite under the workdir

        def prefect(*argv: str) -> None:
            done = subprocess.run(
                [str(BIN / "prefect"), *argv],
                env=api_env,
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert done.returncode == 0, done.stdout + done.stderr

        prefect("work-pool", "create", "segflow", "--type", "process")
        prefect("--no-prompt", "deploy", "--all", "--prefect-file", str(spec))
        deployments = {
            d["name"]: d for d in http(f"{api}/deployments/filter", {}) if d["work_pool_name"]
        }
        assert set(deployments) == {NIGHTLY, "pipeline", "ingest", "weights", "train", "infer"}
        schedules = http(f"{api}/deployments/{deployments[NIGHTLY]['id']}/schedules")
        assert [s["schedule"]["cron"] for s in schedules] == ["0 2 * * *"]

        log = tmp_path / "worker.log"
        worker = start(
            [str(BIN / "prefect"), "worker", "start", "--pool", "segflow", "--type", "process"],
            api_env,
            log,
        )
        try:
            # Ingest and weight maps as shipped; training and segmentation with tiny settings
            # (the shipped ones are the paper's: hours of training on a CPU).
            tiny = yaml.safe_load((tiny_config(tmp_path / "tiny.yaml")).read_text())
            train = {**tiny["train"], "stores": [str(workdir / "stores")]}
            for name, parameters in (
                ("ingest", {}),
                ("weights", {}),
                ("train", {"train": train}),
                (NIGHTLY, {"infer": tiny["infer"]}),
            ):
                run = http(
                    f"{api}/deployments/{deployments[name]['id']}/create_flow_run",
                    {"parameters": parameters},
                )
                state = wait_for_flow_run(api, run["id"], worker, log)
                assert state == "COMPLETED", (name, log.read_text()[-3000:])
        finally:
            stop(worker)
    for name in "abc":
        segmentation = SlideStore.open(workdir / "stores" / f"{name}.zarr").segmentation
        assert segmentation is not None
    assert SlideStore.open(workdir / "stores" / "c.zarr").weight is None  # unlabelled: skipped
