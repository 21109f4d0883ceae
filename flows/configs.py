"""Command-line input checked before any flow starts: configurations and paths."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from pipelines.config import load_config
from pipelines.location import Where
from pipelines.storage import exists

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class UsageError(ValueError):
    """Bad command-line input: a missing path, a malformed configuration."""


def existing(paths: Sequence[Where]) -> list[Where]:
    """`paths` (local, or on object storage), each checked to exist."""
    for path in paths:
        if not exists(path):
            raise UsageError(f"{path}: no such file or folder")
    return list(paths)


def load(
    cls: type[ConfigT], path: Path | None, overrides: Sequence[str], defaults: dict | None = None
) -> ConfigT:
    """A configuration from YAML (or `defaults`) + `key=value` overrides; errors as one line
    naming the file."""
    if path is not None and not path.is_file():
        raise UsageError(f"{path}: no such configuration file")
    try:
        return load_config(cls, path, overrides, defaults)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in exc.errors()
        )
        where = path if path is not None else "command line"
        raise UsageError(f"{where}: invalid {cls.__name__}: {problems}") from None
