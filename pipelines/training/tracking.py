"""MLflow bookkeeping of a training run: params, dataset, system info, images, resume record.

Only global rank 0 talks to MLflow (Lightning's MLFlowLogger creates the run lazily on rank 0
and hands the others a dummy); `RunTracker.setup` broadcasts the run id so that every rank
writes checkpoints into the same `<workdir>/checkpoints/<run id>/` folder (a prefix when the
workdir is on object storage), where `run.json` records the run for `resume=True`.
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import mlflow
import numpy as np
import pytorch_lightning as pl
import torch
from matplotlib.figure import Figure
from mlflow.entities import Dataset as DatasetEntity
from mlflow.entities import DatasetInput, InputTag, Param
from mlflow.tracking import MlflowClient
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from pipelines.config import dump_config
from pipelines.location import Where
from pipelines.redaction import redact_tree
from pipelines.storage import exists, files_by_age, read_text, writable_folder, write_file
from pipelines.training.config import TrainConfig
from pipelines.training.module import OVERLAY_SIDE, OverlaySample, UNetModule
from pipelines.training.stores import same_place
from segcore.store import SlideStore

RUN_RECORD = "run.json"
LAST_CHECKPOINT = "last.ckpt"
#: MLflow accepts up to 6000 characters per param value.
PARAM_VALUE_LIMIT = 6000


def unique_run_name(registered_name: str, now: datetime | None = None) -> str:
    """`<registered name>-<UTC time>-<4 hex digits>`, e.g. `segflow-unet-20250301-141502-9f3a`.

    MLflow's generated names come from `random`, which the training seed fixes, so every run
    had the same one; the suffix comes from `secrets`, which no seed touches, so two runs
    started in the same second still differ."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")
    return f"{registered_name}-{stamp}-{secrets.token_hex(2)}"


def flatten_params(tree: dict, prefix: str = "") -> dict[str, str]:
    """Nested config dict -> {"optimizer.lr": "0.01", ...} (lists as JSON)."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_params(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, list) else str(value)
            flat[name] = text[:PARAM_VALUE_LIMIT]
    return flat


def system_info() -> dict[str, str]:
    """Versions and hardware the run used, logged as `sys.*` tags and system.json."""
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": platform.node(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "lightning": pl.__version__,
        "mlflow": mlflow.__version__,
        "cpu_count": str(os.cpu_count()),
        "gpu_count": str(torch.cuda.device_count()),
    }
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["gpu_names"] = ", ".join(names)
    return info


def store_record(path: Where, context: str) -> dict:
    """Path (or URL), shape and checksum (from the store's ingest metadata) of one store."""
    store = SlideStore.open(path)
    metadata = store.metadata
    return {
        "context": context,
        "name": store.name,
        "path": str(same_place(path)),
        "shape": list(store.shape),
        "checksum": str(metadata.get("checksum", "")),
        "source": str(metadata.get("source", "")),
    }


def dataset_records(config: TrainConfig) -> list[dict]:
    records = [store_record(p, "training") for p in config.stores]
    held_out = list(dict.fromkeys([*config.val_stores, *(r.store for r in config.val_regions)]))
    return records + [store_record(p, "validation") for p in held_out]


def _dataset_input(record: dict) -> DatasetInput:
    digest = (record["checksum"] or record["path"])[-36:]
    entity = DatasetEntity(
        name=record["name"],
        digest=digest,
        source_type=urlsplit(record["path"]).scheme or "local",
        source=json.dumps({"uri": record["path"]}),
    )
    return DatasetInput(entity, tags=[InputTag("mlflow.data.context", record["context"])])


def loggable_config(config: TrainConfig) -> TrainConfig:
    """`config` as MLflow records it (params and config.yaml): credentials in URIs masked."""
    return config.model_validate(redact_tree(config.model_dump(mode="json")))


def log_run_start(
    client: MlflowClient, run_id: str, config: TrainConfig, extra_params: dict, resumed: bool
) -> None:
    """Config (params + config.yaml), dataset and system info; params only on a fresh run
    (MLflow refuses to change a param, and a resumed run keeps the ones it started with)."""
    logged = loggable_config(config)
    with tempfile.TemporaryDirectory() as tmp:
        name = "config-resume.yaml" if resumed else "config.yaml"
        dump_config(logged, Path(tmp) / name)
        records = redact_tree(dataset_records(config))  # a source may be a signed URL
        (Path(tmp) / "dataset.json").write_text(json.dumps(records, indent=2))
        info = system_info()
        (Path(tmp) / "system.json").write_text(json.dumps(info, indent=2))
        client.log_artifacts(run_id, tmp)
    if not resumed:
        params = {**flatten_params(logged.model_dump(mode="json")), **flatten_params(extra_params)}
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(run_id, params=items[i : i + 100])
        client.log_inputs(run_id, datasets=[_dataset_input(r) for r in records])
    for key, value in info.items():
        client.set_tag(run_id, f"sys.{key}", value)


def overlay_image(sample: OverlaySample) -> np.ndarray:
    """RGB PNG data: the image in gray, correct cells green, false cells red, missed blue."""
    image = sample.image.astype(np.float32)
    gray = image.mean(0) if image.shape[0] != 3 else image.transpose(1, 2, 0).mean(-1)
    base = np.repeat(gray[..., None], 3, axis=-1) / 255.0
    target, pred = sample.target == 1, sample.prediction == 1
    colour = np.zeros_like(base)
    colour[target & pred] = (0.0, 1.0, 0.0)
    colour[~target & pred] = (1.0, 0.0, 0.0)
    colour[target & ~pred] = (0.0, 0.3, 1.0)
    marked = (target | pred)[..., None]
    out = np.where(marked, 0.6 * base + 0.4 * colour, base)
    step = max(1, -(-max(out.shape[:2]) // OVERLAY_SIDE))
    return (out[::step, ::step] * 255).round().astype(np.uint8)


def learning_curve(client: MlflowClient, run_id: str) -> Figure:
    """Training loss (and its running mean) and validation scores against the global step.

    A bare `Figure` (saved through its own Agg canvas), not pyplot: no process-wide backend
    is chosen and no figure is left open in pyplot's registry.
    """
    fig = Figure(figsize=(11, 4))
    ax_loss, ax_val = fig.subplots(1, 2)
    loss = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train_loss"))
    if loss:
        steps, values = np.array(loss).T
        ax_loss.plot(steps, values, lw=0.5, alpha=0.4, label="train_loss")
        window = max(1, len(values) // 50)
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        ax_loss.plot(steps[window - 1 :], smooth, lw=1.5, label=f"mean of {window}")
        ax_loss.set_yscale("log")
        ax_loss.legend()
    ax_loss.set(xlabel="step", title="training loss")
    for name in ("val_iou", "val_dice", "val_pixel_error", "val_rand_error"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))
        if history:
            ax_val.plot(*np.array(history).T, marker="o", label=name)
    ax_val.set(xlabel="step", title="validation", ylim=(0, 1))
    if ax_val.lines:
        ax_val.legend()
    fig.tight_layout()
    return fig


@dataclass(frozen=True)
class ResumePoint:
    checkpoint: Where
    run_id: str


def find_resume_point(checkpoint_root: Where) -> ResumePoint | None:
    """The newest `last.ckpt` under <workdir>/checkpoints/*/ with its run record."""
    for checkpoint in reversed(files_by_age(checkpoint_root, f"*/{LAST_CHECKPOINT}")):
        record = checkpoint.parent / RUN_RECORD
        if exists(record):
            return ResumePoint(checkpoint, json.loads(read_text(record))["run_id"])
    return None


class RunTracker(Callback):
    """Shares the MLflow run across ranks, points checkpoints at its folder, logs images."""

    def __init__(
        self, config: TrainConfig, extra_params: dict, resumed: bool, checkpoints: list
    ) -> None:
        self.config = config
        self.extra_params = extra_params
        self.resumed = resumed
        self.checkpoints: list[ModelCheckpoint] = checkpoints
        self.run_id: str | None = None
        self.run_dir: Where | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        logger = trainer.logger
        run_id = logger.run_id if trainer.is_global_zero else None
        self.run_id = trainer.strategy.broadcast(run_id, src=0)
        self.run_dir = self.config.checkpoint_root / self.run_id
        # Lightning runs checkpoint callbacks' setup after this one, and they keep a dirpath
        # that is already set.
        for callback in self.checkpoints:
            callback.dirpath = str(self.run_dir)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        logger = trainer.logger
        writable_folder(self.run_dir)
        record = {"run_id": self.run_id, "experiment_id": logger.experiment_id}
        write_file(self.run_dir / RUN_RECORD, json.dumps(record))
        log_run_start(logger.experiment, self.run_id, self.config, self.extra_params, self.resumed)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: UNetModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or pl_module.overlay is None:
            return
        trainer.logger.experiment.log_image(
            self.run_id,
            overlay_image(pl_module.overlay),
            artifact_file=f"val_overlay/epoch_{trainer.current_epoch:04d}.png",
        )
