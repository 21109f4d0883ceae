"""The one typed training configuration: YAML file plus dotted overrides (pipelines.config).

Stores, validation stores and the workdir are local paths or object-storage URLs
(`pipelines.location.Location`); a URL read from text reaches storage with the client's
defaults until `with_storage` gives it the run's settings:

    config = TrainConfig(stores=["s3://lab/work/stores"], workdir="s3://lab/work",
                         tracking_uri="http://mlflow:5000")
    config = config.with_storage(ObjectStorageConfig(endpoint_url="http://127.0.0.1:9000"))
    config.checkpoint_root                   # ObjectUrl('s3://lab/work/checkpoints')
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipelines.location import Location, ObjectStorageConfig, ObjectUrl, Where
from pipelines.redaction import RedactedUri
from pipelines.runtime import DEFAULT_WORKDIR, artifact_root, default_tracking_uri
from segcore.augment import AugmentConfig
from segcore.geometry import Padding
from segcore.normalization import Normalization

LossName = Literal["weighted_ce", "ce", "weighted_ce+dice"]
#: The registered model every stage trains into and segments with unless told otherwise, so
#: `segflow demo`, `segflow train` and `segflow infer` meet at one `champion` alias.
DEFAULT_MODEL_NAME = "segflow-unet"


class ModelConfig(BaseModel):
    """U-Net hyper-parameters (segcore.model.UNet); in_channels None = taken from the stores."""

    model_config = ConfigDict(extra="forbid")

    #: Image channels; None = as many as the stores have.
    in_channels: int | None = Field(default=None, ge=1)
    n_classes: int = Field(default=2, ge=2)
    #: Channels of the first level (64 in the paper), doubling at each level below.
    base_channels: int = Field(default=64, ge=1)
    #: Resolution levels (5 in the paper: 4 poolings).
    depth: int = Field(default=5, ge=1)
    #: "valid" (unpadded, the paper's) or "same" convolutions.
    padding: Padding = "valid"
    batch_norm: bool = False
    #: Dropout at the end of the contracting path.
    dropout: float = Field(default=0.5, ge=0.0, lt=1.0)


class OptimizerConfig(BaseModel):
    """Paper default: SGD with momentum 0.99 at a constant rate."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["sgd", "adamw"] = "sgd"
    #: Learning rate (the peak rate under a schedule).
    lr: float = Field(default=0.01, gt=0)
    #: SGD momentum (AdamW ignores it).
    momentum: float = Field(default=0.99, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    #: Learning-rate schedule over `max_steps`.
    schedule: Literal["none", "cosine", "onecycle"] = "none"


class ValRegion(BaseModel):
    """A held-out region of a store (level-0 px); height/width None = to the slide's edge."""

    model_config = ConfigDict(extra="forbid")

    store: Location
    y: int = Field(default=0, ge=0)
    x: int = Field(default=0, ge=0)
    height: int | None = Field(default=None, ge=1)
    width: int | None = Field(default=None, ge=1)


class TrainConfig(BaseModel):
    """Everything one training run depends on; saved with the run as config.yaml and params."""

    model_config = ConfigDict(extra="forbid")

    #: Stores, or folders of stores, to train on; [] = <workdir>/stores. Of a folder, the stores
    #: with weight maps (`segflow weights`) that are not validation stores.
    stores: list[Location] = Field(default_factory=list)
    #: Whole stores held out to validate on and pick the champion by.
    val_stores: list[Location] = Field(default_factory=list)
    #: Held-out regions of stores, validated on like `val_stores`.
    val_regions: list[ValRegion] = Field(default_factory=list)
    #: Share of sampling weight that tissue-free areas keep (tissue counts 1 per pixel).
    background_weight: float = Field(default=0.05, ge=0)
    #: Fixed per-channel normalisation; None = estimated from training tiles.
    normalization: Normalization | None = None
    #: Standardise each slide's H, E and D stain moments to the training slides' mean
    #: (segcore.stain_standardization; RGB only). The reference travels with the model, and
    #: inference standardises every slide to it.
    stain_standardization: bool = False
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    augment_enabled: bool = True
    model: ModelConfig = Field(default_factory=ModelConfig)
    #: Input tile side, rounded down to a valid size; None = the smallest valid input whose
    #: output covers `output_size`.
    tile_size: int | None = Field(default=None, ge=1)
    #: Output tile side the input tile is chosen for, when `tile_size` is None.
    output_size: int = Field(default=388, ge=1)
    #: Input tile side for validating whole regions; None = the training input tile.
    val_tile_size: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=1, ge=1)
    #: Optimiser steps to train for.
    max_steps: int = Field(default=20000, ge=1)
    max_epochs: int | None = Field(default=None, ge=1)
    #: Optimiser steps per epoch (tiles are sampled, so an epoch is a count, not a pass).
    steps_per_epoch: int = Field(default=200, ge=1)
    #: Validate every this many epochs.
    val_every: int = Field(default=1, ge=1)
    #: Write a resumable checkpoint every this many steps.
    checkpoint_every: int = Field(default=200, ge=1)
    #: Log metrics to MLflow every this many steps.
    log_every: int = Field(default=1, ge=1)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    loss: LossName = "weighted_ce"
    #: Weight of the Dice term in "weighted_ce+dice".
    dice_weight: float = Field(default=1.0, ge=0)
    #: Lightning Trainer accelerator ("auto", "cpu", "gpu").
    accelerator: str = "auto"
    #: Lightning Trainer devices (a count, a list of ids, or "auto").
    devices: int | str | list[int] = "auto"
    #: Lightning Trainer strategy ("auto", "ddp").
    strategy: str = "auto"
    num_nodes: int = Field(default=1, ge=1)
    #: Lightning precision; "auto" = bf16-mixed on GPU, else 32-true.
    precision: str = "auto"
    #: DataLoader worker processes.
    num_workers: int = Field(default=2, ge=0)
    #: Decoded chunks each loader process keeps for the next tiles (MiB); 0 = none.
    loader_cache_mb: int = Field(default=512, ge=0)
    seed: int = 0
    #: Where checkpoints and the embedded MLflow store live: a local folder or an
    #: object-storage prefix (which has no embedded MLflow store: give `tracking_uri`).
    workdir: Location = DEFAULT_WORKDIR
    #: MLflow tracking URI; None = a local workdir's embedded store (pipelines.runtime), with
    #: artifacts in <workdir>/mlartifacts. No environment variable is read here: the entry
    #: point (Runtime.from_environment) passes MLFLOW_TRACKING_URI in.
    tracking_uri: RedactedUri = None
    experiment: str = DEFAULT_MODEL_NAME
    #: Registered model the trained version joins (and whose `champion` it may become).
    registered_model_name: str = DEFAULT_MODEL_NAME
    #: MLflow run name; None = `<registered_model_name>-<UTC time>-<random>`.
    run_name: str | None = None
    #: Continue the newest run under <workdir>/checkpoints from its last checkpoint.
    resume: bool = False

    @model_validator(mode="after")
    def _channels_match(self) -> TrainConfig:
        norm, channels = self.normalization, self.model.in_channels
        if norm is not None and channels is not None and len(norm.mean) != channels:
            raise ValueError("normalization needs one mean/std per input channel")
        return self

    @property
    def resolved_tracking_uri(self) -> str:
        """The store the run logs and registers to.

        Raises ValueError for a workdir on object storage without a tracking URI: the
        embedded store is a local SQLite file.
        """
        if self.tracking_uri:
            return self.tracking_uri
        if isinstance(self.workdir, ObjectUrl):
            raise ValueError(
                f"{self.workdir}: a workdir on object storage needs a tracking URI "
                "(tracking_uri, --tracking-uri or MLFLOW_TRACKING_URI); the embedded MLflow "
                "store is a local SQLite file"
            )
        return default_tracking_uri(self.workdir)

    @property
    def artifact_location(self) -> str | None:
        """Artifact root for a new experiment (pipelines.runtime.artifact_root)."""
        return artifact_root(self.resolved_tracking_uri)

    @property
    def checkpoint_root(self) -> Where:
        """Per-run checkpoint folders live in <workdir>/checkpoints/<run id>/."""
        return self.workdir / "checkpoints"

    @property
    def object_storage(self) -> ObjectStorageConfig | None:
        """How this run reaches object storage: the settings of its workdir URL, else of its
        first store URL; None when every location is local."""
        found = [self.workdir, *self.stores, *self.val_stores, *(r.store for r in self.val_regions)]
        urls = [where for where in found if isinstance(where, ObjectUrl)]
        return urls[0].storage if urls else None

    def with_storage(self, storage: ObjectStorageConfig) -> TrainConfig:
        """This configuration with every URL among its locations reaching object storage with
        `storage`, for the settings the URL does not have itself (`ObjectStorageConfig.merged`).

        Example: a config read from YAML names `s3://lab/work`; the entry point gives it the
        run's endpoint and credentials with `config.with_storage(runtime.object_storage)`.
        """

        def reached(where: Where) -> Where:
            if isinstance(where, ObjectUrl):
                return replace(where, storage=where.storage.merged(storage))
            return where

        return self.model_copy(
            update={
                "workdir": reached(self.workdir),
                "stores": [reached(p) for p in self.stores],
                "val_stores": [reached(p) for p in self.val_stores],
                "val_regions": [
                    r.model_copy(update={"store": reached(r.store)}) for r in self.val_regions
                ],
            }
        )
