"""Speed of segcore.augment.augment_batch on a paper-sized batch (4 x C x 572 x 572).

Prints, per interpolation mode and channel count, the median seconds per batch over a few
repeats, the input megapixels per second, and the share of the time the elastic resampling
takes (the same run with elastic=False gives the rest), all measured in one run.
Usage: python benchmarks/augment.py [--device cuda] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from segcore.augment import AugmentConfig, augment_batch


def median_seconds(batch: tuple, config: AugmentConfig, device: str, repeats: int) -> float:
    """Median wall time of augment_batch over `repeats` calls after one warm-up call."""
    generator = torch.Generator(device=device).manual_seed(0)
    augment_batch(*batch, config, generator)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        augment_batch(*batch, config, generator)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--side", type=int, default=572)
    args = parser.parse_args()
    n, side = args.batch, args.side
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, batch {n} x {side}^2")
    for channels in (1, 3):
        g = torch.Generator().manual_seed(1)
        batch = (
            torch.rand(n, channels, side, side, generator=g).to(args.device),
            torch.randint(0, 2, (n, side, side), generator=g).to(args.device),
            torch.rand(n, side, side, generator=g).to(args.device),
        )
        for mode in ("bicubic", "bilinear"):
            config = AugmentConfig(image_mode=mode)
            full = median_seconds(batch, config, args.device, args.repeats)
            rest = median_seconds(batch, replace(config, elastic=False), args.device, args.repeats)
            mpx = n * side * side / 1e6
            print(
                f"C={channels} {mode:8s}: {full:.4f} s/batch, {mpx / full:.1f} input Mpx/s, "
                f"elastic share {(full - rest) / full:.2f}"
            )


if __name__ == "__main__":
    main()
