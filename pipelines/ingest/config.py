"""The settings of ingestion."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pipelines.cluster import ClusterConfig
from pipelines.config import output_settings
from pipelines.location import ObjectStorageConfig
from segcore import ngff
from segcore.tissue import TissueConfig


class IngestConfig(BaseModel):
    """Ingestion settings. Everything but `cluster`, `parallel_slides`, `overwrite` and
    `object_storage` shapes the store, and a change re-ingests slides that were ingested with
    other settings."""

    model_config = ConfigDict(extra="forbid")

    chunk_size: int = Field(default=1024, ge=16)
    #: Level-0 pixels read per Dask task, in chunks per side (2: 2048 x 2048 px regions).
    region_chunks: int = Field(default=2, ge=1)
    compression: ngff.Compression = ngff.Compression()
    #: Pyramid levels halve the slide until its shorter side is at most this many px.
    min_level_size: int = Field(default=1024, ge=1)
    tissue: TissueConfig = TissueConfig()
    #: "auto": a label image with a single non-zero value is a binary mask whose connected
    #: components become instances; any other is an instance label image.
    labels_kind: Literal["auto", "binary", "instances"] = "auto"
    openslide_cache_mb: int = Field(default=8, ge=0)
    parallel_slides: int = Field(default=2, ge=1)
    cluster: ClusterConfig = ClusterConfig()
    overwrite: bool = False
    #: How to reach slides on object storage (s3://...): endpoint, credentials, region and the
    #: staging cache of OpenSlide's formats; fields left None come from the environment
    #: (AWS_ENDPOINT_URL, ...: `pipelines.runtime.RuntimeEnvironment`).
    object_storage: ObjectStorageConfig = ObjectStorageConfig()

    def settings(self) -> dict:
        """The settings that shape a store, as stored in its metadata (where the slides are
        read from does not shape it)."""
        return output_settings(self, "object_storage")
