"""Prefect cache keys: a task whose inputs are unchanged is answered from the cache on a re-run.

A key hashes what decides a task's output and nothing else: the stage settings (less where
and how the work runs), the identity of the input (a source file's size and modification
time, a store's content checksum recorded at ingest, the weight maps a training run reads),
and for inference the pinned model version. Outputs are not part of the key (a task's own
output would change its key); instead flows.stages checks the output a cached result names
and reruns the task with the cache refreshed when it is gone. Behind the cache, every stage
still checks its own output (checksums, settings, run keys) and reports "skipped".

Worked example: re-running the weights task of `a.zarr` with the same WeightsConfig hashes
("weights", [a.zarr, <checksum of a's pixels>], <settings>) to the same key and returns the
stored WeightsResult without touching Dask; after `a.zarr/training` was deleted, the cached
result fails its check and the stage runs again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import zarr
from pydantic import BaseModel

from pipelines.config import output_settings


def segflow_version() -> str:
    try:
        return version("segflow")
    except PackageNotFoundError:
        return "unknown"


def digest(*parts: object) -> str:
    """sha256 of the JSON of `parts` (paths and models included), prefixed by segflow's version
    so a new release never reuses results of an old one."""
    payload = json.dumps([segflow_version(), *parts], sort_keys=True, default=_jsonable)
    return hashlib.sha256(payload.encode()).hexdigest()


def settings_of(config: BaseModel, *exclude: str) -> dict:
    """The settings of a stage config that decide its output (`pipelines.config`'s one rule;
    the "redo it" switches become a cache refresh in the flows instead)."""
    return output_settings(config, *exclude)


def file_identity(path: Path | None) -> list | None:
    """(absolute path, size, mtime ns) of a source file, or None when there is none."""
    if path is None:
        return None
    path = Path(path).resolve()
    try:
        stat = path.stat()
    except OSError:
        return [str(path), None]
    return [str(path), stat.st_size, stat.st_mtime_ns]


def store_identity(store: Path) -> list:
    """A store's path and the content checksum ingest recorded, or None parts when absent."""
    store = Path(store).resolve()
    attrs = _attrs(store, "")
    checksum = (attrs.get("segflow") or {}).get("checksum") if attrs is not None else None
    return [str(store), checksum]


def output_state(store: Path, array_path: str) -> dict | None:
    """The attributes a stage wrote on its output array (its settings, checksums, model),
    or None when the output is not there."""
    return _attrs(Path(store), array_path)


def stores_identity(stores: Iterable[Path], array_path: str) -> list:
    """Identity of each store plus the state of one output array in it (e.g. training/weight)."""
    return [[*store_identity(s), output_state(s, array_path)] for s in stores]


def _attrs(store: Path, path: str) -> dict | None:
    try:
        node = zarr.open(store / path if path else store, mode="r")
    except (FileNotFoundError, zarr.errors.NodeNotFoundError, ValueError, OSError):
        return None
    return dict(node.attrs)


def _jsonable(value: object) -> object:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot hash {type(value).__name__} into a cache key")
