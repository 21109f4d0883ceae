"""ISBI 2012 EM segmentation: train on slices 0-24, score held-out slices 25-29 once.

The 30 slices of ../shared/data/isbi2012_em are ingested into slide stores (pipelines.ingest;
the binary label PNGs' connected components become cells) and given targets and weight maps
(pipelines.weightmaps). A reduced-width U-Net trains through `pipelines.train.train` on slices
0-23 and validates on slice 24, which alone picks the best checkpoint. Slices 25-29 are used
once, after training: the registered model is loaded back through `pipelines.models` and
predicts each whole slice with the overlap-tile engine; foreground = cell (label 255).

Prints foreground IoU, pixel error, Rand error (ISBI 2012 definition) on 25-29 and the wall
time. Bar on a 2-core CPU: IoU >= 0.85 and pixel error <= 0.10 in at most 30 minutes.
Usage: python benchmarks/isbi2012.py [--steps 1200] [--workdir DIR] [--base 16] [--depth 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.cluster import ClusterConfig, dask_client
from pipelines.ingest import IngestConfig, ingest_archive
from pipelines.models import load_model
from pipelines.sources import SlideSource
from pipelines.train import TrainConfig, train
from pipelines.weightmaps import WeightsConfig, compute_weight_maps
from segcore.metrics import segmentation_scores
from segcore.store import SlideStore
from segcore.tiling import predict_tiled

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "isbi2012_em" / "train"
TRAIN, VALIDATION, HELD_OUT = range(0, 24), [24], range(25, 30)


def build_stores(out: Path) -> dict[int, Path]:
    """Slice index -> slide store with training target and weight map."""
    sources = [
        SlideSource(image=DATA / "image" / f"{i}.png", labels=DATA / "label" / f"{i}.png")
        for i in range(30)
    ]
    cluster = ClusterConfig(n_workers=1, threads_per_worker=2, processes=False)
    with dask_client(cluster) as client:
        results = ingest_archive(sources, out, IngestConfig(cluster=cluster), client)
        failed = [r for r in results if r.status == "failed"]
        if failed:
            raise SystemExit(f"ingest failed: {failed[0].error}")
        for result in results:
            compute_weight_maps(result.store, WeightsConfig(cluster=cluster), client)
    return {int(r.source.name): r.store for r in results}


def held_out_scores(model_uri: str, tracking_uri: str, tile_size: int) -> dict[str, float]:
    """Scores of the registered model on slices 25-29 against the raw labels (255 = cell)."""
    model = load_model(model_uri, tracking_uri=tracking_uri)
    truth, predicted = [], []
    for i in HELD_OUT:
        image = np.asarray(Image.open(DATA / "image" / f"{i}.png"))[None]
        logits = predict_tiled(model, image, tile_size=tile_size)
        predicted.append(logits.argmax(0).astype(np.uint8))
        truth.append((np.asarray(Image.open(DATA / "label" / f"{i}.png")) == 255).astype(np.uint8))
    return segmentation_scores(np.stack(truth), np.stack(predicted))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--val-every", type=int, default=100, help="steps between validations")
    parser.add_argument("--base", type=int, default=16)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--output", type=int, default=164, help="training tile output side")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-3)
    # Plain CE by default: in a CPU budget of a few hundred steps the paper's weighted CE
    # (class balance + w0=10 on every membrane between two cells) over-predicts membrane
    # (300 steps: IoU 0.70, pixel error 0.24, against 0.85 and 0.13 for CE). It scores a
    # better Rand error with longer training; --loss weighted_ce runs it.
    parser.add_argument("--loss", default="ce")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    args = parser.parse_args()
    if not DATA.exists():
        print(f"skipped: {DATA} not found")
        return
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        stores = build_stores(work / "stores")
        prepared = time.perf_counter()
        config = TrainConfig(
            stores=[stores[i] for i in TRAIN],
            val_stores=[stores[i] for i in VALIDATION],
            model={"base_channels": args.base, "depth": args.depth, "dropout": 0.5},
            output_size=args.output,
            batch_size=args.batch,
            max_steps=args.steps,
            steps_per_epoch=args.val_every,
            checkpoint_every=args.val_every,
            log_every=10,
            optimizer={"name": "adamw", "lr": args.lr, "weight_decay": 1e-4, "schedule": "cosine"},
            loss=args.loss,
            num_workers=0,  # 2 shared cores: a loader process only competes with the model
            workdir=work / "train",
            tracking_uri=None,
            experiment="isbi2012",
            registered_model_name="isbi2012-unet",
        )
        result = train(config)
        trained = time.perf_counter()
        tile = 2 * SlideStore.open(stores[0]).shape[-1]  # one tile per slice
        scores = held_out_scores(result.model_uri, config.resolved_tracking_uri, tile)
    wall = time.perf_counter() - start
    print(
        f"U-Net base {args.base} depth {args.depth}, {args.steps} steps of "
        f"{args.batch} x {args.output}^2 output px, loss {args.loss}"
    )
    print(f"validation (slice 24, best checkpoint): IoU {result.metrics['best_val_iou']:.4f}")
    print(
        f"held-out slices 25-29: foreground IoU {scores['iou']:.4f}  "
        f"pixel error {scores['pixel_error']:.4f}  Rand error {scores['rand_error']:.4f}  "
        f"Dice {scores['dice']:.4f}"
    )
    print(
        f"wall time {wall / 60:.1f} min (stores {prepared - start:.0f} s, "
        f"training {trained - prepared:.0f} s, held-out scoring {wall - (trained - start):.0f} s)"
    )
    passed = scores["iou"] >= 0.85 and scores["pixel_error"] <= 0.10 and wall <= 1800
    print(f"bar (IoU >= 0.85, pixel error <= 0.10, <= 30 min): {'PASS' if passed else 'FAIL'}")


if __name__ == "__main__":
    main()
