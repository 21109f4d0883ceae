"""Stage configurations from YAML plus `dotted.key=value` overrides, validated by pydantic.

A section given in part (YAML `cluster: {n_workers: 3}`, override `cluster.n_workers=3`) changes
only the keys it names: the rest keep the field's default value, not the section class's
defaults. Example: InferConfig's default cluster is one in-process worker with two threads
(`processes=False`), so `cluster.n_workers=3` gives three in-process workers with two threads
each, not three worker processes with one thread.
"""

from __future__ import annotations

import copy
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

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


def _deep_merge(base: dict, top: dict) -> dict:
    """`top` laid over `base`: sections present in both merge key by key, any other value in
    `top` replaces the one in `base`."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The model class a field holds (also as `Model | None`), or None for anything else."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [m for arg in typing.get_args(annotation) if (m := _section_model(arg))]
        return models[0] if len(models) == 1 else None
    return None


def _default_value(field: FieldInfo) -> Any:
    """A field's default, its factory called; None where the factory needs the other fields."""
    if field.default_factory is None:
        return field.default
    if field.default_factory_takes_validated_data:
        return None
    return field.default_factory()


def _onto_defaults(cls: type[BaseModel], tree: dict) -> dict:
    """`tree` with every model section given as a mapping laid over its field's default (at
    any depth), so a partial section keeps the defaults of the keys it does not name. Keys
    `cls` does not know are left for validation to refuse."""
    merged = dict(tree)
    for name, value in tree.items():
        field = cls.model_fields.get(name)
        model = _section_model(field.annotation) if field is not None else None
        if model is None or not isinstance(value, dict):
            continue
        default = _default_value(field)
        base = default.model_dump() if isinstance(default, BaseModel) else {}
        merged[name] = _onto_defaults(model, _deep_merge(base, value))
    return merged


def load_config(
    cls: type[ConfigT],
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    defaults: dict | None = None,
) -> ConfigT:
    """`cls` from YAML `path` (else the `defaults` tree, else nothing) with overrides like
    `optim.lr=0.01` applied on top.

    Override values are parsed as YAML scalars/lists, so `devices=2`, `stores=[a.zarr, b.zarr]`
    and `tracking_uri=null` do what they say. Partial sections keep their field's defaults for
    the keys they leave out (see the module docstring).
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
    return cls.model_validate(_onto_defaults(cls, tree))


def dump_config(config: BaseModel, path: str | Path) -> None:
    """Write `config` as YAML that `load_config` reads back to an equal object."""
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
