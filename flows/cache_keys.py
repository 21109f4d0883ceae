"""Prefect cache keys: a task whose inputs are unchanged is answered from the cache on a re-run.

A key hashes what decides a task's output and nothing else: the stage settings (less where
and how the work runs), the identity of the input (a source file's size and modification
time; for a store, the identity the stage upstream recorded with its output, read through the
stage contract `pipelines.stage`), and for inference the pinned model version. Outputs are not
part of the key (a task's own output would change its key); instead flows.stages asks the
stage whether the output a cached result names is still installed, and reruns the task with
the cache refreshed when not. Behind the cache, every stage still decides on its own whether
its output is current and reports "skipped".

Worked example: re-running the weights task of `a.zarr` with the same WeightsConfig hashes
("weights", [a.zarr, <identity key of a's ingest>], <settings>) to the same key and returns
the stored WeightsResult without touching Dask; after `a.zarr/training` was deleted, the
cached result is no longer installed and the stage runs again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel

from pipelines.config import output_settings
from pipelines.location import ObjectUrl, Where, file_version, parse_location
from pipelines.stage import StageOutput, segflow_version


def digest(*parts: object) -> str:
    """sha256 of the JSON of `parts` (paths and models included), prefixed by segflow's version
    so a new release never reuses results of an old one."""
    payload = json.dumps([segflow_version(), *parts], sort_keys=True, default=_jsonable)
    return hashlib.sha256(payload.encode()).hexdigest()


def settings_of(config: BaseModel, *exclude: str) -> dict:
    """The settings of a stage config that decide its output (`pipelines.config`'s one rule;
    the "redo it" switches become a cache refresh in the flows instead)."""
    return output_settings(config, *exclude)


def file_identity(path: Path | ObjectUrl | None) -> list | None:
    """(absolute path, size, mtime ns) of a source file ([URL, ETag] of an object), or None
    when there is none."""
    if path is None:
        return None
    if isinstance(path, ObjectUrl):
        return [str(path), file_version(path)]
    path = Path(path).resolve()
    try:
        stat = path.stat()
    except OSError:
        return [str(path), None]
    return [str(path), stat.st_size, stat.st_mtime_ns]


def place(where: Where) -> str:
    """Where an output is, as a key names it: a local path made absolute, a URL as it is
    (without its storage settings).

    >>> place(ObjectUrl("s3", "lab/work/stores")), place(Path("/w/stores"))
    ('s3://lab/work/stores', '/w/stores')
    """
    return str(where.resolve()) if isinstance(where, Path) else str(where)


def output_identity(stores: Iterable[Where], output: StageOutput) -> list:
    """Each store's place and the identity key of one stage's output in it (None when absent).

    Example: output_identity([a.zarr], SLIDE_STORE) -> [["/abs/a.zarr", "3f9c..."]].
    """
    return [[place(s), output.recorded_key(s)] for s in map(parse_location, stores)]


def _jsonable(value: object) -> object:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot hash {type(value).__name__} into a cache key")
