"""Overhead of `predict_tiled` over the model's forward passes alone on the same tiles.

Prints seconds for both and their ratio; target: overhead under 10%.
Usage: python benchmarks/tiling.py [--size 2048] [--tile 572] [--batch 4]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from segcore.model import UNet
from segcore.tiling import plan_tiles, predict_tiled


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--tile", type=int, default=572)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--base", type=int, default=16)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs; min is kept")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = UNet(3, 2, base_channels=args.base, depth=args.depth).eval()
    image = np.random.default_rng(0).random((3, args.size, args.size), dtype=np.float32)
    plan = plan_tiles(image.shape[-2:], model.geometry, args.tile)
    n_batches = -(-len(plan) // args.batch)
    batches = [
        torch.randn(min(args.batch, len(plan) - i * args.batch), 3, *plan.tile_size)
        for i in range(n_batches)
    ]

    def forward_only() -> None:
        with torch.inference_mode():
            for batch in batches:
                model(batch)

    def tiled() -> None:
        predict_tiled(model, image, tile_size=args.tile, batch_size=args.batch)

    forward_only()  # warm-up: allocator and oneDNN primitive caches
    # Interleave the two and keep each one's best run: this machine is shared and noisy.
    forward_s, tiled_s = float("inf"), float("inf")
    for _ in range(args.repeats):
        forward_s = min(forward_s, _seconds(forward_only))
        tiled_s = min(tiled_s, _seconds(tiled))

    print(
        f"image {args.size}x{args.size}, U-Net base {args.base} depth {args.depth}, "
        f"tile {plan.tile_size[0]} -> {plan.output_size[0]} (stride {plan.stride[0]}), "
        f"{len(plan)} tiles, batch {args.batch}, {torch.get_num_threads()} threads"
    )
    print(f"forward passes alone: {forward_s:.2f} s")
    print(f"predict_tiled:        {tiled_s:.2f} s")
    print(f"overhead ratio:       {tiled_s / forward_s:.3f} (target < 1.10)")


if __name__ == "__main__":
    main()
