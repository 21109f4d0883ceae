"""Stage configurations from YAML plus `dotted.key=value` overrides, validated by pydantic."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel

ConfigT = TypeVar("ConfigT", bound=BaseModel)


#: Fields of any stage configuration that never change what the stage writes: where and how
#: the work runs, how it reports, and the "redo it" switches. Every "are these the settings my
#: output was made with?" question (a stage's own skip, the flows' task cache) asks
#: `output_settings`, so the rule lives here once.
NON_OUTPUT_FIELDS = frozenset(
    {
        "cluster",
        "num_workers",
        "parallel_slides",
        "max_in_flight",
        "openslide_cache_mb",
        "progress",
        "overwrite",
        "resume",
    }
)


class ConfigError(ValueError):
    """A configuration file or override is malformed."""


def output_settings(config: BaseModel, *exclude: str) -> dict:
    """The settings of a stage configuration that decide its output (JSON), less `exclude`.

    Example: IngestConfig(chunk_size=512, parallel_slides=8) -> {"chunk_size": 512, ...}
    without "parallel_slides" or "cluster": two runs differing only there write the same store.
    """
    return config.model_dump(mode="json", exclude={*NON_OUTPUT_FIELDS, *exclude})


def _set_dotted(tree: dict, dotted: str, value: object) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = tree.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
        tree = node
    tree[leaf] = value


def load_config(
    cls: type[ConfigT],
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    defaults: dict | None = None,
) -> ConfigT:
    """`cls` from YAML `path` (else the `defaults` tree, else nothing) with overrides like
    `optim.lr=0.01` applied on top.

    Override values are parsed as YAML scalars/lists, so `devices=2`, `stores=[a.zarr, b.zarr]`
    and `tracking_uri=null` do what they say.
    """
    tree: dict = copy.deepcopy(defaults or {})
    if path is not None:
        path = Path(path)
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read configuration ({exc})") from exc
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: configuration must be a mapping, got {type(tree).__name__}")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return cls.model_validate(tree)


def dump_config(config: BaseModel, path: str | Path) -> None:
    """Write `config` as YAML that `load_config` reads back to an equal object."""
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
