"""Do torch's CPU threads per forward pass change the bits of a U-Net's output?

Runs the same overlap-tile prediction of a synthetic slide region under each thread count,
each in a fresh process (oneDNN picks its kernels when a process first meets a shape), and
prints, per count, how many logits and class-map pixels differ from the 1-thread run.
Usage: python benchmarks/thread_bits.py [--threads 1 2 3 4] [--size 512] [--base 16]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from segcore.model import UNet
from segcore.synthetic import SlideSpec, render_region
from segcore.tiling import predict_tiled


def _predict(args: argparse.Namespace, threads: int, out: Path) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = UNet(3, 2, base_channels=args.base, depth=args.depth, dropout=0.0).eval()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    spec = SlideSpec(height=args.size, width=args.size, seed=0)
    image, _ = render_region(spec, 0, 0, args.size, args.size)
    pixels = image.transpose(2, 0, 1).astype(np.float32) / 255
    logits = predict_tiled(model, pixels, args.tile, args.batch)
    np.save(out, logits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--tile", type=int, default=188)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--base", type=int, default=16)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one count
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        _predict(args, args.one, args.out)
        return

    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for n in args.threads:
            out = Path(tmp) / f"{n}.npy"
            cmd = [sys.executable, __file__, "--one", str(n), "--out", str(out)]
            cmd += ["--channels-last"] if args.channels_last else []
            cmd += ["--size", str(args.size), "--tile", str(args.tile), "--batch", str(args.batch)]
            cmd += ["--base", str(args.base), "--depth", str(args.depth)]
            subprocess.run(cmd, check=True)
            runs[n] = np.load(out)
    reference = runs[args.threads[0]]
    print(
        f"torch {torch.__version__}, U-Net base {args.base} depth {args.depth}, "
        f"{args.size}² px, tile {args.tile}, channels_last={args.channels_last}"
    )
    for n, logits in runs.items():
        differ = int((logits != reference).sum())
        classes = int((logits.argmax(0) != reference.argmax(0)).sum())
        worst = float(np.abs(logits - reference).max())
        print(
            f"  {n} threads vs {args.threads[0]}: {differ} of {logits.size} logits differ "
            f"(max {worst:.2e}), {classes} class-map px differ"
        )


if __name__ == "__main__":
    main()
