"""Numeric layouts (pipelines.numerics): blocks computed under two layouts never meet in one
output; a run resumed under its own layout resumes as before."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from test_infer import make_store, smooth_image

from pipelines.cluster import ClusterConfig, dask_client
from pipelines.infer import SEGMENTATION_OUTPUT, InferConfig, InferError, infer_slide
from pipelines.inference.model import WorkerProfile, common_layout
from pipelines.numerics import NumericLayout
from pipelines.stage import Identity

LAYOUT = NumericLayout(
    device="cpu", hardware="AVX2", precision="float32", threads=2, torch="2.13.0+cpu"
)


def test_identity_key_follows_every_part_of_the_layout():
    identity = Identity(
        stage="infer", format=2, inputs={"store": "abc"}, settings={}, model="d", numerics=LAYOUT
    )
    changes = [
        {"threads": 1},
        {"device": "cuda", "threads": None},
        {"precision": "bfloat16"},
        {"torch": "2.14.0+cpu"},
        {"hardware": "AVX512"},
    ]
    keys = {identity.key}
    for change in changes:
        other = identity.model_copy(update={"numerics": LAYOUT.model_copy(update=change)})
        keys.add(other.key)
    assert len(keys) == 1 + len(changes)
    # Stages that run no model keep the keys recorded before layouts existed.
    plain = Identity(stage="weights", format=1, inputs={}, settings={"w0": 10.0})
    before = {"stage": "weights", "format": 1, "inputs": {}, "settings": {"w0": 10.0}}
    payload = json.dumps({**before, "model": None}, sort_keys=True)
    assert plain.key == hashlib.sha256(payload.encode()).hexdigest()[:16]


def profile(threads: int | None, sets_threads: bool = True, **change) -> WorkerProfile:
    fields = {"device": "cpu", "hardware": "AVX2", "torch": "2.13.0+cpu", "tile_size": 92}
    return WorkerProfile(threads=threads, sets_threads=sets_threads, **{**fields, **change})


def test_a_heterogeneous_cluster_computes_as_its_smallest_worker():
    layout = common_layout([profile(8), profile(4), profile(8)], "float32")
    assert layout == LAYOUT.model_copy(update={"threads": 4})
    # The caller's own process cannot be re-threaded: the others follow it, or the run refuses.
    assert common_layout([profile(2, sets_threads=False), profile(8)], "float32").threads == 2
    with pytest.raises(ValueError, match="calling process run torch with 8 threads"):
        common_layout([profile(8, sets_threads=False), profile(2)], "float32")
    # What threads cannot fix, workers must share.
    with pytest.raises(ValueError, match="disagree on the torch"):
        common_layout([profile(2), profile(2, torch="2.12.0+cpu")], "float32")
    with pytest.raises(ValueError, match="disagree on the hardware"):
        common_layout([profile(2), profile(2, hardware="AVX512")], "float32")
    gpu = common_layout([profile(None, device="cuda", hardware="NVIDIA H200")], "bfloat16")
    assert gpu.threads is None and gpu.precision == "bfloat16"


SETTINGS = InferConfig(tile_size=92, batch_size=3, block_size=104, progress=False)
EMBEDDED = ClusterConfig(n_workers=1, threads_per_worker=2, processes=False)


@pytest.fixture
def torch_threads():
    """Sets the caller's torch threads (an in-process cluster computes with them); restored."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def partial_runs(tmp_path: Path, model: Path, config: InferConfig) -> Path:
    """The same partial run in two output folders, tmp_path/a and tmp_path/b: one unreadable
    chunk fails block 2.2, the other blocks finish and are journaled."""
    store = make_store(tmp_path / "s.zarr", smooth_image((300, 300), seed=3))
    chunk = store / "0" / "c" / "0" / "2" / "2"
    original = chunk.read_bytes()
    chunk.write_bytes(b"not a compressed chunk")
    with pytest.raises(InferError, match="block 2.2"):
        infer_slide(store, model, config.model_copy(update={"output_dir": tmp_path / "a"}))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    chunk.write_bytes(original)
    return store


def resume(store: Path, model: Path, config: InferConfig, output: Path, client=None):
    """Resume the run in `output`: its result and the layout recorded with its output."""
    result = infer_slide(store, model, config.model_copy(update={"output_dir": output}), client)
    recorded = SEGMENTATION_OUTPUT.recorded(output / store.name)
    assert recorded.key == result.identity
    return result, recorded.numerics


def test_a_resume_under_other_threads_recomputes_every_block(
    tmp_path, untrained_rgb_unet, torch_threads
):
    config = SETTINGS.model_copy(update={"cluster": EMBEDDED})
    torch_threads(2)
    store = partial_runs(tmp_path, untrained_rgb_unet, config)
    # The same layout keeps the journaled blocks.
    same, numerics = resume(store, untrained_rgb_unet, config, tmp_path / "a")
    assert same.blocks["resumed"] > 0 and numerics.threads == 2
    assert same.blocks["resumed"] + same.blocks["computed"] == same.blocks["total"] == 9
    # 1 torch thread computes other bits (benchmarks/thread_bits.py): every block again.
    torch_threads(1)
    other, numerics = resume(store, untrained_rgb_unet, config, tmp_path / "b")
    assert other.blocks == {"total": 9, "resumed": 0, "computed": 9, "background": 0}
    assert numerics.threads == 1 and other.identity != same.identity
    # Current under its own layout, and only there.
    assert (
        infer_slide(
            store, untrained_rgb_unet, config.model_copy(update={"output_dir": tmp_path / "b"})
        ).status
        == "skipped"
    )


@pytest.mark.slow
def test_a_resume_on_a_two_process_cluster_recomputes_every_block(
    tmp_path, untrained_rgb_unet, torch_threads
):
    """Issue 14's case: embedded cluster (the caller's threads) vs 2 worker processes (each
    with its share of the host's cores)."""
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    torch_threads(share + 1)  # so the two layouts differ on any host
    embedded = SETTINGS.model_copy(update={"cluster": EMBEDDED})
    store = partial_runs(tmp_path, untrained_rgb_unet, embedded)
    same, embedded_numerics = resume(store, untrained_rgb_unet, embedded, tmp_path / "a")
    assert same.blocks["resumed"] > 0 and embedded_numerics.threads == share + 1
    processes = ClusterConfig(n_workers=2, threads_per_worker=1, processes=True)
    with dask_client(processes) as client:
        other, numerics = resume(store, untrained_rgb_unet, SETTINGS, tmp_path / "b", client)
    assert other.blocks == {"total": 9, "resumed": 0, "computed": 9, "background": 0}
    assert numerics == embedded_numerics.model_copy(update={"threads": share})
    labels = [zarr.open_array(tmp_path / d / "s.zarr/labels/segmentation/0") for d in "ab"]
    assert np.mean(labels[0][...] == labels[1][...]) > 0.99
