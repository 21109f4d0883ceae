"""Export memory bar (issue 13): peak RSS exporting a 4096^2 and a 16384^2 slide's instances.

Each slide is exported in a fresh process by `pipelines.export.export_store` (GeoJSON and the
measurement table, on local threads), and the process's peak resident memory (ru_maxrss) is
printed for both, with the ratio large/small; the bar is a ratio within 25%. Holding the
slide's instance labels alone would take 4 x H x W bytes; that figure is printed beside each.

The stores are synthetic: one 1024^2 patch of random non-overlapping discs (radius 4-9 px)
repeated over the slide on a grid shifted half a patch from the 1024^2 chunk grid, so that the
discs in the middle of each patch cross chunk faces and corners; each repeat has its own ids.
The image is the discs, bright on dark, one value per channel. Stores and exports are kept in
--workdir.

Usage: python benchmarks/export.py [--sizes 4096 16384] [--workdir DIR] [--in-flight 4]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import peak_memory  # benchmarks/, beside this script
import zarr

from segcore import ngff
from segcore.store import STORE_FORMAT

CHUNK = 1024
PATCH = 1024
SHIFT = PATCH // 2


def disc_patch(seed: int = 0, tries: int = 2000) -> np.ndarray:
    """PATCH^2 uint32 ids of non-overlapping discs kept 1 px off the patch edges and apart."""
    rng = np.random.default_rng(seed)
    patch = np.zeros((PATCH, PATCH), np.uint32)
    yy, xx = np.mgrid[-10:11, -10:11]
    n = 0
    for _ in range(tries):
        r = int(rng.integers(4, 10))
        cy, cx = rng.integers(r + 2, PATCH - r - 2, size=2)
        window = patch[cy - r - 1 : cy + r + 2, cx - r - 1 : cx + r + 2]
        if window.any():
            continue  # keeps a 1-px gap: discs never touch
        disc = (yy**2 + xx**2 <= r * r)[10 - r - 1 : 10 + r + 2, 10 - r - 1 : 10 + r + 2]
        n += 1
        window[disc] = n
    return patch


def synthetic_store(workdir: Path, size: int) -> tuple[Path, int]:
    """A size x size store with image and instances (cached in `workdir`); its object count."""
    path = workdir / f"export-{size}.zarr"
    done = path / "complete"
    if done.exists():
        return path, int(done.read_text())
    patch = disc_patch()
    per_patch = int(patch.max())
    repeats = size // PATCH + 2
    root = zarr.open_group(path, mode="w")
    root.attrs["segflow"] = {"store_format": STORE_FORMAT, "mpp": 0.25, "tissue_downsample": 1}
    ngff.create_image(root, (3, size, size), np.uint8, chunk_size=CHUNK, min_level_size=10**9)
    ngff.create_label(root, "instances", (size, size), np.uint32, 1, chunk_size=CHUNK)
    image, instances = root["0"], root["labels/instances/0"]
    ids = set()
    for y in range(0, size, CHUNK):
        for x in range(0, size, CHUNK):
            rows, cols = np.arange(y, min(y + CHUNK, size)), np.arange(x, min(x + CHUNK, size))
            tile_r, local_r = np.divmod(rows + SHIFT, PATCH)
            tile_c, local_c = np.divmod(cols + SHIFT, PATCH)
            local = patch[local_r[:, None], local_c[None, :]]
            offset = (tile_r[:, None] * repeats + tile_c[None, :]).astype(np.uint32) * per_patch
            labels = np.where(local > 0, local + offset, 0).astype(np.uint32)
            instances[y : y + len(rows), x : x + len(cols)] = labels
            bright = (labels > 0).astype(np.uint8)
            image[:, y : y + len(rows), x : x + len(cols)] = np.stack(
                [60 + 110 * bright, 40 + 90 * bright, 80 + 100 * bright]
            )
            ids.update(np.unique(labels[labels > 0]).tolist())
    done.write_text(str(len(ids)))
    return path, len(ids)


def export_one(args: argparse.Namespace) -> None:
    """Child mode: export one store; figures as JSON on stdout."""
    from pipelines.export import export_store

    store = Path(args.run_one)
    result = export_store(store, store.parent / "exported", max_in_flight=args.in_flight)
    figures = {
        "peak_rss": peak_memory.peak_rss(),
        "seconds": result.seconds,
        "objects": result.n_objects,
        "crossing": result.n_crossing,
        "bytes": {p.suffix: p.stat().st_size for p in result.files},
    }
    print(json.dumps(figures))


def run_child(args: argparse.Namespace, store: Path) -> dict:
    return peak_memory.run_child(
        __file__, ["--run-one", str(store), "--in-flight", str(args.in_flight)]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[4096, 16384])
    parser.add_argument("--workdir", default="/tmp/segflow-export-memory")
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        export_one(args)
        return
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    peaks = []
    for size in args.sizes:
        start = time.perf_counter()
        store, n_objects = synthetic_store(workdir, size)
        built = time.perf_counter() - start
        figures = run_child(args, store)
        assert figures["objects"] == n_objects, (figures["objects"], n_objects)
        peaks.append(figures["peak_rss"])
        sizes = ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in figures["bytes"].items())
        print(
            f"export {size}^2: peak RSS {figures['peak_rss'] / 2**20:6.0f} MiB, "
            f"{figures['objects']} objects ({figures['crossing']} across chunk faces) in "
            f"{figures['seconds']:.0f} s (store {built:.0f} s); {sizes}; "
            f"the instance labels alone would be {4 * size * size / 2**20:.0f} MiB"
        )
    peak_memory.print_ratio(args.sizes, peaks)


if __name__ == "__main__":
    main()
