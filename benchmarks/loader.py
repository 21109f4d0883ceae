"""Training loader throughput: input Mpx/s per core of `TileDataset` reading image, target and
weight map from Zarr, with and without the decoded-chunk cache (pipelines.training.chunk_cache).

A GPU training 60 output Mpx/s (paper U-Net, 572 x 572 tiles, one H100, compiled) needs about
130 input Mpx/s from its loader: 10 per core on a 16-core host, the target printed here. One
loader process is one core, so Mpx/s of one process is Mpx/s per core.

The stores are made in the run, through the real stages: a synthetic slide of --size px
(ingest, then weights), and where ../shared/data/monuseg_train exists, the MoNuSeg training
tiles (1000 x 1000, one chunk per tile). Tiles are drawn by the training sampler (`TileSampler`,
tissue-weighted), `--draws` per measurement; the cached pass starts cold.

The S3 line reads the same stores from object storage: they are uploaded to a moto S3 server
the script starts on 127.0.0.1 (a local endpoint, so the figure is the client's cost per
request and chunk, not a network's latency; `--no-s3` leaves it out).
Usage: python benchmarks/loader.py [--workdir DIR] [--size 4096] [--input 572] [--draws 300]
       [--cache-mb 512] [--no-s3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from pipelines.ingest import IngestConfig, ingest_archive
from pipelines.location import ObjectStorageConfig, ObjectUrl, Where, parse_location
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


@contextmanager
def moto_s3() -> Iterator[ObjectStorageConfig]:
    """A moto S3 server on a free 127.0.0.1 port for the length of the block: how to reach it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        str(Path(sys.executable).with_name("moto_server")),
        "-H",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"moto_server did not start on port {port}") from None
                time.sleep(0.1)
        yield ObjectStorageConfig(
            endpoint_url=f"http://127.0.0.1:{port}", key="bench", secret="bench", region="eu-west-1"
        )
    finally:
        server.kill()
        server.wait()


def uploaded(paths: list[Path], prefix: ObjectUrl) -> list[Where]:
    """The stores `paths` copied under `prefix`, file for file."""
    fs = prefix.filesystem()
    local, remote = [], []
    for store in paths:
        for file in sorted(p for p in store.rglob("*") if p.is_file()):
            local.append(str(file))
            remote.append(f"{prefix.path}/{store.name}/{file.relative_to(store).as_posix()}")
    fs.put(local, remote)
    return [prefix / store.name for store in paths]


def input_mpx_per_s(paths: list[Where], tile: TileShape, draws: int, cache_mb: int) -> float:
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
    parser.add_argument("--no-s3", action="store_true", help="leave out the S3 line")
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
    stored = {name: prepared_stores(sources, work / "stores") for name, sources in sets.items()}
    places: dict[str, dict[str, list[Where]]] = {"local": stored}
    with nullcontext() if args.no_s3 else moto_s3() as storage:
        if storage is not None:
            bucket = parse_location("s3://loader-bench", storage)
            bucket.filesystem().mkdir(bucket.path)
            places["S3 (moto, 127.0.0.1)"] = {
                name: uploaded(paths, bucket / f"set{i}")
                for i, (name, paths) in enumerate(stored.items())
            }
        for name in sets:
            for where, by_set in places.items():
                paths = by_set[name]
                plain = input_mpx_per_s(paths, tile, args.draws, cache_mb=0)
                cached = input_mpx_per_s(paths, tile, args.draws, cache_mb=args.cache_mb)
                report[f"{name}, {where}"] = {
                    "uncached": plain,
                    f"cache {args.cache_mb} MiB": cached,
                }
                met = "met" if cached >= TARGET_MPX_PER_CORE else "NOT met"
                print(
                    f"{name}, {where}: uncached {plain:.1f} Mpx/s per core, cache "
                    f"{args.cache_mb} MiB {cached:.1f} Mpx/s per core ({cached / plain:.1f}x); "
                    f"target {TARGET_MPX_PER_CORE:.0f}: {met}",
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
