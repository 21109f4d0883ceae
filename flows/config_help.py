"""`segflow config [STAGE]`: every configuration key of a command, with its type, default and
meaning, derived from the typed configurations themselves so the list cannot drift from them.

    $ segflow config weights
    weights: WeightsConfig (Weight-map settings (Ronneberger et al. 2015: w0=10, sigma=5 px).)
      w0                          float          10.0      ...
      cluster.n_workers           int            2
      cluster.connect_timeout_s   float          10.0      Seconds to wait for the scheduler ...

Nested settings (pydantic models and dataclasses) are expanded into dotted keys, as `key=value`
overrides and YAML sections take them. A key's meaning is its `Field(description=...)`, else
the comment right above its declaration (`#:` or `#`), first sentence only.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import re
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePath
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml
from pydantic import BaseModel, TypeAdapter

from pipelines.location import Where
from pipelines.redaction import redact_text

#: The configuration each command takes, as "module:class", imported only when asked for (the
#: stages' modules load torch, which `--help` should not wait for).
STAGE_CONFIGS = {
    "ingest": "pipelines.ingest:IngestConfig",
    "bootstrap": "pipelines.bootstrap:BootstrapConfig",
    "weights": "pipelines.weightmaps:WeightsConfig",
    "train": "pipelines.training.config:TrainConfig",
    "infer": "pipelines.infer:InferConfig",
    "run": "flows.pipeline:PipelineConfig",
}
#: serve and demo take the pipeline's configuration.
COMMAND_STAGES = {**{stage: stage for stage in STAGE_CONFIGS}, "serve": "run", "demo": "run"}
#: One valid `key=value` example per command, shown in its --help (tests load each one).
EXAMPLES = {
    "ingest": "chunk_size=512",
    "bootstrap": "nucleus=3,7 clustering.max_iterations=200",
    "weights": "block_size=1024",
    "train": "optimizer.lr=0.001 max_steps=200",
    "infer": "batch_size=8 device=cpu",
    "run": "train.max_steps=200 ingest.chunk_size=512",
    "serve": "train.max_steps=200 infer.batch_size=8",
    "demo": "train.max_steps=50",
}
_COMMENT = re.compile(r"\s*#:?\s?(.*)")
_FIELD = re.compile(r"\s*(\w+)\s*:")


@dataclass(frozen=True)
class ConfigKey:
    """One dotted key of a configuration."""

    name: str
    type: str
    default: str
    meaning: str


def stage_config(stage: str) -> type:
    """The configuration class of `stage` (a key of COMMAND_STAGES)."""
    module, _, name = STAGE_CONFIGS[COMMAND_STAGES[stage]].partition(":")
    return getattr(importlib.import_module(module), name)


def config_keys(config: type, prefix: str = "", defaults: object = None) -> list[ConfigKey]:
    """Every key of a pydantic model or dataclass, nested ones expanded and dotted. A nested
    section's defaults are those of the instance its parent defaults to (`defaults`), which
    may differ from its class's own (infer's cluster runs in-process)."""
    keys: list[ConfigKey] = []
    comments = field_comments(config)
    for name, annotation, default, description in _fields(config):
        if defaults is not None:
            default = getattr(defaults, name)
        if _is_section(annotation):
            keys += config_keys(annotation, f"{prefix}{name}.", default)
            continue
        shown = "required" if default is REQUIRED else _shown(default, annotation)
        meaning = description or comments.get(name) or _doc_line(_section_of(annotation))
        keys.append(ConfigKey(prefix + name, type_name(annotation), shown, meaning))
    return keys


def render(stage: str) -> Iterator[str]:
    """Lines listing `stage`'s keys in aligned columns: key, type, default, meaning."""
    config = stage_config(stage)
    keys = config_keys(config)
    yield f"{stage}: {config.__name__} ({_doc_line(config)})"
    widths = [max(len(getattr(k, column)) for k in keys) for column in ("name", "type", "default")]
    for key in keys:
        cells = (key.name, key.type, key.default)
        line = "  " + "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))
        yield (line + "  " + key.meaning).rstrip()


def type_name(annotation: Any) -> str:
    """`int | None`, `list[path|url]`, `'sgd' | 'adamw'`: how a value is written, briefly (a
    location, `pipelines.location.Where`, is a local path or an object-storage URL)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return type_name(args[0])
    if annotation == Where:
        return "path|url"
    if origin is Literal:
        return " | ".join(repr(arg) for arg in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(arg) for arg in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(arg) for arg in args)}]"
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and issubclass(annotation, PurePath):
        return "path"
    return getattr(annotation, "__name__", str(annotation))


def field_comments(config: type) -> dict[str, str]:
    """{field: first sentence of the comment block right above its declaration} over the
    class and its bases (a subclass's own comment wins)."""
    found: dict[str, str] = {}
    for cls in reversed(config.__mro__):
        if cls is object or not (_is_model(cls) or dataclasses.is_dataclass(cls)):
            continue
        try:
            lines = inspect.getsource(cls).splitlines()
        except (OSError, TypeError):  # no source (a frozen or generated class)
            continue
        block: list[str] = []
        for line in lines[1:]:
            comment = _COMMENT.fullmatch(line)
            if comment:
                block.append(comment[1])
                continue
            declared = _FIELD.match(line)
            if declared and block:
                found[declared[1]] = _first_sentence(" ".join(block))
            block = []
    return found


#: The default of a field that has none.
REQUIRED = object()


def _fields(config: type) -> Iterator[tuple[str, Any, Any, str]]:
    """(name, annotation, default value or REQUIRED, description) of each field."""
    if _is_model(config):
        for name, info in config.model_fields.items():
            required = info.is_required()
            default = REQUIRED if required else info.get_default(call_default_factory=True)
            yield name, info.annotation, default, info.description or ""
        return
    hints = get_type_hints(config)
    for item in dataclasses.fields(config):
        if item.default is not dataclasses.MISSING:
            default = item.default
        elif item.default_factory is not dataclasses.MISSING:
            default = item.default_factory()
        else:
            default = REQUIRED
        yield item.name, hints[item.name], default, item.metadata.get("description", "")


def _shown(value: Any, annotation: Any) -> str:
    """A default as it would be written in YAML or a `key=value` override (URIs redacted:
    a default may come from the environment)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    plain = TypeAdapter(annotation).dump_python(value, mode="json")
    text = yaml.safe_dump(plain, default_flow_style=True, width=math.inf)
    return redact_text(text.removesuffix("\n...\n").strip())


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _is_section(annotation: Any) -> bool:
    """A nested configuration whose keys are listed one by one (not an optional one: its
    fields may be required when it is given, and absent otherwise)."""
    return _is_model(annotation) or (
        isinstance(annotation, type) and dataclasses.is_dataclass(annotation)
    )


def _section_of(annotation: Any) -> type | None:
    """The nested configuration inside `X | None` or `list[X]`, for its docstring."""
    for arg in get_args(annotation):
        if _is_section(arg):
            return arg
    return None


def _doc_line(cls: type | None) -> str:
    doc = inspect.getdoc(cls) if cls is not None else None
    return _first_sentence(" ".join(doc.split())) if doc else ""


def _first_sentence(text: str) -> str:
    """Up to the first full stop followed by a space ("e.g.", "et al." stay whole)."""
    match = re.search(r"(?<!\be\.g)(?<!\bi\.e)(?<!\bal)\.\s", text)
    return text[: match.start() + 1] if match else text
