"""Speed and peak memory of `write_synthetic_slide`, small slide against large.

Each size runs in its own process so that its peak resident memory is its own. Prints seconds,
megapixels per second, MB written per second and peak RSS per size, then the ratio of the
peak RSS to the ratio of pixels (target: peak RSS flat, far under the slide's raw size).
Usage: python benchmarks/synthetic.py [--size 20000] [--small 4096] [--tile 512]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from segcore.synthetic import write_synthetic_slide


def _child(side: int, tile: int, seed: int, out: Path) -> None:
    """Write one slide and print its figures as JSON (run in a fresh process)."""
    start = time.perf_counter()
    slide = write_synthetic_slide(out / "slide.tif", out / "labels.tif", side, side, seed, tile)
    seconds = time.perf_counter() - start
    written = slide.image_path.stat().st_size + slide.labels_path.stat().st_size
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(
        json.dumps(
            dict(side=side, seconds=seconds, bytes=written, rss=peak_rss, nuclei=slide.n_nuclei)
        )
    )


def _measure(side: int, tile: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="synthetic-bench-") as out:
        args = [sys.executable, __file__, "--child", str(side), "--tile", str(tile)]
        args += ["--seed", str(seed), "--out", out]
        done = subprocess.run(args, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20000)
    parser.add_argument("--small", type=int, default=4096)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.tile, args.seed, args.out)
        return

    results = [_measure(side, args.tile, args.seed) for side in (args.small, args.size)]
    for r in results:
        mpx = r["side"] ** 2 / 1e6
        raw_mb = r["side"] ** 2 * 7 / 1e6  # RGB uint8 + uint32 labels, uncompressed
        print(
            f"{r['side']}x{r['side']}: {r['seconds']:.1f} s, {mpx / r['seconds']:.1f} Mpx/s, "
            f"{r['bytes'] / 1e6 / r['seconds']:.1f} MB/s written ({r['bytes'] / 1e6:.0f} MB), "
            f"peak RSS {r['rss'] / 1e6:.0f} MB (raw slide {raw_mb:.0f} MB), "
            f"{r['nuclei']} nuclei"
        )
    small, large = results
    print(
        f"pixels x{(large['side'] / small['side']) ** 2:.1f}, "
        f"seconds x{large['seconds'] / small['seconds']:.1f}, "
        f"peak RSS x{large['rss'] / small['rss']:.2f}"
    )


if __name__ == "__main__":
    main()
