"""Stage 1, ingestion: slides and their label images become OME-Zarr slide stores.

    results = ingest_archive(find_slides([Path("slides/")]), Path("stores/"), IngestConfig())

`config` holds the settings, `writer` writes one store, `stage` decides what to write and
installs it under the stage contract (`pipelines.stage`).
"""

from pipelines.ingest.config import IngestConfig
from pipelines.ingest.stage import SLIDE_STORE, IngestResult, ingest_archive, ingest_slide
from pipelines.sources import IngestError, SlideSource

__all__ = [
    "SLIDE_STORE",
    "IngestConfig",
    "IngestError",
    "IngestResult",
    "SlideSource",
    "ingest_archive",
    "ingest_slide",
]
