"""Cluster kinds: batch-scheduler job scripts rendered from the typed config, a stage run
through dask-jobqueue's own job machinery (jobs as local processes), and one worker per GPU
with its own CUDA_VISIBLE_DEVICES."""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import psutil
import pytest
import tifffile
import torch
from distributed import get_task_stream
from pydantic import ValidationError

from pipelines.cluster import ClusterConfig, dask_client, gpu_pins, jobqueue_cluster, worker_device
from pipelines.config import load_config
from pipelines.ingest import IngestConfig, ingest_archive
from pipelines.services import ServiceUnreachableError
from pipelines.sources import SlideSource
from segcore.store import SlideStore
from segcore.synthetic import write_synthetic_slide

#: The batch kinds need the `segflow[hpc]` extra (also in `dev`); the GPU tests do not.
needs_jobqueue = pytest.mark.skipif(
    importlib.util.find_spec("dask_jobqueue") is None, reason="dask-jobqueue is not installed"
)

BATCH = [
    "jobqueue.queue=gpu",
    "jobqueue.account=lab42",
    "jobqueue.cores=8",
    "jobqueue.memory=32GiB",
    "jobqueue.processes=2",
    "jobqueue.walltime=02:30:10",
]


def rendered(kind: str, *overrides: str) -> str:
    config = load_config(ClusterConfig, overrides=[f"kind={kind}", *BATCH, *overrides])
    with jobqueue_cluster(config) as cluster:
        return cluster.job_script()


def directives(script: str, prefix: str) -> list[str]:
    return [
        line.removeprefix(prefix).strip() for line in script.splitlines() if line.startswith(prefix)
    ]


@needs_jobqueue
def test_slurm_job_script_carries_the_configured_resources():
    script = rendered(
        "slurm",
        "jobqueue.job_extra_directives=[--gres=gpu:1]",
        "jobqueue.job_script_prologue=['module load cuda']",
        "jobqueue.local_directory=/scratch/me",
    )
    lines = directives(script, "#SBATCH")
    for expected in ("-p gpu", "-A lab42", "--cpus-per-task=8", "--mem=32G", "-t 02:30:10"):
        assert expected in lines, script
    assert lines[-1] == "--gres=gpu:1"
    assert "module load cuda" in script.splitlines()
    (command,) = [line for line in script.splitlines() if "distributed.cli.dask_worker" in line]
    # Two worker processes share the job's 8 cores and 32 GiB.
    for part in ("--nworkers 2", "--nthreads 4", "--memory-limit 16.00GiB", "--nanny"):
        assert part in command
    assert "--local-directory /scratch/me" in command
    assert command.startswith(f"{sys.executable} -m distributed.cli.dask_worker")


@needs_jobqueue
def test_pbs_job_script_carries_the_configured_resources():
    lines = directives(rendered("pbs"), "#PBS")
    assert {"-q gpu", "-A lab42", "-l walltime=02:30:10"} <= set(lines)
    assert any(line.startswith("-l select=1:ncpus=8:mem=") for line in lines)


@needs_jobqueue
def test_lsf_job_script_takes_the_account_as_project_and_minutes():
    lines = directives(rendered("lsf"), "#BSUB")
    assert {"-q gpu", '-P "lab42"', "-n 8", "-W 02:31"} <= set(lines)


def test_batch_kinds_refuse_gpus_and_bad_walltimes():
    with pytest.raises(ValidationError, match="gres"):
        ClusterConfig(kind="slurm", gpus=[0])
    with pytest.raises(ValidationError, match="walltime"):
        load_config(ClusterConfig, overrides=["kind=pbs", "jobqueue.walltime=2h"])
    # Today's settings keep meaning what they meant.
    old = load_config(ClusterConfig, overrides=["n_workers=3", "scheduler_address=tcp://h:8786"])
    assert (old.kind, old.n_workers, old.scheduler_address) == ("local", 3, "tcp://h:8786")


@needs_jobqueue
def test_a_stage_runs_on_workers_started_as_jobs(tmp_path):
    """The whole batch path (render the job, submit it, wait for its workers, run the stage)
    with dask-jobqueue's local job runner standing in for the batch scheduler."""
    slide = write_synthetic_slide(
        tmp_path / "s.tif", tmp_path / "s_labels.tif", 512, 512, seed=1, tile=256
    )
    source = SlideSource(image=slide.image_path, labels=slide.labels_path)
    cluster = load_config(
        ClusterConfig,
        overrides=["kind=jobqueue-local", "jobqueue.jobs=2", "jobqueue.memory=1GiB"],
    )
    config = IngestConfig(chunk_size=256, min_level_size=256, cluster=cluster)
    with dask_client(cluster) as client, get_task_stream(client) as stream:
        jobs = {int(job.job_id) for job in client.cluster.workers.values()}
        worker_pids = client.run(os.getpid)
        parents = {psutil.Process(pid).ppid() for pid in worker_pids.values()}
        (result,) = ingest_archive([source], tmp_path / "out", config, client=client)
        assert result.status == "written", result.error
    # Every worker is a child of a job process, and every task ran on one of them.
    assert len(worker_pids) == 2
    assert parents <= jobs
    assert os.getpid() not in worker_pids.values()
    ran_on = {task["worker"] for task in stream.data}
    assert ran_on and ran_on <= set(worker_pids)
    store = SlideStore.open(result.store)
    image = np.moveaxis(store.image(0)[...], 0, -1)
    np.testing.assert_array_equal(image, tifffile.imread(slide.image_path, level=0))


def test_gpu_pins_index_the_devices_this_process_sees():
    assert gpu_pins([0, 1], "2,3", lambda: 0) == ["2", "3"]
    assert gpu_pins("all", None, lambda: 2) == ["0", "1"]
    assert gpu_pins("all", "GPU-5e1c, GPU-77a0", lambda: 0) == ["GPU-5e1c", "GPU-77a0"]
    assert gpu_pins([1], None, lambda: 4) == ["1"]
    for gpus, visible in (([2], "0,1"), ([0, 0], "0,1"), ("all", ""), ([0], None)):
        with pytest.raises(ValueError, match="sees"):
            gpu_pins(gpus, visible, lambda: 0)


def test_each_gpu_worker_gets_its_own_device(monkeypatch):
    """Without a GPU: the workers' own CUDA_VISIBLE_DEVICES, mapped through this process's."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,7")
    with dask_client(ClusterConfig(gpus=[0, 2], memory_limit="1GiB")) as client:
        devices = client.run(worker_device)
        names = {info["name"] for info in client.scheduler_info()["workers"].values()}
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert sorted(devices.values()) == [
        f"{device} (CUDA_VISIBLE_DEVICES=3)",
        f"{device} (CUDA_VISIBLE_DEVICES=7)",
    ]
    assert names == {"gpu-3", "gpu-7"}


@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="no CUDA device")
def test_cuda_workers_compute_on_their_own_gpu():
    count = torch.cuda.device_count()
    with dask_client(ClusterConfig(gpus="all")) as client:
        devices = sorted(client.run(worker_device).values())
        uuids = client.run(lambda: str(torch.cuda.get_device_properties(0).uuid))
    assert devices == sorted(f"cuda:0 (CUDA_VISIBLE_DEVICES={i})" for i in range(count))
    assert len(set(uuids.values())) == count


@needs_jobqueue
def test_jobs_that_do_not_start_in_time_fail_with_one_line():
    config = load_config(
        ClusterConfig,
        overrides=["kind=jobqueue-local", "jobqueue.start_timeout_s=0.2", "jobqueue.memory=1GiB"],
    )
    match = "0 of 1 Dask workers .* within 0.2 s"
    with pytest.raises(ServiceUnreachableError, match=match), dask_client(config):
        pass
