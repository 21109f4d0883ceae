"""Stage 3: train a U-Net on slide stores with Lightning, tracked and registered in MLflow.

`train(config)` is the library call (flows and `segflow train` use it); `python -m
pipelines.train --config train.yaml key=value ...` runs it from a shell and is also what
Lightning's "ddp" strategy re-executes once per extra device. The pieces live in
`pipelines.training`: config, data, normalization, module, tracking, registry.

Stores and the workdir may be on object storage (`s3://...`): stores are read through
`segcore.store.open_group`, checkpoints go to `<workdir>/checkpoints/<run id>/` there
(training.process_state says how Lightning reaches them), and the run is tracked in the
MLflow store `tracking_uri` names (a workdir URL has no embedded one).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path, PurePosixPath

import numpy as np
import pytorch_lightning as pl
import torch
import yaml
from mlflow.tracking import MlflowClient
from pydantic import ValidationError
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import MLFlowLogger

from pipelines.config import ConfigError, load_config
from pipelines.location import ObjectStorageConfig, ObjectUrl, Where, open_binary
from pipelines.redaction import redact_text
from pipelines.runtime import Runtime, RuntimeEnvironment
from pipelines.services import require_mlflow
from pipelines.storage import put_file, writable_folder
from pipelines.training.config import TrainConfig
from pipelines.training.data import SlideTileDataModule, TileShape, tile_shape
from pipelines.training.launch import ranks
from pipelines.training.module import UNetModule, ValidateAtEnd
from pipelines.training.normalization import estimate_normalization
from pipelines.training.process_runs import PROCESS_TAG, end_process_runs, process_identity
from pipelines.training.process_state import checkpoints_reach, process_state_kept
from pipelines.training.progress import ProgressLog
from pipelines.training.registry import log_and_register, model_metadata
from pipelines.training.result import TrainResult
from pipelines.training.stores import training_stores
from pipelines.training.tracking import (
    LAST_CHECKPOINT,
    ResumePoint,
    RunTracker,
    find_resume_point,
    learning_curve,
    unique_run_name,
)
from pipelines.weightmaps import recorded_classes
from segcore.checkpoint import save_unet, unet_state_dict
from segcore.geometry import UNetGeometry
from segcore.normalization import Normalization
from segcore.stain import stain_statistics
from segcore.stain_standardization import StainMoments

__all__ = ["TrainConfig", "TrainError", "TrainResult", "end_process_runs", "main", "train"]

#: Training tiles the normalisation statistics are estimated from.
NORMALIZATION_TILES = 16
WEIGHTS_FILE = "model.pt"


class TrainError(ValueError):
    """Training cannot start (e.g. nothing to resume, channels that do not match)."""


def _precision(config: TrainConfig) -> str:
    """bf16 mixed precision on GPUs, full fp32 elsewhere, unless configured."""
    if config.precision != "auto":
        return config.precision
    on_gpu = config.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if on_gpu else "32-true"


def _checkpoint_payload(path: Where) -> dict:
    with open_binary(path) as fh:
        return torch.load(fh, map_location="cpu", weights_only=True)


def _normalization(
    config: TrainConfig, datamodule: SlideTileDataModule, resume_payload: dict | None
) -> Normalization:
    """Configured, else the resumed run's, else estimated from seeded training tiles."""
    if config.normalization is not None:
        return config.normalization
    if resume_payload is not None:
        return Normalization(**resume_payload["hyper_parameters"]["normalization"])
    rng = np.random.default_rng([config.seed, 0x6E6F726D])  # a stream of its own ("norm")
    positions = datamodule.sampler(rank=0).positions(rng, NORMALIZATION_TILES)
    return estimate_normalization(datamodule.dataset(), positions)


def _stain_statistics(config: TrainConfig, datamodule: SlideTileDataModule) -> dict | None:
    """H, E and D concentration statistics of seeded training tiles (segcore.stain), kept with
    the model so a user can tell how far a new slide's staining is from what it learned;
    None for images that are not RGB."""
    if datamodule.channels != 3:
        return None
    rng = np.random.default_rng([config.seed, 0x7374616E])  # a stream of its own ("stan")
    positions = datamodule.sampler(rank=0).positions(rng, NORMALIZATION_TILES)
    dataset = datamodule.dataset()
    tiles = (dataset[p]["image"].numpy().astype(np.uint8) for p in positions)
    return stain_statistics(tiles)


def _target_classes(config: TrainConfig) -> tuple[str, ...]:
    """The class names of the training and validation stores' targets, as the weights stage
    recorded them; every store must have the same."""
    paths = [*config.stores, *config.val_stores, *(r.store for r in config.val_regions)]
    found: dict[tuple[str, ...], Where] = {}
    for path in paths:
        found.setdefault(recorded_classes(path), path)
    if len(found) > 1:
        seen = "; ".join(f"{list(classes)} in {path}" for classes, path in found.items())
        raise TrainError(
            f"stores disagree on the target's classes ({seen}); compute their weight maps "
            "with the same target"
        )
    return next(iter(found))


def _unet_config(
    config: TrainConfig,
    channels: int,
    classes: tuple[str, ...],
    stain_reference: StainMoments | None,
) -> dict:
    model = config.model.model_dump()
    model["stain_reference"] = stain_reference.to_dict() if stain_reference else None
    if model["in_channels"] is None:
        model["in_channels"] = channels
    elif model["in_channels"] != channels:
        raise TrainError(
            f"model.in_channels is {model['in_channels']} but the stores have {channels} channels"
        )
    # The output follows the target; a configured count must agree with it.
    if "n_classes" in config.model.model_fields_set and model["n_classes"] != len(classes):
        raise TrainError(
            f"model.n_classes is {model['n_classes']} but the stores' target has "
            f"{len(classes)} classes {list(classes)}; leave n_classes unset"
        )
    model["n_classes"] = len(classes)
    return model


def _build_module(
    config: TrainConfig,
    tile: TileShape,
    channels: int,
    normalization: Normalization,
    classes: tuple[str, ...],
    stain_reference: StainMoments | None,
) -> UNetModule:
    return UNetModule(
        unet_config=_unet_config(config, channels, classes, stain_reference),
        normalization=normalization.model_dump(),
        tile_output=tile.output,
        loss=config.loss,
        dice_weight=config.dice_weight,
        optimizer=config.optimizer.model_dump(),
        augment=asdict(config.augment) if config.augment_enabled else None,
        seed=config.seed,
    )


def _load_best_weights(module: UNetModule, checkpoint: Where) -> None:
    module.model.load_state_dict(unet_state_dict(_checkpoint_payload(checkpoint)["state_dict"]))


def _finish_run(
    config: TrainConfig,
    module: UNetModule,
    tile: TileShape,
    tracker: RunTracker,
    best: ModelCheckpoint | None,
    last_path: Where,
    classes: tuple[str, ...],
) -> dict:
    """Rank 0 after fit: export the best model, log and register it, draw the curves."""
    if best is not None and best.best_model_path:
        # Lightning names it as text (a URL on object storage); it is in the run's folder.
        name = PurePosixPath(best.best_model_path).name
        checkpoint, val_iou = tracker.run_dir / name, float(best.best_model_score)
    else:
        checkpoint, val_iou = last_path, float("nan")
    _load_best_weights(module, checkpoint)
    exported = module.exported_unet()
    metadata = model_metadata(
        exported, module.normalization, tile, classes, tracker.extra_params["stain"]
    )
    weights = tracker.run_dir / WEIGHTS_FILE
    with tempfile.TemporaryDirectory(prefix="segflow-weights-") as scratch:
        # MLflow logs a local file; the run's folder gets the same file, wherever it is.
        local = Path(scratch) / WEIGHTS_FILE
        save_unet(exported, local, extra={"metadata": metadata})
        registration = log_and_register(
            config.resolved_tracking_uri,
            tracker.run_id,
            exported,
            metadata,
            config.registered_model_name,
            val_iou,
            local,
        )
        put_file(local, weights)
    client = MlflowClient(config.resolved_tracking_uri)
    client.log_figure(tracker.run_id, learning_curve(client, tracker.run_id), "learning_curve.png")
    run = client.get_run(tracker.run_id)
    metrics = dict(run.data.metrics)
    if math.isfinite(val_iou):
        metrics["best_val_iou"] = val_iou
    return {
        "run_id": tracker.run_id,
        "experiment_id": run.info.experiment_id,
        "model_uri": registration.model_uri,
        "registered_name": config.registered_model_name,
        "version": registration.version,
        "became_champion": registration.became_champion,
        "aliases": list(registration.aliases),
        "metrics": metrics,
        "checkpoint": _without_credentials(checkpoint),
        "weights": _without_credentials(weights),
    }


def _without_credentials(where: Where) -> Where:
    """`where` as a result may keep it: a URL without the key and secret (Prefect pickles
    results into its storage)."""
    return where.without_credentials() if isinstance(where, ObjectUrl) else where


def train(config: TrainConfig, runtime: Runtime | None = None) -> TrainResult:
    """Train, checkpoint, track and register one U-Net as `config` says (in `runtime`'s
    workdir and MLflow store when given); the process's MLflow setting and environment are as
    they were when it returns (training.process_state)."""
    if runtime is not None:
        config = runtime.configure(config)
    with process_state_kept(), checkpoints_reach(config.workdir):
        return _train(config)


def _train(config: TrainConfig) -> TrainResult:
    require_mlflow(config.resolved_tracking_uri)  # before any work: a dead server fails now
    # Every rank expands the same folders alike (DDP re-runs this with the same config).
    config = config.model_copy(update={"stores": training_stores(config)})
    pl.seed_everything(config.seed, workers=True, verbose=False)
    writable_folder(config.workdir)
    resume: ResumePoint | None = None
    resume_payload = None
    if config.resume:
        resume = find_resume_point(config.checkpoint_root)
        if resume is None:
            raise TrainError(f"{config.checkpoint_root}: nothing to resume (no {LAST_CHECKPOINT})")
        resume_payload = _checkpoint_payload(resume.checkpoint)

    geometry = UNetGeometry(depth=config.model.depth, padding=config.model.padding)
    tile = tile_shape(geometry, config.tile_size, config.output_size)
    datamodule = SlideTileDataModule(config, geometry, tile)
    if config.augment_enabled:
        config.augment.check_channels(datamodule.channels)  # before any work, in one line
    normalization = _normalization(config, datamodule, resume_payload)
    classes = _target_classes(config)
    module = _build_module(
        config, tile, datamodule.channels, normalization, classes, datamodule.stain_reference
    )

    last = ModelCheckpoint(
        filename="step{step:07d}",
        every_n_train_steps=config.checkpoint_every,
        save_top_k=0,
        save_last=True,
    )
    best = None
    if datamodule.regions:
        best = ModelCheckpoint(
            filename="best-{step:07d}", monitor="val_iou", mode="max", save_top_k=1
        )
    checkpoints = [c for c in (last, best) if c is not None]
    tracker = RunTracker(
        config,
        extra_params={
            "tile": asdict(tile),
            "normalization": normalization.model_dump(),
            "stain": _stain_statistics(config, datamodule),
            "classes": list(classes),
        },
        resumed=resume is not None,
        checkpoints=checkpoints,
    )
    logger = MLFlowLogger(
        experiment_name=config.experiment,
        run_name=config.run_name or unique_run_name(config.registered_model_name),
        tracking_uri=config.resolved_tracking_uri,
        artifact_location=config.artifact_location,
        run_id=resume.run_id if resume else None,
    )
    # Every time, not only at creation: a resumed run was started by another process.
    logger.experiment.set_tag(logger.run_id, PROCESS_TAG, process_identity())
    # Lightning's live bar on a terminal; plain progress lines in a log or a pipe.
    live_bar = sys.stderr.isatty()
    trainer = pl.Trainer(
        accelerator=config.accelerator,
        devices=config.devices,
        strategy=config.strategy,
        num_nodes=config.num_nodes,
        precision=_precision(config),
        max_steps=config.max_steps,
        max_epochs=config.max_epochs,
        check_val_every_n_epoch=config.val_every,
        limit_val_batches=1.0 if datamodule.regions else 0,
        num_sanity_val_steps=0,
        log_every_n_steps=config.log_every,
        logger=logger,
        callbacks=[
            tracker,
            ValidateAtEnd(),
            LearningRateMonitor(logging_interval="step"),
            *checkpoints,
            *([] if live_bar else [ProgressLog(sys.stderr)]),
        ],
        default_root_dir=str(config.workdir),
        # TileSampler shards by rank itself; Lightning must not wrap it.
        use_distributed_sampler=False,
        enable_progress_bar=live_bar,
        enable_model_summary=False,
    )
    trainer.fit(
        module,
        datamodule=datamodule,
        ckpt_path=str(resume.checkpoint) if resume else None,
        weights_only=True,
    )
    last_path = tracker.run_dir / LAST_CHECKPOINT
    # The periodic checkpoint may lag the final step; every rank takes part in saving.
    trainer.save_checkpoint(str(last_path), weights_only=False)

    result = {
        "rank": trainer.global_rank,
        "global_step": trainer.global_step,
        "resumed_from_step": resume_payload["global_step"] if resume_payload else None,
    }
    if trainer.is_global_zero:
        result |= _finish_run(config, module, tile, tracker, best, last_path, classes)
    return TrainResult(**result)


def _one_line(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())


def _storage_variables(storage: ObjectStorageConfig | None) -> dict[str, str]:
    """The environment variables a child's entry point reads `storage` back from
    (`RuntimeEnvironment`): AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ..."""
    if storage is None:
        return {}
    values = {
        "aws_endpoint_url": storage.endpoint_url,
        "aws_access_key_id": storage.key,
        "aws_secret_access_key": storage.secret,
        "aws_default_region": storage.region,
    }
    fields = RuntimeEnvironment.model_fields
    return {fields[name].validation_alias: value for name, value in values.items() if value}


def run_training(config: TrainConfig) -> TrainResult:
    """`train(config)`, in this process when it is the only rank and the workdir is local,
    else in a child `python -m pipelines.train`: Lightning may re-run it once per rank
    (launch.py says why), and a workdir on object storage needs a process-wide fsspec setting
    (training.process_state) that no other work should share.

    The child reads the configuration from a file in a private folder (under a local workdir,
    else in the system's temporary folder) and the tracking URI and object-storage settings
    from its own environment (a written file never holds credentials); its progress and
    errors go to this process's stderr, its result comes back on stdout.
    """
    local = isinstance(config.workdir, Path)
    if ranks(config) == 1 and local:
        return train(config)
    writable_folder(config.workdir)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env |= _storage_variables(config.object_storage)
    if config.tracking_uri:
        env["MLFLOW_TRACKING_URI"] = config.tracking_uri
    private = config.workdir if local else None
    with tempfile.TemporaryDirectory(dir=private, prefix=".train-") as folder:
        path = Path(folder) / "train.yaml"
        # Without tracking_uri: the child's entry point (main) takes it from MLFLOW_TRACKING_URI.
        settings = config.model_dump(mode="json", exclude={"tracking_uri"})
        if "n_classes" not in config.model.model_fields_set:
            del settings["model"]["n_classes"]  # the child takes it from the stores, as here
        path.write_text(yaml.safe_dump(settings, sort_keys=False))
        command = [sys.executable, "-m", "pipelines.train", "--config", str(path)]
        done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise TrainError(
            f"training in {ranks(config)} process(es) failed (exit {done.returncode}; "
            "its error is printed above)"
        )
    return TrainResult.model_validate_json(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.train --config train.yaml key=value ...`; prints the result JSON."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.train", description=__doc__)
    parser.add_argument("--config", type=Path, help="YAML file with TrainConfig fields")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optimizer.lr=0.001")
    args = parser.parse_args(argv)
    try:
        config = load_config(TrainConfig, args.config, args.overrides)
        # An entry point: the environment's tracking URI and object-storage settings
        # (pipelines.runtime) unless the configuration has its own.
        environment = RuntimeEnvironment()
        tracking_uri = config.tracking_uri or environment.tracking_uri
        config = config.model_copy(update={"tracking_uri": tracking_uri})
        config = config.with_storage(environment.object_storage())
    except ValidationError as exc:
        print(f"train: invalid configuration {args.config}: {_one_line(exc)}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 2
    try:
        result = train(config)
    except ValueError as exc:  # StoreError, TrainingDataError, TrainError, CheckpointError
        print(f"train: {redact_text(str(exc))}", file=sys.stderr)
        return 1
    if result.rank == 0:
        print(result.model_dump_json())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
