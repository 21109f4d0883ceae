"""Speed of segcore.augment.augment_batch on a paper-sized batch (4 x C x 572 x 572).

Prints, per interpolation mode and channel count, the median seconds per batch over a few
repeats, the input megapixels per second, and the share of the time the elastic resampling
takes (alternating with runs with elastic=False, which give the rest), all in one run.
Usage: python benchmarks/augment.py [--device cuda] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from segcore.augment import AugmentConfig, augment_batch


def _seconds(batch: tuple, config: AugmentConfig, generator: torch.Generator, device: str) -> float:
    """Wall time of one augment_batch call, waiting for the device to finish."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    augment_batch(*batch, config, generator)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def median_seconds(
    batch: tuple, configs: list[AugmentConfig], device: str, repeats: int
) -> list[float]:
    """Median seconds per config; the configs alternate so that load changes hit all alike."""
    generator = torch.Generator(device=device).manual_seed(0)
    for config in configs:
        _seconds(batch, config, generator, device)  # warm-up
    times = [[_seconds(batch, c, generator, device) for c in configs] for _ in range(repeats)]
    return [statistics.median(column) for column in zip(*times, strict=True)]


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
            configs = [config, replace(config, elastic=False)]
            full, rest = median_seconds(batch, configs, args.device, args.repeats)
            mpx = n * side * side / 1e6
            print(
                f"C={channels} {mode:8s}: {full:.4f} s/batch, {mpx / full:.1f} input Mpx/s, "
                f"elastic share {(full - rest) / full:.2f}"
            )


if __name__ == "__main__":
    main()
