"""Exports of a store's instances for other tools: a QuPath-readable GeoJSON FeatureCollection
(one Feature per nucleus) and a per-object measurement table, streamed chunk by chunk."""

from pipelines.export.slide import (
    FORMATS,
    ExportResult,
    Format,
    export_paths,
    export_store,
    object_id,
)
from pipelines.export.source import ExportError, ExportSource

__all__ = [
    "FORMATS",
    "ExportError",
    "ExportResult",
    "ExportSource",
    "Format",
    "export_paths",
    "export_store",
    "object_id",
]
