"""How many processes Lightning starts for a training configuration.

Lightning's "ddp" strategy (also what "auto" becomes with more than one device) starts the
ranks after the first by re-running the command line of the process that called `fit`. That
is only safe for a command that does nothing but train: re-running `segflow run` would run
the whole pipeline again in every rank, and re-running a Prefect worker's flow-run process
would re-enter the flow run. `pipelines.train.run_training` therefore trains such
configurations in a child `python -m pipelines.train` whose command line is exactly that.

    ranks(TrainConfig(devices=2, strategy="ddp", accelerator="cpu", ...))    # 2
    ranks(TrainConfig(devices="auto", accelerator="cpu", ...))               # 1
    ranks(TrainConfig(devices=2, strategy="ddp_spawn", ...))                 # 1 (spawns itself)
"""

from __future__ import annotations

import torch

from pipelines.training.config import TrainConfig

#: Strategies whose extra ranks are started another way than re-running the command line.
SELF_STARTING = ("ddp_spawn", "ddp_fork", "ddp_notebook", "fsdp_spawn")


def _devices(config: TrainConfig) -> int:
    devices = config.devices
    if isinstance(devices, list):
        return len(devices)
    if isinstance(devices, int):
        return devices if devices >= 0 else torch.cuda.device_count()
    text = str(devices).strip()
    if text.lstrip("-").isdigit():
        count = int(text)
        return count if count >= 0 else torch.cuda.device_count()
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    # "auto": every GPU when the accelerator may be one, else a single CPU process.
    gpu = config.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return max(1, torch.cuda.device_count()) if gpu else 1


def ranks(config: TrainConfig) -> int:
    """Processes Lightning runs this configuration in by re-running the command line (1 when
    it runs in the calling process alone)."""
    if config.strategy.startswith(SELF_STARTING):
        return 1
    return _devices(config) * config.num_nodes
