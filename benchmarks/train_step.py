"""Training-step throughput of the U-Net alone: the input Mpx/s a device consumes, which is
what the Zarr tile loader (benchmarks/loader.py) must deliver to keep it busy (issue 14).

One step = forward, weighted cross entropy, backward and an SGD update on a batch of random
tiles of the paper's geometry (572 px in, 388 px out), as pipelines.train runs it on a GPU:
bf16 autocast (Lightning's "bf16-mixed"), optionally channels_last and torch.compile. Each
variant warms up, then the median of `--repeats` timed runs of `--steps` steps is kept.

Usage: python benchmarks/train_step.py [--device cuda] [--base 64] [--depth 5] [--batch 4]
       [--steps 10] [--repeats 3] [--compile] [--json]
Example line: `cuda bf16 channels_last: 0.071 s/step, 18.4 input Mpx/s`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from segcore.losses import weighted_cross_entropy
from segcore.model import UNet

#: The paper's training tile: 388 px of output from 572 px of input.
OUTPUT_SIZE = 388


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_function(
    model: torch.nn.Module, device: torch.device, bf16: bool
) -> Callable[[tuple[torch.Tensor, ...]], None]:
    """One optimiser step on (image, target, weight), in bf16 autocast when `bf16`."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.99)

    def step(batch: tuple[torch.Tensor, ...]) -> None:
        image, target, weight = batch
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(image)
        loss = weighted_cross_entropy(logits, target, weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def seconds_per_step(
    step: Callable, batch: tuple, device: torch.device, steps: int, repeats: int
) -> float:
    """Median over `repeats` runs of `steps` steps, after two warm-up steps."""
    for _ in range(2):
        step(batch)
    _synchronize(device)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step(batch)
        _synchronize(device)
        runs.append((time.perf_counter() - start) / steps)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--base", type=int, default=64)
    parser.add_argument("--depth", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = UNet(3, 2, base_channels=args.base, depth=args.depth).to(device)
    side = model.valid_input_size(OUTPUT_SIZE)
    batch = (
        torch.rand(args.batch, 3, side, side, device=device),
        torch.randint(0, 2, (args.batch, OUTPUT_SIZE, OUTPUT_SIZE), device=device),
        torch.rand(args.batch, OUTPUT_SIZE, OUTPUT_SIZE, device=device),
    )
    mpx = args.batch * side * side / 1e6
    variants = [("fp32", False, False, False)]
    if device.type == "cuda":
        variants += [("bf16", True, False, False), ("bf16 channels_last", True, True, False)]
        if args.compile:
            variants.append(("bf16 channels_last compiled", True, True, True))
    results = []
    for name, bf16, channels_last, compiled in variants:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        net = model.to(memory_format=fmt)
        net = torch.compile(net) if compiled else net
        inputs = (batch[0].contiguous(memory_format=fmt), *batch[1:])
        step = step_function(net, device, bf16)
        seconds = seconds_per_step(step, inputs, device, args.steps, args.repeats)
        results.append({"variant": name, "s_per_step": seconds, "input_mpx_s": mpx / seconds})
        if not args.json:
            print(f"{device.type} {name}: {seconds:.3f} s/step, {mpx / seconds:.1f} input Mpx/s")
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "unet": {"base": args.base, "depth": args.depth, "input": side, "output": OUTPUT_SIZE},
        "batch": args.batch,
        "variants": results,
    }
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
