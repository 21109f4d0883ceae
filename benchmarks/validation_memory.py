"""Validation memory bar (issue 11): peak RSS validating a 4096^2 and a 16384^2 held-out slide.

Each slide is validated in a fresh process by the code path training uses: Lightning's
`Trainer.validate` of `UNetModule` over `pipelines.training.data.validation_loader`, i.e. block
by block with inference's planner, scores summed by `segcore.block_scores`. The process's
peak resident memory (ru_maxrss) is printed for both, with the ratio large/small; the bar is
a ratio within 25%. Validating the whole slide at once would need its image plus K x H x W
float32 logits; that figure is printed beside each for comparison.

The held-out stores are synthetic: one rendered 2048^2 patch (segcore.synthetic, with its
training target from segcore.weights) repeated over the slide, so that building a 16384^2
store takes a minute rather than the ten that rendering every pixel would. The network is an
untrained small U-Net: memory, not scores, is measured. Stores are kept in --workdir.

Usage: python benchmarks/validation_memory.py [--sizes 4096 16384] [--workdir DIR]
       [--base 4] [--depth 2] [--tile 1020] [--block-size 2048]
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
from segcore.synthetic import SlideSpec, render_region
from segcore.weights import training_target

PATCH = 2048
CHUNK = 512
N_CLASSES = 2


def held_out_store(workdir: Path, size: int) -> Path:
    """A size x size store with image and training target (cached in `workdir`)."""
    path = workdir / f"held-out-{size}.zarr"
    done = path / "complete"
    if done.exists():
        return path
    rgb, labels = render_region(SlideSpec(PATCH, PATCH, seed=11), 0, 0, PATCH, PATCH)
    image_patch = np.ascontiguousarray(rgb.transpose(2, 0, 1))
    target_patch = training_target(labels)
    root = zarr.open_group(path, mode="w")
    root.attrs["segflow"] = {
        "store_format": STORE_FORMAT,
        "tissue_downsample": 1,
        "checksum": f"synthetic:{size}",
        "source": f"benchmarks/validation_memory.py {size}",
    }
    root.attrs["ome"] = {"version": "0.5", "multiscales": [{"datasets": [{"path": "0"}]}]}
    image = ngff.create_array(root, "0", (3, size, size), np.uint8, (3, CHUNK, CHUNK))
    target = ngff.create_array(root, "training/target", (size, size), np.uint8, (CHUNK, CHUNK))
    for y in range(0, size, PATCH):
        for x in range(0, size, PATCH):
            h, w = min(PATCH, size - y), min(PATCH, size - x)
            image[:, y : y + h, x : x + w] = image_patch[:, :h, :w]
            target[y : y + h, x : x + w] = target_patch[:h, :w]
    done.touch()
    return path


def validate_one(args: argparse.Namespace) -> None:
    """Child mode: validate one store as training does; figures as JSON on stdout."""
    # Imported here: the parent only builds stores and needs no torch or Lightning.
    import pytorch_lightning as pl
    import torch

    from pipelines.training.data import Region, validation_loader
    from pipelines.training.module import VAL_METRICS, UNetModule
    from segcore.geometry import UNetGeometry
    from segcore.store import SlideStore

    store = Path(args.run_one)
    _, height, width = SlideStore.open(store).shape
    unet = {
        "in_channels": 3,
        "n_classes": N_CLASSES,
        "base_channels": args.base,
        "depth": args.depth,
        "dropout": 0.0,
    }
    geometry = UNetGeometry(depth=args.depth)
    torch.manual_seed(0)
    normalization = {"mean": [0.7] * 3, "std": [0.15] * 3}
    module = UNetModule(unet, normalization, tile_output=geometry.output_size(args.tile))
    loader = validation_loader(
        [Region(store, 0, 0, height, width)], 0, 1, geometry, args.tile, args.block_size
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    (logged,) = trainer.validate(module, dataloaders=loader, verbose=False)
    seconds = time.perf_counter() - start
    figures = {
        "peak_rss": peak_memory.peak_rss(),
        "seconds": seconds,
        "blocks": len(loader.dataset),
        "scores": {name: logged[f"val_{name}"] for name in VAL_METRICS},
    }
    print(json.dumps(figures))


def run_child(args: argparse.Namespace, store: Path) -> dict:
    arguments = ["--run-one", str(store), "--base", str(args.base), "--depth", str(args.depth)]
    arguments += ["--tile", str(args.tile), "--block-size", str(args.block_size)]
    return peak_memory.run_child(__file__, arguments)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[4096, 16384])
    parser.add_argument("--workdir", default="/tmp/segflow-validation-memory")
    parser.add_argument("--base", type=int, default=4)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--tile", type=int, default=1020)
    parser.add_argument("--block-size", type=int, default=2048)
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        validate_one(args)
        return
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    peaks = []
    for size in args.sizes:
        start = time.perf_counter()
        store = held_out_store(workdir, size)
        built = time.perf_counter() - start
        figures = run_child(args, store)
        whole = size * size * (3 + 4 * N_CLASSES)
        peaks.append(figures["peak_rss"])
        scores = ", ".join(f"{k} {v:.3f}" for k, v in figures["scores"].items())
        print(
            f"validation {size}^2: peak RSS {figures['peak_rss'] / 2**20:7.0f} MiB, "
            f"{figures['blocks']} blocks in {figures['seconds']:.0f} s (store {built:.0f} s); "
            f"whole-slide image + logits would be {whole / 2**20:.0f} MiB; {scores}"
        )
    peak_memory.print_ratio(args.sizes, peaks)


if __name__ == "__main__":
    main()
