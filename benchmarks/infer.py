"""Inference bars (DEVELOPERS.md, issue 5), measured in one run on synthetic all-tissue slides.

1. End-to-end throughput of `infer_slide` (default cluster, its start included) vs the model's
   forward passes alone over the same tiles of the same slide, batched alike, with the same
   threads and channels_last: target ratio >= 0.85.
2. Peak resident memory of the whole process tree (driver + Dask workers) for a small and a
   large slide, each run in a fresh process: target difference < 25%.
3. glibc's allocator: end to end in fresh processes with its defaults and with the settings
   the `segflow` command applies to itself (flows.allocator); the speed-up is printed.
4. The same image through MONAI's sliding_window_inference (roi 512, overlap 0.25, Gaussian
   blending, same-padded U-Net of equal depth and widths, same batch and threads): segflow's
   time must be lower.

Usage: python benchmarks/infer.py [--size 8192] [--memory-sizes 4096 16384] [--gpu]
       [--skip-throughput] [--skip-allocator] [--skip-monai] [--skip-memory]
`--gpu`: the paper-size U-Net (base 64, depth 5) in bf16 with 2236 px tiles, Mpx/s end-to-end
vs model alone (needs a CUDA device).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

from flows.allocator import SWITCH, TUNED_ENVIRONMENT
from pipelines.infer import InferConfig, infer_slide
from pipelines.ingest import IngestConfig, ingest_slide
from pipelines.sources import SlideSource
from segcore.checkpoint import save_unet
from segcore.model import UNet
from segcore.store import SlideStore
from segcore.synthetic import write_synthetic_slide
from segcore.tiling import TilePlan, default_tile_size, mirror_pad, plan_tiles


def synthetic_store(workdir: Path, size: int) -> Path:
    """An ingested size x size synthetic slide (cached in `workdir` between runs)."""
    store = workdir / "stores" / f"synthetic-{size}.zarr"
    if store.exists():
        return store
    image = workdir / f"synthetic-{size}.tif"
    write_synthetic_slide(image, workdir / f"synthetic-{size}-labels.tif", size, size, seed=size)
    ingest_slide(SlideSource(image=image, labels=None), workdir / "stores", IngestConfig())
    image.unlink()
    (workdir / f"synthetic-{size}-labels.tif").unlink()
    return store


def bench_config(args: argparse.Namespace, output_dir: Path) -> InferConfig:
    # All tissue: every block runs the model, as in the bar's definition.
    return InferConfig(
        tile_size=args.tile,
        batch_size=args.batch,
        skip_background=False,
        output_dir=output_dir,
        overwrite=True,
        progress=False,
        precision="bfloat16" if args.gpu else "float32",
    )


def timed(fn) -> tuple[float, float]:
    """Wall seconds and CPU seconds (this process, all threads) of fn()."""
    me = psutil.Process()
    cpu0, start = sum(me.cpu_times()[:2]), time.perf_counter()
    fn()
    return time.perf_counter() - start, sum(me.cpu_times()[:2]) - cpu0


def slide_batches(store: Path, plan: TilePlan, batch: int, device: str) -> list[torch.Tensor]:
    """The plan's tiles of the slide itself, stacked into float32 batches on `device`."""
    padded = mirror_pad(torch.from_numpy(SlideStore.open(store).image(0)[...]), plan)
    (th, tw), origins = plan.tile_size, plan.origins
    return [
        torch.stack([padded[:, y : y + th, x : x + tw] for y, x in origins[i : i + batch]])
        .to(device, torch.float32)
        .contiguous()
        for i in range(0, len(origins), batch)
    ]


def forward_only(
    model: UNet, batches: list[torch.Tensor], device: str, bf16: bool
) -> tuple[float, float]:
    """Wall and CPU seconds of the model's forward passes alone over ready-made batches."""
    model = model.to(device, memory_format=torch.channels_last).eval()

    def run() -> None:
        for x in batches:
            model(x)
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode(), torch.autocast(device, torch.bfloat16, enabled=bf16):
        model(batches[0])  # warm-up: allocator and oneDNN/cuDNN primitive caches
        return timed(run)


def monai_seconds(model_same: UNet, store: Path, batch: int) -> float:
    """MONAI sliding window (roi 512, overlap 0.25, Gaussian) over the slide's level 0."""
    # MONAI is the optional "bench" extra: imported only when the comparison runs.
    from monai.inferers import sliding_window_inference

    image = torch.from_numpy(SlideStore.open(store).image(0)[...]).float()[None]
    model_same = model_same.to(memory_format=torch.channels_last).eval()
    start = time.perf_counter()
    with torch.inference_mode():
        logits = sliding_window_inference(
            image,
            roi_size=(512, 512),
            sw_batch_size=batch,
            predictor=model_same,
            overlap=0.25,
            mode="gaussian",
        )
        logits.argmax(1).to(torch.uint8)
    return time.perf_counter() - start


def peak_rss_of_child(command: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    """Run `command`; peak summed RSS (GiB) of it and all its descendants, and its stdout."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    root = psutil.Process(proc.pid)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"child run failed: {' '.join(command)}")
    return peak / 2**30, out


def child_command(args: argparse.Namespace, store: Path, model_file: Path) -> list[str]:
    """This script in child mode: one end-to-end run of `store` in a fresh process."""
    command = [sys.executable, __file__, "--run-one", str(store), "--model", str(model_file)]
    command += ["--workdir", args.workdir, "--batch", str(args.batch), "--tile", str(args.tile)]
    return [*command, "--gpu"] if args.gpu else command


def allocator_ratio(args: argparse.Namespace, store: Path, model_file: Path, mpx: float) -> None:
    """End-to-end Mpx/s in fresh processes with glibc's defaults and with the settings the
    `segflow` command applies to itself (flows.allocator), interleaved, best of each."""
    plain = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    plain[SWITCH] = "0"
    tuned = {**plain, **TUNED_ENVIRONMENT}
    best = {"glibc defaults": float("inf"), "segflow's settings": float("inf")}
    for _ in range(args.repeats):
        for name, env in (("glibc defaults", plain), ("segflow's settings", tuned)):
            _, out = peak_rss_of_child(child_command(args, store, model_file), env)
            best[name] = min(best[name], json.loads(out.strip().splitlines()[-1])["wall"])
    for name, seconds in best.items():
        print(f"allocator, {name + ':':<19} {seconds:.1f} s = {mpx / seconds:.2f} Mpx/s")
    ratio = best["glibc defaults"] / best["segflow's settings"]
    print(f"allocator speed-up:         {ratio:.2f}x (what every segflow command now gets)")


def run_one(args: argparse.Namespace) -> None:
    """Child mode: one end-to-end run, its figures as JSON on stdout."""
    config = bench_config(args, Path(args.workdir) / "out")
    start = time.perf_counter()
    result = infer_slide(args.run_one, args.model, config)
    wall = time.perf_counter() - start
    print(json.dumps({"wall": wall, "slide_seconds": result.seconds, "blocks": result.blocks}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192, help="throughput/MONAI slide side")
    parser.add_argument("--memory-sizes", type=int, nargs=2, default=[4096, 16384])
    parser.add_argument("--base", type=int, default=16)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--tile", type=int, default=None, help="default: segcore's CPU default")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--gpu", action="store_true", help="paper U-Net, bf16, 2236 px tiles")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved; best is kept")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-monai", action="store_true")
    parser.add_argument("--skip-allocator", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--workdir", default="/tmp/segflow-bench-infer")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gpu:
        args.base, args.depth, args.tile = 64, 5, args.tile or 2236
    if args.run_one:
        run_one(args)
        return

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = UNet(3, 2, base_channels=args.base, depth=args.depth).eval()
    model_file = workdir / f"unet-{args.base}-{args.depth}.pt"
    save_unet(model, model_file)
    device = "cuda" if args.gpu else "cpu"
    args.tile = args.tile or default_tile_size(model, torch.device(device), args.batch)
    store = synthetic_store(workdir, args.size)

    plan = plan_tiles((args.size, args.size), model.geometry, args.tile)
    mpx = args.size**2 / 1e6
    print(
        f"slide {args.size}x{args.size}, U-Net base {args.base} depth {args.depth}, tile "
        f"{plan.tile_size[0]} -> {plan.output_size[0]}, {len(plan)} tiles, batch {args.batch}, "
        f"{torch.get_num_threads()} threads, device {device}"
    )
    if not args.skip_throughput:
        config = bench_config(args, workdir / "out")
        batches = slide_batches(store, plan, args.batch, device)
        # Interleaved repeats, best of each: the machine is shared and other jobs come and go. CPU
        # seconds of this process (the default cluster runs in it) are printed too: other people's
        # load inflates wall time but hardly the CPU time each side needs.
        alone, end_to_end, alone_cpu, e2e_cpu = (float("inf"),) * 4
        for _ in range(args.repeats):
            seconds, cpu = forward_only(model, batches, device, args.gpu)
            alone, alone_cpu = min(alone, seconds), min(alone_cpu, cpu)
            seconds, cpu = timed(lambda: infer_slide(store, model_file, config))
            end_to_end, e2e_cpu = min(end_to_end, seconds), min(e2e_cpu, cpu)
        print(
            f"model forward passes alone: {alone:.1f} s = {mpx / alone:.2f} Mpx/s "
            f"({alone_cpu:.0f} CPU s)"
        )
        print(
            f"segflow end to end:         {end_to_end:.1f} s = {mpx / end_to_end:.2f} Mpx/s "
            f"({e2e_cpu:.0f} CPU s; cluster start, blocks, instances, pyramids)"
        )
        print(f"throughput ratio:           {alone / end_to_end:.3f} (target >= 0.85)")
        print(f"CPU-time ratio:             {alone_cpu / e2e_cpu:.3f}")

        if not args.skip_monai and not args.gpu:
            same = UNet(3, 2, base_channels=args.base, depth=args.depth, padding="same").eval()
            monai_s = monai_seconds(same, store, args.batch)
            print(f"MONAI sliding window:       {monai_s:.1f} s = {mpx / monai_s:.2f} Mpx/s")
            print(f"segflow / MONAI time:       {end_to_end / monai_s:.3f} (target < 1)")

    if not args.skip_allocator and not args.gpu:
        allocator_ratio(args, store, model_file, mpx)

    if not args.skip_memory:
        peaks = {}
        for size in args.memory_sizes:
            slide = synthetic_store(workdir, size)
            peak, out = peak_rss_of_child(child_command(args, slide, model_file))
            peaks[size] = peak
            figures = json.loads(out.strip().splitlines()[-1])
            print(
                f"peak RSS {size}x{size}: {peak:.2f} GiB "
                f"({size**2 / 1e6 / figures['wall']:.2f} Mpx/s end to end)"
            )
        small, large = (peaks[s] for s in args.memory_sizes)
        print(f"peak RSS difference:        {abs(large - small) / small:.1%} (target < 25%)")


if __name__ == "__main__":
    main()
