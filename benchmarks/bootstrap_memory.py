"""Label-bootstrap memory bar (issue 15): peak RSS bootstrapping a 4096^2 and a 16384^2 slide.

For each size, a synthetic H&E slide is written tile by tile (`segcore.synthetic`, so the
generator's memory does not grow with the slide) and ingested without its label image (cached
in --workdir); then a fresh process runs `pipelines.bootstrap.bootstrap_archive` on the store,
its Dask work on threads inside that process, so the process's peak resident memory (ru_maxrss)
is the stage's. Both peaks are printed with the ratio large/small; the bar is a ratio within
25%. The labels written (`labels/bootstrap`, `labels/annotations`) and the image are then
validated with ome-zarr-models, an independent NGFF 0.5 reader, each label with as many levels
as the image. A peak varies from run to run by about 10% (the allocator's and torch's caches;
4096^2 gave 1232-1502 MiB over five runs on a busy 2-core machine): rerun a ratio near the bar.

The network is narrowed (--channels, --clusters, --iterations) so the large slide takes
minutes on a CPU: memory boundedness is about how the stage reads and writes blocks, which the
network's width does not change; training draws the same tiles whatever the slide's size.

Usage: python benchmarks/bootstrap_memory.py [--sizes 4096 16384] [--workdir DIR]
       [--channels 16] [--clusters 16] [--iterations 50] [--block-size 1024] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import peak_memory  # benchmarks/, beside this script
import zarr

from pipelines.bootstrap import BOOTSTRAP, BootstrapConfig, bootstrap_archive
from pipelines.cluster import ClusterConfig
from segcore.bootstrap import ClusteringConfig
from segcore.store import ANNOTATIONS, LABELS_GROUP

SEED = 0

# What only the parent uses (slide generation, ingest, the validator) is imported where it is
# used: the child's peak then holds what the stage needs, not what the benchmark does.


def threads(n: int) -> ClusterConfig:
    """Dask workers as threads of this process: its ru_maxrss then covers all the work."""
    return ClusterConfig(n_workers=1, threads_per_worker=n, processes=False)


def unlabelled_store(workdir: Path, size: int, n_threads: int) -> Path:
    """A size x size synthetic slide ingested without labels (both cached in `workdir`)."""
    from pipelines.cluster import dask_client
    from pipelines.ingest import IngestConfig, ingest_slide
    from pipelines.sources import SlideSource
    from segcore.synthetic import write_synthetic_slide

    image = workdir / f"synthetic-{size}.tif"
    if not image.exists():
        start = time.perf_counter()
        write_synthetic_slide(image, workdir / f"synthetic-{size}_labels.tif", size, size, SEED)
        print(f"generated {image.name} in {time.perf_counter() - start:.0f} s", flush=True)
    config = IngestConfig(cluster=threads(n_threads))
    with dask_client(config.cluster) as client:
        result = ingest_slide(SlideSource(image=image), workdir / "stores", config, client)
    if result.status == "written":
        print(f"ingested {image.name} in {result.seconds:.0f} s", flush=True)
    return Path(result.store)


def bootstrap_one(args: argparse.Namespace) -> None:
    """Child mode: bootstrap one store; figures as JSON on stdout."""
    config = BootstrapConfig(
        clustering=ClusteringConfig(
            channels=args.channels, n_clusters=args.clusters, max_iterations=args.iterations
        ),
        block_size=args.block_size,
        cluster=threads(args.threads),
    )
    imported = peak_memory.peak_rss()
    start = time.perf_counter()
    (result,) = bootstrap_archive([args.run_one], config)
    if result.status != "written":
        raise SystemExit(f"{args.run_one}: bootstrap {result.status}: {result.error}")
    figures = {
        "peak_rss": peak_memory.peak_rss(),
        "imported_rss": imported,
        "seconds": time.perf_counter() - start,
        "iterations": result.iterations,
        "nucleus": list(result.nucleus or ()),
        "rule": result.rule,
        "n_instances": result.n_instances,
        "foreground_fraction": result.foreground_fraction,
    }
    print(json.dumps(figures))


def validate(store: Path) -> str:
    """The image and its bootstrap labels as ome-zarr-models reads them (raises when they are
    not NGFF 0.5, or a label lacks a level of the image): a one-line summary."""
    from ome_zarr_models.v05 import Image, ImageLabel

    image = Image.from_zarr(zarr.open_group(store, mode="r"))
    (multiscale,) = image.ome_attributes.multiscales
    levels = len(multiscale.datasets)
    listed = set(image.labels.label_paths)
    if not {BOOTSTRAP, ANNOTATIONS} <= listed:
        raise SystemExit(f"{store}: labels {sorted(listed)} lack {BOOTSTRAP} or {ANNOTATIONS}")
    for name in (BOOTSTRAP, ANNOTATIONS):
        label = ImageLabel.from_zarr(zarr.open_group(store / LABELS_GROUP / name, mode="r"))
        (label_multiscale,) = label.ome_attributes.multiscales
        if len(label_multiscale.datasets) != levels:
            raise SystemExit(
                f"{store}: labels/{name} has {len(label_multiscale.datasets)} levels, the "
                f"image {levels}"
            )
    return f"image and labels/{BOOTSTRAP}, labels/{ANNOTATIONS} valid NGFF 0.5, {levels} levels"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[4096, 16384])
    parser.add_argument("--workdir", default="/tmp/segflow-bootstrap-memory")
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--clusters", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        bootstrap_one(args)
        return
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"network channels={args.channels} n_clusters={args.clusters} max_iterations="
        f"{args.iterations}; block_size={args.block_size}, other settings BootstrapConfig's "
        f"defaults; Dask: {args.threads} threads in the measured process"
    )
    peaks = []
    for size in args.sizes:
        store = unlabelled_store(workdir, size, args.threads)
        # A rerun redoes the labels, never skips.
        shutil.rmtree(store / LABELS_GROUP / BOOTSTRAP, ignore_errors=True)
        arguments = ["--run-one", str(store), "--channels", str(args.channels)]
        arguments += ["--clusters", str(args.clusters), "--iterations", str(args.iterations)]
        arguments += ["--block-size", str(args.block_size), "--threads", str(args.threads)]
        figures = peak_memory.run_child(__file__, arguments)
        peaks.append(figures["peak_rss"])
        print(
            f"bootstrap {size}^2: peak RSS {figures['peak_rss'] / 2**20:6.0f} MiB "
            f"({figures['imported_rss'] / 2**20:.0f} MiB once imported), "
            f"{figures['seconds']:.0f} s, {figures['iterations']} iterations, nucleus clusters "
            f"{figures['nucleus']} ({figures['rule']}), {figures['n_instances']} instances, "
            f"foreground {figures['foreground_fraction']:.3f}",
            flush=True,
        )
        print(f"  {validate(store)}", flush=True)
    peak_memory.print_ratio(args.sizes, peaks)


if __name__ == "__main__":
    main()
