"""Peak memory and write speed of ingesting a synthetic slide (image + instance labels).

For each size, a fresh child process generates the slide if it is missing (cached in
--data-dir, default a folder in the system temp dir), then ingests it with `ingest_archive` on a
local Dask cluster while a sampler thread sums the resident memory of the child and all its
descendants (the Dask workers) every 50 ms. It prints peak RSS, seconds, MB/s written to disk
and uncompressed MB/s of level 0, and the ratio of peak RSS to the 1.5 GB bar. Running two sizes
shows whether memory grows with the slide.
Usage: python benchmarks/ingest.py [--sizes 10000 20000] [--data-dir DIR] [--workers 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from pipelines.cluster import ClusterConfig
from pipelines.ingest import IngestConfig, ingest_archive
from pipelines.sources import SlideSource
from segcore.synthetic import write_synthetic_slide

BAR_BYTES = 1.5e9


class TreeRssSampler:
    """Peak of the summed RSS of this process and all its descendants, sampled periodically."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _rss(self) -> int:
        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):  # a worker that just exited
                total += proc.memory_info().rss
        return total

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __enter__(self) -> TreeRssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def slide_paths(data_dir: Path, size: int) -> tuple[Path, Path]:
    return data_dir / f"synthetic-{size}-s0.tif", data_dir / f"synthetic-{size}-s0_labels.tif"


def run_one(size: int, data_dir: Path, workers: int, threads: int) -> dict:
    """Generate (if missing) and ingest one size; returns the measurements."""
    image, labels = slide_paths(data_dir, size)
    if not (image.exists() and labels.exists()):
        started = time.perf_counter()
        write_synthetic_slide(image, labels, size, size, seed=0, tile=512)
        print(f"generated {image} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    cluster = ClusterConfig(n_workers=workers, threads_per_worker=threads, processes=True)
    config = IngestConfig(cluster=cluster, overwrite=True)
    with tempfile.TemporaryDirectory(dir=data_dir, prefix="ingest-out-") as out:
        baseline = TreeRssSampler()._rss()
        with TreeRssSampler() as sampler:
            started = time.perf_counter()
            (result,) = ingest_archive([SlideSource(image=image, labels=labels)], out, config)
            seconds = time.perf_counter() - started
    if result.status != "written":
        raise SystemExit(f"ingest failed: {result.error}")
    return {
        "size": size,
        "seconds": seconds,
        "slide_seconds": result.seconds,
        "peak_rss_mb": sampler.peak / 1e6,
        "baseline_rss_mb": baseline / 1e6,
        "mb_written": result.mb_written,
        "level0_mb": 3 * size * size / 1e6,
        "source_mb": (image.stat().st_size + labels.stat().st_size) / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 20000])
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    data_dir = args.data_dir or Path(tempfile.gettempdir()) / "segflow-bench-ingest"
    data_dir.mkdir(parents=True, exist_ok=True)
    if args.one is not None:
        print(json.dumps(run_one(args.one, data_dir, args.workers, args.threads)))
        return
    print(
        f"synthetic slides in {data_dir}; Dask LocalCluster {args.workers} worker processes x "
        f"{args.threads} thread(s); RSS summed over the ingest process and its workers"
    )
    for size in args.sizes:
        # A fresh process per size, so one size's heap does not count toward the next's peak.
        command = [sys.executable, __file__, "--one", str(size), "--data-dir", str(data_dir)]
        command += ["--workers", str(args.workers), "--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"size {size} failed:\n{done.stderr}")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"{size} x {size}: peak RSS {r['peak_rss_mb']:.0f} MB "
            f"(idle {r['baseline_rss_mb']:.0f} MB, {r['peak_rss_mb'] * 1e6 / BAR_BYTES:.2f} of "
            f"the 1.5 GB bar), {r['seconds']:.1f} s, written {r['mb_written']:.0f} MB = "
            f"{r['mb_written'] / r['seconds']:.1f} MB/s on disk, "
            f"{r['level0_mb'] / r['seconds']:.1f} MB/s uncompressed level 0, "
            f"source {r['source_mb']:.0f} MB"
        )


if __name__ == "__main__":
    main()
