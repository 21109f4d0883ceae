"""Shared by the flow and command-line tests: a tiny archive, tiny stage settings, and a
temporary Prefect server."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect.settings import PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
from prefect.testing.utilities import prefect_test_harness

from segcore.synthetic import write_synthetic_slide

# Small enough for seconds per stage on 2 cores; threads, not processes, for the clusters.
TINY = [
    "ingest.chunk_size=128",
    "ingest.min_level_size=64",
    "ingest.cluster.processes=false",
    "weights.block_size=128",
    "weights.cluster.processes=false",
    "train.model.base_channels=4",
    "train.model.depth=3",
    "train.max_steps=4",
    "train.steps_per_epoch=2",
    "train.output_size=64",
    "train.num_workers=0",
    "train.checkpoint_every=2",
    "infer.tile_size=124",
    "infer.block_size=128",
    "infer.cluster.processes=false",
]


def tiny_archive(folder: Path) -> Path:
    """Two labelled slides, one unlabelled, one corrupt TIFF."""
    folder.mkdir(parents=True)
    for name, seed in (("a", 1), ("b", 2)):
        write_synthetic_slide(folder / f"{name}.tif", folder / f"{name}_labels.tif", 256, 256, seed)
    truth = folder.parent / "truth"
    truth.mkdir()
    write_synthetic_slide(folder / "c.tif", truth / "c_labels.tif", 256, 256, 3)
    (folder / "broken.tif").write_bytes(b"II*\x00" + bytes(range(256)) * 2)
    return folder


@contextmanager
def prefect_api() -> Iterator[None]:
    """A temporary Prefect server (its own database) for the block, without telemetry."""
    with (
        temporary_settings({PREFECT_SERVER_ANALYTICS_ENABLED: False}),
        prefect_test_harness(server_startup_timeout=180),
    ):
        yield
