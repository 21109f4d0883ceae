"""pipelines.stage: the one contract of the store-writing stages, on real Zarr stores and a
real Dask cluster."""

import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipelines.cluster import ClusterConfig, SchedulerLostError, dask_client, map_bounded
from pipelines.stage import (
    Identity,
    StageOutput,
    StageResult,
    error_line,
    record_identity,
    run_archive,
)
from pipelines.weightmaps import WeightsConfig, weights_archive
from segcore import ngff
from segcore.store import STORE_FORMAT

OUTPUT = StageOutput("labels/thing")
IDENTITY = Identity(stage="thing", format=1, inputs={"store": "abc"}, settings={"w0": 10.0})


def test_identity_is_recorded_and_read_in_one_place(tmp_path):
    store = tmp_path / "s.zarr"
    assert OUTPUT.recorded(store) is None and not OUTPUT.is_current(store, IDENTITY)
    group = zarr.open_group(OUTPUT.node(store), mode="w")
    record_identity(group, IDENTITY, {"halo": 22})
    assert OUTPUT.recorded(store) == IDENTITY
    assert OUTPUT.is_current(store, IDENTITY) and OUTPUT.is_current(store, IDENTITY.key)
    assert group.attrs["segflow"]["halo"] == 22 and group.attrs["segflow"]["segflow_version"]
    # Any part of the identity changes the key.
    for change in ({"format": 2}, {"settings": {"w0": 9.0}}, {"model": "d1"}, {"inputs": {}}):
        other = IDENTITY.model_copy(update=change)
        assert other.key != IDENTITY.key and not OUTPUT.is_current(store, other)


def test_a_garbled_record_is_not_current(tmp_path):
    store = tmp_path / "s.zarr"
    zarr.open_group(OUTPUT.node(store), mode="w").attrs["segflow"] = {"identity": {"stage": 1}}
    assert OUTPUT.recorded(store) is None and not OUTPUT.is_current(store, IDENTITY)


def test_holds_asks_whether_a_results_output_is_still_installed(tmp_path):
    store = tmp_path / "s.zarr"
    record_identity(zarr.open_group(OUTPUT.node(store), mode="w"), IDENTITY)
    result = StageResult(store=store, status="written", identity=IDENTITY.key)
    assert OUTPUT.holds(result)
    elsewhere = tmp_path / "out" / "s.zarr"
    record_identity(zarr.open_group(OUTPUT.node(elsewhere), mode="w"), IDENTITY)
    moved = result.model_copy(update={"output": elsewhere})
    assert OUTPUT.holds(moved)
    record_identity(
        zarr.open_group(OUTPUT.node(store), mode="r+"), IDENTITY.model_copy(update={"format": 2})
    )
    assert not OUTPUT.holds(result) and OUTPUT.holds(moved)
    assert not OUTPUT.holds(result.model_copy(update={"identity": None}))


def test_error_line_names_the_subject_once():
    assert error_line(Path("a.svs"), OSError("disk full")) == "a.svs: OSError: disk full"
    assert error_line(Path("a.svs"), ValueError("a.svs: not a slide")) == "a.svs: not a slide"
    assert error_line(Path("a.svs"), ValueError("bad\n  tile")) == "a.svs: bad tile"


@pytest.mark.parametrize("parallel", [1, 3])
def test_run_archive_confines_failures_and_keeps_order(tmp_path, parallel):
    items = [tmp_path / f"{name}.zarr" for name in "abcde"]

    def one(item, bars):
        if item.name == "c.zarr":
            raise RuntimeError("unreadable")
        return StageResult(store=item, status="written")

    def failed(item, error, seconds):
        return StageResult(store=item, status="failed", error=error, seconds=seconds)

    results = run_archive(items, one, failed, subject=lambda i: i, parallel=parallel)
    assert [r.store for r in results] == items
    assert [r.status for r in results] == ["written"] * 2 + ["failed"] + ["written"] * 2
    assert results[2].error == f"{items[2]}: RuntimeError: unreadable"


def test_run_archive_stops_when_the_scheduler_is_lost(tmp_path):
    ran = []

    def one(item, bars):
        ran.append(item)
        raise SchedulerLostError("lost the Dask scheduler at tcp://x")

    with pytest.raises(SchedulerLostError):
        run_archive([1, 2, 3], one, lambda *a: None, subject=lambda i: Path(str(i)))
    assert ran == [1]


def _slow_write(path: Path, seconds: float) -> str:
    time.sleep(seconds)
    path.write_text("late")
    return path.name


def _fail() -> None:
    raise RuntimeError("block failed")


@pytest.mark.parametrize("with_cluster", [True, False])
def test_map_bounded_waits_for_running_calls_before_raising(tmp_path, with_cluster):
    """A stage removes its temporary output when a block fails: calls still running must have
    ended by then, or their late writes would land in (or recreate) what was removed."""
    slow = [tmp_path / f"slow-{i}" for i in range(3)]
    jobs = [(p.name, (_slow_write, p, 1.0)) for p in slow] + [("bad", (_fail,))]

    def run(fn, *args):
        return fn(*args)

    config = ClusterConfig(n_workers=1, threads_per_worker=4, processes=False)
    with dask_client(config) if with_cluster else _no_client() as client:
        with pytest.raises(RuntimeError, match="block failed"):
            for _ in map_bounded(client, run, jobs, max_in_flight=4):
                pass
        assert all(p.read_text() == "late" for p in slow)


class _no_client:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _labelled_store(path: Path, labels: np.ndarray | None) -> Path:
    root = zarr.open_group(path, mode="w")
    root.attrs["segflow"] = {"store_format": STORE_FORMAT, "source": "test"}
    root.attrs["ome"] = {"multiscales": [{"datasets": [{"path": "0"}]}]}
    ngff.create_array(root, "0", (3, 64, 64), np.uint8, (3, 32, 32))
    if labels is not None:
        group = root.create_group("labels").create_group("annotations")
        ngff.create_array(group, "0", labels.shape, np.uint32, (32, 32))[...] = labels
    return path


def test_weights_archive_reports_each_store(tmp_path):
    labels = np.zeros((64, 64), np.uint32)
    labels[10:20, 10:20], labels[30:50, 30:40] = 1, 2
    good = _labelled_store(tmp_path / "good.zarr", labels)
    bare = _labelled_store(tmp_path / "bare.zarr", None)
    cluster = ClusterConfig(n_workers=1, threads_per_worker=2, processes=False)
    results = weights_archive([bare, good], WeightsConfig(block_size=32, cluster=cluster))
    assert [r.status for r in results] == ["failed", "written"]
    assert (
        results[0].error == f"{bare}: no annotations (labels/annotations/0) to compute weights from"
    )
    again = weights_archive([good], WeightsConfig(block_size=64, cluster=cluster))
    assert again[0].status == "skipped" and again[0].identity == results[1].identity
    with pytest.raises(ValueError, match="no stores given"):
        weights_archive([], WeightsConfig(cluster=cluster))
