"""`segflow demo` (what `make demo` runs): a synthetic archive through the whole pipeline.

Writes 3 labelled 1024 x 1024 slides and 1 unlabelled 2048 x 2048 slide (its true labels
kept aside, out of the pipeline's sight), runs `pipeline_flow` with a small, fast training
configuration (saved as `<workdir>/demo.yaml`, so `segflow run --config` repeats it), draws an
overlay PNG per segmented slide, scores the unlabelled slide against its hidden truth, and
prints where everything is and how to look at it.
"""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
import yaml
from rich.console import Console
from rich.text import Text

from flows.configs import load
from flows.console import summary_table, trained_lines
from flows.overlay import write_overlay
from flows.pipeline import PipelineConfig, pipeline_flow
from flows.runner import run_flow
from flows.runtime import prefect_api_url, prefect_database_url, prefect_dir
from pipelines.location import local_path
from pipelines.redaction import redact_uri
from pipelines.runtime import Runtime
from pipelines.storage import writable_folder
from segcore.metrics import segmentation_scores
from segcore.store import SlideStore
from segcore.synthetic import write_synthetic_slide


@dataclass(frozen=True)
class DemoSlide:
    name: str
    size: int
    seed: int
    labelled: bool


SLIDES = (
    DemoSlide("demo-1", 1024, 1, True),
    DemoSlide("demo-2", 1024, 2, True),
    DemoSlide("demo-3", 1024, 3, True),
    DemoSlide("demo-4", 2048, 4, False),
)

#: Said on screen and in the run's artifact: a synthetic score is not a model's quality.
WIRING_NOTE = (
    "synthetic slides: these scores check that the stages fit together, not how good the model "
    "is; for that, see benchmarks/monuseg.py (H&E nuclei) and benchmarks/isbi2012.py (EM)"
)

#: Small enough to train in about a minute on 2 CPU cores, big enough to find the nuclei.
DEMO_CONFIG = {
    "train": {
        "model": {"base_channels": 16, "depth": 3, "dropout": 0.0},
        "output_size": 128,
        "batch_size": 4,
        "max_steps": 150,
        "steps_per_epoch": 75,
        "checkpoint_every": 75,
        "num_workers": 0,
        "optimizer": {"name": "adamw", "lr": 0.003},
        "loss": "weighted_ce",
    },
    "infer": {"batch_size": 4},
    "holdout": 1,
    "note": WIRING_NOTE,
}


def write_archive(archive: Path, truth: Path) -> list[Path]:
    """The demo slides (deterministic; kept when already there). The unlabelled slide's labels
    go to `truth`, where ingest does not look."""
    archive.mkdir(parents=True, exist_ok=True)
    truth.mkdir(parents=True, exist_ok=True)
    images = []
    for slide in SLIDES:
        image = archive / f"{slide.name}.tif"
        labels = (archive if slide.labelled else truth) / f"{slide.name}_labels.tif"
        if not (image.exists() and labels.exists()):
            write_synthetic_slide(image, labels, slide.size, slide.size, seed=slide.seed)
        images.append(image)
    return images


def hidden_truth_scores(store: Path, truth: Path) -> dict[str, float]:
    """Segmentation of an unlabelled slide against its synthetic truth (foreground = cells)."""
    predicted = np.asarray(SlideStore.open(store).segmentation[:])
    true = (tifffile.imread(truth) > 0).astype(np.uint8)
    return segmentation_scores(true, predicted)


def run_demo(
    runtime: Runtime, config_path: Path | None, overrides: list[str], verbose: bool = False
) -> int:
    """Run the demo under `runtime.workdir` (a local folder: the demo writes its archive,
    configuration and overlays there as files); returns the exit status."""
    started = time.perf_counter()
    workdir = writable_folder(local_path(runtime.workdir, "the demo's workdir"))
    archive, truth = workdir / "archive", workdir / "truth"
    console = Console(soft_wrap=True)  # commands must stay on one line to be copied
    demo_defaults = {"archive": str(archive), **DEMO_CONFIG}
    # Checked before anything is written: a bad override leaves no archive behind.
    config: PipelineConfig = load(PipelineConfig, config_path, overrides, demo_defaults)
    console.print(f"[bold]segflow demo[/] in {workdir}")
    write_archive(archive, truth)
    console.print(f"synthetic archive: {len(SLIDES)} slides in {archive}")
    if config_path is None:
        (workdir / "demo.yaml").write_text(yaml.safe_dump(demo_defaults, sort_keys=False))

    outcome = run_flow(pipeline_flow, runtime, verbose=verbose, config=config)
    summary = outcome.summary
    console.print(summary_table(summary))

    overlays = []
    for store in summary.stores("infer"):
        overlays.append(write_overlay(store, workdir / "overlays" / f"{store.stem}.png"))
    hidden = [s for s in SLIDES if not s.labelled]
    scores = {
        s.name: hidden_truth_scores(
            runtime.stores_dir / f"{s.name}.zarr", truth / f"{s.name}_labels.tif"
        )
        for s in hidden
        if (runtime.stores_dir / f"{s.name}.zarr") in summary.stores("infer")
    }
    _report(console, runtime, summary, outcome.flow_run_id, overlays, scores, started)
    for failure in summary.failures:
        print(f"segflow: error: {failure.detail or failure.slide}", file=sys.stderr)
    return 1 if summary.failures else 0


def _report(console, runtime, summary, flow_run_id, overlays, scores, started) -> None:
    q = shlex.quote
    console.print()
    console.print("[bold]What happened[/]")
    console.print(f"  {summary.headline()} in {time.perf_counter() - started:.0f} s")
    if summary.trained is not None:
        for line in trained_lines(summary.trained, runtime.mlflow_uri):
            console.print(Text(f"  {line}"))
    if summary.segmented_with:
        console.print(f"  segmented every slide with {summary.segmented_with}")
    for name, score in scores.items():
        console.print(
            f"  {name} (no labels given) against its hidden truth: IoU {score['iou']:.4f}, "
            f"Dice {score['dice']:.4f}, pixel error {score['pixel_error']:.2e}"
        )
    console.print(f"  note: {WIRING_NOTE}")
    console.print()
    console.print("[bold]Where things are[/]")
    console.print(f"  slide stores (OME-Zarr):  {runtime.stores_dir}")
    console.print(f"  overlays (PNG):           {runtime.workdir / 'overlays'}")
    for path in overlays:
        console.print(f"    {path}")
    console.print(f"  MLflow:                   {redact_uri(runtime.mlflow_uri)}")
    console.print(f"  Prefect flow run:         {flow_run_id}")
    console.print()
    console.print("[bold]Look at it[/]")
    if runtime.tracking_uri is None:
        console.print(
            f"  MLflow UI:   mlflow ui --backend-store-uri {q(runtime.mlflow_uri)} --port 5000"
            "   # then http://127.0.0.1:5000"
        )
    if prefect_api_url(runtime) is None:
        url = prefect_database_url(prefect_dir(runtime))
        console.print(
            f"  Prefect UI:  PREFECT_SERVER_DATABASE_CONNECTION_URL={q(url)} prefect server start"
        )
        console.print(f"               then http://127.0.0.1:4200/runs/flow-run/{flow_run_id}")
    if overlays:
        store = runtime.stores_dir / f"{overlays[-1].stem}.zarr"
        console.print(f"  Viewer:      napari --plugin napari-ome-zarr {q(str(store))}")
    console.print(f"  Again:       segflow run --config {q(str(runtime.workdir / 'demo.yaml'))}")
