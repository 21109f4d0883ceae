"""Speed of segcore.weights.weight_map against the brute-force definition (one EDT per cell).

On one synthetic image of touching and isolated disk-shaped cells (separated as for training),
prints the seconds per megapixel of `weight_map` and of `weight_map_reference`
(tests/reference_weights.py), their ratio (target >= 20), and the largest difference between
the two maps; then the seconds `weight_map` alone takes on a larger image (the issue's bar:
4096 x 4096 with 3,000 cells in seconds).
Usage: python benchmarks/weights.py [--size 2048] [--cells 1000] [--large-size 4096]
       [--large-cells 3000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from segcore.weights import separate_touching, weight_map

# The brute-force oracle lives beside the tests that check weight_map against it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_weights import weight_map_reference  # noqa: E402


def disk_cells(side: int, n_cells: int, seed: int) -> np.ndarray:
    """At least `n_cells` cells: disks of radius 4-12 px at random centres, separated like a
    store's annotations; later disks overwrite earlier ones, so many touch, and a few vanish
    under others, which more disks make up for."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((side, side), dtype=np.uint32)
    painted = 0
    while (missing := n_cells - (len(np.unique(separate_touching(labels))) - 1)) > 0:
        for cell in range(painted + 1, painted + missing + 1):
            cy, cx = rng.uniform(0, side, size=2)
            r = rng.uniform(4, 12)
            y0, y1 = max(int(cy - r), 0), min(int(cy + r) + 2, side)
            x0, x1 = max(int(cx - r), 0), min(int(cx + r) + 2, side)
            yy, xx = np.mgrid[y0:y1, x0:x1]
            labels[y0:y1, x0:x1][(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = cell
        painted += missing
    return separate_touching(labels)


def timed(fn, *args) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--cells", type=int, default=1000)
    parser.add_argument("--large-size", type=int, default=4096)
    parser.add_argument("--large-cells", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    labels = disk_cells(args.size, args.cells, args.seed)
    mpx = labels.size / 1e6
    n_cells = len(np.unique(labels)) - 1
    print(f"image {args.size}x{args.size} ({mpx:.2f} Mpx), {n_cells} cells after separation")
    fast_s, fast = timed(weight_map, labels)
    print(f"weight_map:           {fast_s / mpx:.4f} s/Mpx ({fast_s:.2f} s)")
    slow_s, slow = timed(weight_map_reference, labels)
    print(f"weight_map_reference: {slow_s / mpx:.4f} s/Mpx ({slow_s:.2f} s)")
    print(f"speed-up: {slow_s / fast_s:.1f}x (target >= 20x)")
    print(f"max |weight_map - reference|: {np.abs(fast - slow).max():.2e} (tolerance 1e-4)")

    large = disk_cells(args.large_size, args.large_cells, args.seed + 1)
    large_s, _ = timed(weight_map, large)
    print(
        f"weight_map {args.large_size}x{args.large_size}, {len(np.unique(large)) - 1} cells: "
        f"{large_s:.2f} s ({large_s / (large.size / 1e6):.4f} s/Mpx)"
    )


if __name__ == "__main__":
    main()
