"""The contract every store-writing stage (ingest, weight maps, inference) follows.

    plan      what the output would be made from: an `Identity` (the inputs' identity, the
              settings that change the output, the stage's format version, the model digest,
              and for a model's output the `NumericLayout` it is computed under)
    current?  `StageOutput.is_current`: the identity recorded with the installed output
              equals the wanted one; then the stage answers "skipped"
    run       Dask work through one bounded submitter (`pipelines.cluster.map_bounded`)
    install   a hidden temporary sibling renamed into place (`pipelines.storage.install`)
    result    a `StageResult`: status, seconds, error, the store and the identity it installed
    archive   `run_archive`: one result per item, a failure confined to its item, progress bars

Every "is this output current?" question (a stage's own skip, the flows' check of a cached
result, the cache key of the stage downstream) reads the record through `StageOutput`, so the
rule and the place it is stored exist once. Worked example, weight maps of `a.zarr`:

    WEIGHT_MAPS = StageOutput("training")             # the record's node inside a store
    wanted = Identity(stage="weights", format=1, inputs={"annotations": "9f1c..."},
                      settings={"w0": 10.0, "sigma": 5.0, ...})
    WEIGHT_MAPS.is_current(Path("a.zarr"), wanted)    # True -> "skipped"
    ... write a.zarr/.training.tmp-4242-5d0e7c11, record `wanted` on it, install ...
    WEIGHT_MAPS.recorded_key(Path("a.zarr"))          # == wanted.key
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Literal, TypeVar

import zarr
from pydantic import BaseModel, ConfigDict

from pipelines.cluster import SchedulerLostError
from pipelines.location import Location, Where
from pipelines.numerics import NumericLayout
from pipelines.progress import RunProgress, run_progress
from segcore.errors import one_line
from segcore.store import open_group

#: The attribute holding segflow's own metadata on a store node; the identity sits inside it.
SEGFLOW_ATTR = "segflow"
IDENTITY_ATTR = "identity"

Status = Literal["written", "skipped", "failed"]


class Identity(BaseModel):
    """What one stage output was made from; two outputs with equal identities are the same
    bytes. `inputs` names the inputs' content (checksums, the upstream identity keys);
    `numerics` the layout a model's output was computed under (None: no model arithmetic)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    stage: str
    format: int
    inputs: dict[str, Any]
    settings: dict[str, Any]
    model: str | None = None
    numerics: NumericLayout | None = None

    @property
    def key(self) -> str:
        """A short stable hash of the whole identity (names journal folders, cache keys).
        An identity without `numerics` hashes as it did before the field existed, so the
        stages that run no model keep their recorded keys."""
        payload = self.model_dump(
            mode="json", exclude={"numerics"} if self.numerics is None else None
        )
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class StageOutput:
    """Where in a store a stage's output lives, and so where its identity is recorded
    (`attrs["segflow"]["identity"]` of that group): "" is the store's root."""

    path: str

    def node(self, store: Where) -> Where:
        return store / self.path if self.path else store

    def recorded(self, store: Where) -> Identity | None:
        """The identity installed with the output in `store`, or None when there is none
        (no output, an output from before identities, an unreadable one)."""
        try:
            attrs = open_group(self.node(store), mode="r").attrs
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError, OSError):
            return None
        record = (attrs.get(SEGFLOW_ATTR) or {}).get(IDENTITY_ATTR)
        try:
            return Identity.model_validate(record) if record is not None else None
        except ValueError:
            return None

    def recorded_key(self, store: Where) -> str | None:
        identity = self.recorded(store)
        return identity.key if identity is not None else None

    def is_current(self, store: Where, wanted: Identity | str) -> bool:
        """Whether the output in `store` was made from `wanted` (an identity or its key)."""
        key = wanted if isinstance(wanted, str) else wanted.key
        return self.recorded_key(store) == key

    def holds(self, result: StageResult) -> bool:
        """Whether the output a result reports is still the one installed (e.g. a result
        answered from a cache, whose store may since have been rewritten or deleted)."""
        return result.identity is not None and self.is_current(result.where(), result.identity)


def segflow_version() -> str:
    try:
        return version("segflow")
    except PackageNotFoundError:
        return "unknown"


def record_identity(group: zarr.Group, identity: Identity, metadata: dict | None = None) -> None:
    """Write `identity`, with the stage's other metadata, on the output's group (in its
    temporary folder, before install)."""
    group.attrs[SEGFLOW_ATTR] = {
        **(metadata or {}),
        IDENTITY_ATTR: identity.model_dump(mode="json"),
        "segflow_version": segflow_version(),
        "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


class StageResult(BaseModel):
    """What a stage did for one store: "written", "skipped" (its output was current) or
    "failed" (with a one-line `error`). `identity` is the key of the output installed."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    store: Location
    status: Status
    error: str | None = None
    seconds: float = 0.0
    identity: str | None = None
    #: Where the output went when not into `store` itself (inference's `output_dir`).
    output: Location | None = None

    @property
    def name(self) -> str:
        return self.store.name.removesuffix(".zarr")

    def where(self) -> Where:
        """The store holding this result's output."""
        return self.output if self.output is not None else self.store


ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT", bound=StageResult)


def run_archive(
    items: Sequence[ItemT],
    run_one: Callable[[ItemT, RunProgress], ResultT],
    failed: Callable[[ItemT, str, float], ResultT],
    subject: Callable[[ItemT], Where],
    *,
    parallel: int = 1,
    progress: bool = False,
) -> list[ResultT]:
    """`run_one(item)` for every item, `parallel` at a time; one result per item, in order.

    An item that raises becomes `failed(item, error_line(subject(item), error), seconds)` and
    the others go on
    (one bad slide must not end an archive run), except when the Dask scheduler is lost: then
    no later item can run either, and the SchedulerLostError ends the call.
    """
    with run_progress(progress, len(items)) as bars:

        def guarded(item: ItemT) -> ResultT:
            start = time.perf_counter()
            try:
                return run_one(item, bars)
            except SchedulerLostError:
                raise
            except Exception as exc:
                line = error_line(subject(item), exc)
                return failed(item, line, time.perf_counter() - start)
            finally:
                bars.archive_advance()

        if parallel == 1:
            return [guarded(item) for item in items]
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            return list(pool.map(guarded, items))


def error_line(subject: Where, error: BaseException) -> str:
    """One line naming `subject` (the slide or store) and the problem: a stage's own ValueError
    says it plainly, anything unexpected also says its type.

    Example: error_line(Path("a.svs"), OSError("disk full")) -> "a.svs: OSError: disk full"
    """
    message = one_line(error)
    if not isinstance(error, ValueError):
        message = f"{type(error).__name__}: {message}"
    return message if message.startswith(str(subject)) else f"{subject}: {message}"
