"""What the `segflow` command costs over its stage's own work (issue 10's start-up bar).

`segflow infer` on one 512 x 512 slide, run as a user runs it, in a fresh process each time:
wall time minus the seconds the stage recorded for the slide (labels/segmentation's
`seconds`). Measured twice:
  1. with no PREFECT_API_URL: the command starts Prefect's temporary server on its workdir
     database (flows/prefect_server.py) and stops it at the end;
  2. against a running `prefect server` (PREFECT_API_URL set): target overhead <= 5 s.

Usage: python benchmarks/cli_overhead.py [--repeats 3] [--workdir /tmp/segflow-bench-cli]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch
import zarr

from pipelines.ingest import IngestConfig, ingest_slide
from pipelines.sources import SlideSource
from segcore.checkpoint import save_unet
from segcore.model import UNet
from segcore.synthetic import write_synthetic_slide

BIN = Path(sys.executable).parent
INFER = ["tile_size=124", "block_size=256", "overwrite=true"]


def prepare(workdir: Path) -> tuple[Path, Path]:
    """A 512 x 512 ingested slide and a small weights-only U-Net."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    write_synthetic_slide(workdir / "s.tif", workdir / "s_labels.tif", 512, 512, seed=1)
    config = IngestConfig(chunk_size=256, min_level_size=128)
    store = ingest_slide(SlideSource(image=workdir / "s.tif"), workdir / "stores", config).store
    torch.manual_seed(0)
    model = workdir / "unet.pt"
    save_unet(UNet(3, 2, base_channels=8, depth=3), model)
    return store, model


def timed_infer(
    store: Path, model: Path, workdir: Path, env: dict[str, str]
) -> tuple[float, float]:
    """(wall seconds of the command, seconds its stage recorded)."""
    command = [str(BIN / "segflow"), "infer", str(store), "--model", str(model), *INFER]
    command += ["--workdir", str(workdir)]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"segflow infer failed:\n{done.stderr[-2000:]}")
    attrs = zarr.open_group(store / "labels" / "segmentation", mode="r").attrs["segflow"]
    return wall, float(attrs["seconds"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_prefect_server(root: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server_env = env | {
        "PREFECT_HOME": str(root / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    argv = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    log = (root / "prefect.log").open("w")
    server = subprocess.Popen(argv, env=server_env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return server, url
        except OSError:
            time.sleep(0.5)
    server.terminate()
    raise SystemExit("prefect server did not start")


def measure(label: str, store: Path, model: Path, workdir: Path, env: dict, repeats: int):
    figures = [timed_infer(store, model, workdir, env) for _ in range(repeats)]
    overheads = sorted(wall - stage for wall, stage in figures)
    wall, stage = min(figures)
    print(
        f"{label:<34} wall {wall:5.1f} s, stage {stage:4.1f} s, overhead {overheads[0]:5.1f} s "
        f"(median {overheads[len(overheads) // 2]:.1f} s over {repeats})"
    )
    return overheads[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/segflow-bench-cli"))
    args = parser.parse_args()
    store, model = prepare(args.workdir)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    print(
        f"segflow infer, one 512x512 slide, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
    )
    temporary = measure(
        "temporary Prefect server:", store, model, args.workdir / "work-a", env, args.repeats
    )
    server, url = start_prefect_server(args.workdir, env)
    try:
        running = measure(
            "running Prefect server:",
            store,
            model,
            args.workdir / "work-b",
            env | {"PREFECT_API_URL": url},
            args.repeats,
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(json.dumps({"overhead_temporary_s": temporary, "overhead_running_s": running}))
    print(f"overhead with a running server: {running:.1f} s (target <= 5 s)")


if __name__ == "__main__":
    main()
