"""The storage rules on object storage (moto in server mode on 127.0.0.1): installing without
rename (chunks first, metadata last, the old output gone), stale temporaries of dead
writers only, exclusive creation by conditional PUT, missing chunks found by listing, and
stage records read from a prefix as from a folder."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import zarr
from s3_helpers import new_bucket, objects

from pipelines.location import ObjectUrl, parse_location
from pipelines.stage import Identity, StageOutput, record_identity
from pipelines.storage import (
    OutputError,
    create_exclusive,
    exists,
    install,
    read_text,
    remove_file,
    remove_stale_siblings,
    remove_tree,
    temporary_sibling,
    tree_bytes,
    writable_folder,
    write_file,
)
from segcore.store import StoreError, open_group, verify_chunks

WANTED = Identity(stage="test", format=1, inputs={"x": 1}, settings={})


def _store(where: ObjectUrl, value: int, shape=(64, 64)) -> None:
    group = open_group(where, mode="w")
    array = group.create_array("0", shape=shape, chunks=(32, 32), dtype="u1", fill_value=0)
    array[:] = value
    record_identity(group, WANTED.model_copy(update={"inputs": {"x": value}}))


def test_install_replaces_the_old_output_and_publishes_metadata_last(s3_storage):
    stores = new_bucket(s3_storage) / "stores"
    final = stores / "a.zarr"
    _store(final, 1, shape=(96, 96))  # an older output with more chunks than the new one
    tmp = temporary_sibling(final)
    assert tmp.name.startswith(".a.zarr.tmp-") and tmp.parent == stores
    _store(tmp, 7)
    install(tmp, final)
    assert not exists(tmp)
    assert sorted(objects(final)) == [
        "0/c/0/0",
        "0/c/0/1",
        "0/c/1/0",
        "0/c/1/1",
        "0/zarr.json",
        "zarr.json",
    ]
    assert (open_group(final)["0"][:] == 7).all()
    assert StageOutput("").recorded(final).inputs == {"x": 7}


def test_an_install_cut_short_leaves_no_current_output(s3_storage):
    """Killed between the chunks and the root document: no group, so not current."""
    final = new_bucket(s3_storage) / "a.zarr"
    _store(final, 3)
    fs = final.filesystem()
    fs.rm_file(f"{final.path}/zarr.json")
    assert StageOutput("").recorded(final) is None
    assert not StageOutput("").is_current(final, WANTED)


def test_stale_siblings_of_dead_writers_on_this_host_only(s3_storage):
    stores = new_bucket(s3_storage) / "stores"
    final = stores / "a.zarr"
    live = temporary_sibling(final)
    dead = final.with_name(live.name.replace(f"-{os.getpid()}-", "-999999999-"))
    elsewhere = final.with_name(".a.zarr.tmp-otherhost-999999999-0123abcd")
    for where in (live, dead, elsewhere):
        write_file(where / "zarr.json", "{}")
    remove_stale_siblings(final)
    assert [exists(w) for w in (live, dead, elsewhere)] == [True, False, True]


def test_exclusive_creation_is_a_conditional_put(s3_storage):
    lock = new_bucket(s3_storage) / "out" / "lock"
    assert create_exclusive(lock, "first")
    assert not create_exclusive(lock, "second")
    assert read_text(lock) == "first"
    remove_file(lock)
    assert create_exclusive(lock, "third")


def test_a_missing_chunk_is_named_not_read_as_zeros(s3_storage):
    final = new_bucket(s3_storage) / "a.zarr"
    _store(final, 5)
    array = open_group(final)["0"]
    verify_chunks(array)
    final.filesystem().rm_file(f"{final.path}/0/c/1/0")
    with pytest.raises(StoreError, match=rf"^s3://{final.path}/0: chunk c/1/0: missing$"):
        verify_chunks(open_group(final)["0"])


def test_removing_a_tree_and_measuring_it(s3_storage):
    final = new_bucket(s3_storage) / "a.zarr"
    _store(final, 5)
    assert tree_bytes(final) > 0
    remove_tree(final)
    assert not exists(final) and tree_bytes(final) == 0
    remove_tree(final)  # absent: nothing to do


def test_writable_folder_probes_without_a_local_folder(s3_storage, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    work = new_bucket(s3_storage) / "work"
    assert writable_folder(work) == work and objects(work) == {}
    missing = parse_location("s3://no-such-bucket-segflow/work", s3_storage)
    with pytest.raises(OutputError, match=r"^s3://no-such-bucket-segflow/work: cannot write here"):
        writable_folder(missing)
    assert list(tmp_path.iterdir()) == []


def test_zarr_arrays_on_a_prefix_travel_to_other_processes(s3_storage):
    """A Dask task gets arrays by pickle: the store, endpoint and credentials go with them."""
    final = new_bucket(s3_storage) / "a.zarr"
    _store(final, 9)
    array = pickle.loads(pickle.dumps(open_group(final, mode="r+")["0"]))
    array[:32, :32] = np.full((32, 32), 4, np.uint8)
    assert open_group(final)["0"][0, 0] == 4
    assert isinstance(zarr.open_group(final.zarr_store(read_only=True), mode="r"), zarr.Group)
