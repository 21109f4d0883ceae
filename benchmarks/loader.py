"""Training loader throughput: input Mpx/s per core of `TileDataset` reading image, target and
weight map from Zarr, with and without the decoded-chunk cache (pipelines.training.chunk_cache).

A GPU training 60 output Mpx/s (paper U-Net, 572 x 572 tiles, one H100, compiled) needs about
130 input Mpx/s from its loader: 10 per core on a 16-core host, the target printed here. One
loader process is one core, so Mpx/s of one process is Mpx/s per core.

The stores are made in the run, through the real stages: a synthetic slide of --size px
(ingest, then weights), and where ../shared/data/monuseg_train exists, the MoNuSeg training
tiles (1000 x 1000, one chunk per tile). Tiles are drawn by the training sampler (`TileSampler`,
tissue-weighted), `--draws` per measurement; the cached pass starts cold.
Usage: python benchmarks/loader.py [--workdir DIR] [--size 4096] [--input 572] [--draws 300]
       [--cache-mb 512] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pipelines.ingest import IngestConfig, ingest_archive
from pipelines.sources import SlideSource
from pipelines.training.data import TileDataset, TileSampler, TileShape, open_training_store
from pipelines.weightmaps import WeightsConfig, weights_archive
from segcore.synthetic import write_synthetic_slide

MONUSEG = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "monuseg_train"
TARGET_MPX_PER_CORE = 10.0


def synthetic_sources(workdir: Path, size: int) -> list[SlideSource]:
    image = workdir / f"synthetic-{size}.tif"
    labels = workdir / f"synthetic-{size}-labels.tif"
    if not image.exists():
        write_synthetic_slide(image, labels, size, size, seed=size)
    return [SlideSource(image=image, labels=labels)]


def monuseg_sources() -> list[SlideSource]:
    return [
        SlideSource(image=p, labels=MONUSEG / "labels" / f"{p.stem}.png")
        for p in sorted((MONUSEG / "images").glob("*.tif"))
    ]


def prepared_stores(sources: list[SlideSource], stores: Path) -> list[Path]:
    """Ingested stores with weight maps (both stages skip what is already current)."""
    ingested = ingest_archive(sources, stores, IngestConfig())
    failed = [r for r in ingested if r.status == "failed"]
    if failed:
        raise SystemExit(f"ingest failed: {failed[0].error}")
    paths = [r.store for r in ingested]
    weights_archive(paths, WeightsConfig())
    return paths


def input_mpx_per_s(paths: list[Path], tile: TileShape, draws: int, cache_mb: int) -> float:
    """Input Mpx/s of one process drawing `draws` tiles (image + target + weight each)."""
    stores = [open_training_store(p, with_weight=True) for p in paths]
    sampler = TileSampler(stores, tile, length=draws, seed=0, rank=0, background_weight=0.0)
    dataset = TileDataset(paths, tile, with_weight=True, cache_bytes=cache_mb * 2**20)
    positions = list(sampler)
    start = time.perf_counter()
    for position in positions:
        dataset[position]
    seconds = time.perf_counter() - start
    return len(positions) * tile.input**2 / seconds / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("loader-bench"))
    parser.add_argument("--size", type=int, default=4096, help="synthetic slide side, px")
    parser.add_argument("--input", type=int, default=572, help="input tile side (paper: 572)")
    parser.add_argument("--output", type=int, default=388, help="output tile side (paper: 388)")
    parser.add_argument("--draws", type=int, default=300)
    parser.add_argument("--cache-mb", type=int, default=512)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    tile = TileShape(input=args.input, output=args.output)

    sets = {f"synthetic {args.size}^2": synthetic_sources(work, args.size)}
    if MONUSEG.exists():
        sets["MoNuSeg 30 x 1000^2"] = monuseg_sources()
    else:
        print(f"MoNuSeg skipped: {MONUSEG} not found")
    report = {"target_input_mpx_per_s_per_core": TARGET_MPX_PER_CORE, "input_tile": args.input}
    print(f"input tile {args.input}^2, {args.draws} draws each, one process (= one core)")
    for name, sources in sets.items():
        paths = prepared_stores(sources, work / "stores")
        plain = input_mpx_per_s(paths, tile, args.draws, cache_mb=0)
        cached = input_mpx_per_s(paths, tile, args.draws, cache_mb=args.cache_mb)
        report[name] = {"uncached": plain, f"cache {args.cache_mb} MiB": cached}
        print(
            f"{name}: uncached {plain:.1f} Mpx/s per core, cache {args.cache_mb} MiB "
            f"{cached:.1f} Mpx/s per core ({cached / plain:.1f}x); target "
            f"{TARGET_MPX_PER_CORE:.0f}: {'met' if cached >= TARGET_MPX_PER_CORE else 'NOT met'}"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
