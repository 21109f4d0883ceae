"""ISBI 2012 EM segmentation: train on slices 0-24, score held-out slices 25-29 once.

The 30 slices of ../shared/data/isbi2012_em are ingested into slide stores (pipelines.ingest;
the binary label PNGs' connected components become cells) and given targets and weight maps
(pipelines.weightmaps). A reduced-width U-Net trains through `pipelines.train.train` on slices
0-23 and validates on slice 24, which alone picks the best checkpoint. Slices 25-29 are used
once, after training: the registered model segments them through `pipelines.infer` (one
overlap-tile pass, and averaged over the 8 flips and rotations as the paper did for ISBI);
foreground = cell (label 255).

Prints foreground IoU, pixel error, Rand error (ISBI 2012 definition; `rand_error_best` at
the best threshold of the cell probability) on 25-29, with and without test-time averaging,
and the wall time. Bar on a 2-core CPU: IoU >= 0.85 and pixel error <= 0.10 in at most 30
minutes; aim: rand_error_best <= 0.25.
Usage: python benchmarks/isbi2012.py [--steps 1200] [--workdir DIR] [--base 16] [--depth 4]
       [--batch-norm] [--loss ce|weighted_ce]

The defaults (plain CE, 1200 steps) meet the bar. For the Rand error aim, measured idle:
`--loss weighted_ce --batch-norm --steps 4500` takes 14.4 min and scores rand_error_best 0.223
with the 8-fold test-time averaging (0.276 on one pass), IoU 0.879, pixel error 0.102 on one
pass (0.098 averaged): the weighted loss closes membranes, at a little pixel error.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from PIL import Image

from pipelines.cluster import ClusterConfig, dask_client
from pipelines.infer import InferConfig, infer_archive
from pipelines.ingest import IngestConfig, ingest_archive
from pipelines.sources import SlideSource
from pipelines.train import TrainConfig, train
from pipelines.weightmaps import WeightsConfig, compute_weight_maps
from segcore.metrics import rand_error_best, segmentation_scores

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


#: The registered model on the held-out slices, as `segflow infer` runs it: one overlap-tile
#: pass, and the paper's test-time averaging over the 8 flips and rotations.
VARIANTS = {"plain": {}, "dihedral": {"test_time_augmentation": "dihedral"}}


def held_out_scores(
    stores: dict[int, Path], model_uri: str, tracking_uri: str, work: Path, name: str
) -> dict[str, float]:
    """Scores of the registered model on slices 25-29 against the raw labels (255 = cell),
    through `pipelines.infer`; `rand_error_best` thresholds the cell probability."""
    output_dir = work / "predictions" / name
    config = InferConfig(
        probabilities="float16",
        output_dir=output_dir,
        progress=False,
        tracking_uri=tracking_uri,
        **VARIANTS[name],
    )
    results = infer_archive([stores[i] for i in HELD_OUT], model_uri, config)
    failed = [r for r in results if r.status == "failed"]
    if failed:
        raise SystemExit(f"inference failed: {failed[0].error}")
    truth, predicted, probability = [], [], []
    for i in HELD_OUT:
        out = zarr.open_group(output_dir / stores[i].name, mode="r")
        predicted.append(np.asarray(out["labels/segmentation/0"][...]))
        probability.append(np.asarray(out["probabilities/0"][1], dtype=np.float32))
        truth.append((np.asarray(Image.open(DATA / "label" / f"{i}.png")) == 255).astype(np.uint8))
    scores = segmentation_scores(np.stack(truth), np.stack(predicted))
    best, threshold = rand_error_best(np.stack(truth), np.stack(probability))
    return scores | {"rand_error_best": best, "best_threshold": threshold}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--val-every", type=int, default=100, help="steps between validations")
    parser.add_argument("--base", type=int, default=16)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument(
        "--batch-norm",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="batch norm after each conv",
    )
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
            model={
                "base_channels": args.base,
                "depth": args.depth,
                "batch_norm": args.batch_norm,
                "dropout": 0.5,
            },
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
        scored = {}
        for name in VARIANTS:
            mark = time.perf_counter()
            scored[name] = held_out_scores(
                stores, result.model_uri, config.resolved_tracking_uri, work, name
            )
            scored[name]["seconds"] = time.perf_counter() - mark
        scores = scored["plain"]
    wall = time.perf_counter() - start
    print(
        f"U-Net base {args.base} depth {args.depth}{' batch norm' if args.batch_norm else ''}, "
        f"{args.steps} steps of "
        f"{args.batch} x {args.output}^2 output px, loss {args.loss}"
    )
    print(f"validation (slice 24, best checkpoint): IoU {result.metrics['best_val_iou']:.4f}")
    for name, row in scored.items():
        print(
            f"held-out slices 25-29, {name}: foreground IoU {row['iou']:.4f}  "
            f"pixel error {row['pixel_error']:.4f}  Rand error {row['rand_error']:.4f}  "
            f"rand_error_best {row['rand_error_best']:.4f} (threshold "
            f"{row['best_threshold']:.1f})  Dice {row['dice']:.4f}  ({row['seconds']:.0f} s)"
        )
    print(
        f"wall time {wall / 60:.1f} min (stores {prepared - start:.0f} s, "
        f"training {trained - prepared:.0f} s, held-out scoring {wall - (trained - start):.0f} s)"
    )
    passed = scores["iou"] >= 0.85 and scores["pixel_error"] <= 0.10 and wall <= 1800
    print(f"bar (IoU >= 0.85, pixel error <= 0.10, <= 30 min): {'PASS' if passed else 'FAIL'}")
    best = min(row["rand_error_best"] for row in scored.values())
    print(f"aim (rand_error_best <= 0.25 in 30 min): {'met' if best <= 0.25 else 'not met'}")


if __name__ == "__main__":
    main()
