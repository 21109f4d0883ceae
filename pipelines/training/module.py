"""The LightningModule: a U-Net, its loss, device-side augmentation and whole-region validation.

Batches arrive as uint8 tiles (a quarter of the bytes of float32 to copy to the device); the
module scales them to [0, 1], augments them on the device (segcore.augment, one field for
image, target and weight), crops target and weight to the network's valid output, normalises
the image and computes the loss. Validation predicts held-out regions block by block with
inference's planner and overlap-tile engine (segcore.tiling), and adds the blocks up to each
region's scores (segcore.block_scores): the scores inference will reach on the whole region,
not those of patches, in memory set by the block size rather than by the region's. They score
the foreground (class > 0 against target > 0), so a model trained on background / interior /
boundary is picked and compared by the same numbers as a background / cell one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor

from pipelines.training.normalization import RawInputUNet
from segcore.augment import AugmentConfig, augment_batch
from segcore.block_scores import SlideScores
from segcore.losses import combined_loss, weighted_cross_entropy
from segcore.model import UNet, center_crop
from segcore.normalization import InputNormalizer, Normalization, fold_normalization
from segcore.tiling import TilePlan, predict_padded

#: Validation metrics, in the order they are summed across ranks.
VAL_METRICS = ("iou", "dice", "pixel_error", "rand_error")


def augment_seed(seed: int, step: int, rank: int) -> int:
    """A distinct generator seed per (run seed, global step, rank); resumed runs repeat it."""
    return (seed * 1_000_003 + step) * 1_009 + rank


#: Longest side of the validation overlay: the thumbnail is built at this size and
#: tracking.overlay_image caps what it draws at it.
OVERLAY_SIDE = 1024


@dataclass
class OverlaySample:
    """The first validation region's image, target and prediction, for the per-epoch PNG."""

    image: np.ndarray
    target: np.ndarray
    prediction: np.ndarray


class Thumbnail:
    """Every `step`-th px of a region's image, target and prediction, filled block by block.

    `step` is the smallest that fits the region in `side` px, so the result equals
    `whole[..., ::step, ::step]` and its size does not depend on the region's.
    """

    def __init__(self, shape: tuple[int, int], channels: int, side: int) -> None:
        self.step = max(1, -(-max(shape) // side))
        h, w = (-(-n // self.step) for n in shape)
        self.image = np.zeros((channels, h, w), np.uint8)
        self.target = np.zeros((h, w), np.uint8)
        self.prediction = np.zeros((h, w), np.uint8)

    def add(
        self, y0: int, x0: int, image: np.ndarray, target: np.ndarray, prediction: np.ndarray
    ) -> None:
        """A block whose top-left px is (y0, x0) of the region."""
        s = self.step
        r, c = -y0 % s, -x0 % s  # first block row/column on the thumbnail's grid
        ys = slice((y0 + r) // s, (y0 + r) // s + len(range(r, target.shape[0], s)))
        xs = slice((x0 + c) // s, (x0 + c) // s + len(range(c, target.shape[1], s)))
        self.image[:, ys, xs] = image[:, r::s, c::s]
        self.target[ys, xs] = target[r::s, c::s]
        self.prediction[ys, xs] = prediction[r::s, c::s]

    def sample(self) -> OverlaySample:
        return OverlaySample(self.image, self.target, self.prediction)


class UNetModule(pl.LightningModule):
    """Trains `segcore.model.UNet`; hyper-parameters are plain values (checkpoints load with
    weights_only=True, and `segcore.checkpoint.load_unet` finds `unet_config` in them)."""

    def __init__(
        self,
        unet_config: dict,
        normalization: dict,
        tile_output: int,
        loss: str = "weighted_ce",
        dice_weight: float = 1.0,
        optimizer: dict | None = None,
        augment: dict | None = None,
        seed: int = 0,
        val_batch_size: int = 4,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.model = UNet.from_config(unet_config)
        self.normalization = Normalization(**normalization)
        self.normalizer = InputNormalizer(self.normalization)
        self.augment = AugmentConfig(**augment) if augment is not None else None
        self.optimizer_config = optimizer or {"name": "sgd", "lr": 0.01, "momentum": 0.99}
        self._generator: torch.Generator | None = None
        self._val_sums = torch.zeros(len(VAL_METRICS), dtype=torch.float64)
        self._val_counts = torch.zeros(len(VAL_METRICS), dtype=torch.float64)
        # Regions whose blocks are still coming, by index; the first region's thumbnail.
        self._regions: dict[int, SlideScores] = {}
        self._thumbnail: Thumbnail | None = None
        self.overlay: OverlaySample | None = None

    def forward(self, image01: Tensor) -> Tensor:
        """Logits for images on the [0, 1] scale."""
        return self.model(self.normalizer(image01))

    def _augment(
        self, image: Tensor, target: Tensor, weight: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        if self._generator is None or self._generator.device != image.device:
            self._generator = torch.Generator(device=image.device)
        self._generator.manual_seed(
            augment_seed(self.hparams.seed, self.global_step, self.global_rank)
        )
        return augment_batch(image, target, weight, self.augment, self._generator)

    def compute_loss(self, logits: Tensor, target: Tensor, weight: Tensor | None) -> Tensor:
        name = self.hparams.loss
        if name == "ce":
            return weighted_cross_entropy(logits, target, None)
        if name == "weighted_ce":
            return weighted_cross_entropy(logits, target, weight)
        return combined_loss(logits, target, weight, dice_weight=self.hparams.dice_weight)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        image = batch["image"].float() / 255.0
        target = batch["target"].long()
        weight = batch.get("weight")
        if self.augment is not None:
            image, target, weight = self._augment(image, target, weight)
        out = self.hparams.tile_output
        target = center_crop(target, out)
        weight = center_crop(weight, out) if weight is not None else None
        logits = self(image)
        if logits.shape[-1] != out:  # same-padded nets return the whole tile
            logits = center_crop(logits, out)
        loss = self.compute_loss(logits, target, weight)
        self.log("train_loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    # --- validation, block by block ------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._val_sums.zero_()
        self._val_counts.zero_()
        self._regions = {}
        self._thumbnail = None
        self.overlay = None

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Predict one block, add it to its region's sums; score the region once complete."""
        if not batch["count"]:
            return  # a copy that only pads this rank's share under DDP
        tiles = TilePlan(**batch["tiles"])
        # Foreground vs foreground: the same scores whatever classes the target splits it in.
        prediction = (self._predict_block(batch["padded"], tiles) > 0).astype(np.uint8)
        index, (i, j) = batch["index"], batch["block"]
        target = (np.asarray(batch["target"]) > 0).astype(np.uint8)
        rows, cols = batch["row_edges"], batch["col_edges"]
        if index not in self._regions:
            self._regions[index] = SlideScores(rows, cols)
        scores = self._regions[index]
        scores.add(i, j, target, prediction)
        if index == 0 and self.global_rank == 0:
            if self._thumbnail is None:
                shape, channels = (rows[-1], cols[-1]), batch["padded"].shape[0]
                self._thumbnail = Thumbnail(shape, channels, OVERLAY_SIDE)
            m, (h, w) = tiles.margin, target.shape
            image = batch["padded"][:, m : m + h, m : m + w].cpu().numpy()
            self._thumbnail.add(rows[i], cols[j], image, target, prediction)
        if scores.complete:
            del self._regions[index]
            if index == 0 and self._thumbnail is not None:
                self.overlay = self._thumbnail.sample()
            result = scores.result()
            for k, name in enumerate(VAL_METRICS):
                if math.isfinite(result[name]):
                    self._val_sums[k] += result[name]
                    self._val_counts[k] += 1

    def _predict_block(self, padded: Tensor, tiles: TilePlan) -> np.ndarray:
        """The block's class map (uint8) from its padded raw input."""
        precision = "bfloat16" if str(self.trainer.precision).startswith("bf16") else "float32"
        net = RawInputUNet(self.model, self.normalizer)
        logits = predict_padded(
            net, padded, tiles, self.hparams.val_batch_size, self.device, precision
        )
        return logits.argmax(0).cpu().numpy().astype(np.uint8)

    def on_validation_epoch_end(self) -> None:
        totals = torch.cat([self._val_sums, self._val_counts]).to(self.device)
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum").double().cpu()
        sums, counts = totals[: len(VAL_METRICS)], totals[len(VAL_METRICS) :]
        # Every rank logs the same reduced values, so checkpoint decisions agree across ranks.
        metrics = {
            f"val_{name}": float(sums[i] / counts[i]) if counts[i] else float("nan")
            for i, name in enumerate(VAL_METRICS)
        }
        # Already reduced: the mean over ranks of equal values only silences Lightning's warning.
        self.log_dict(metrics, sync_dist=True)

    # --- optimisation ----------------------------------------------------------------------

    def configure_optimizers(self) -> dict:
        cfg = self.optimizer_config
        params = self.model.parameters()
        if cfg["name"] == "adamw":
            optimizer = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        else:
            optimizer = torch.optim.SGD(
                params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"]
            )
        schedule = cfg.get("schedule", "none")
        if schedule == "none":
            return {"optimizer": optimizer}
        total = int(self.trainer.estimated_stepping_batches)
        if schedule == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        else:
            # cycle_momentum=False keeps the configured momentum (0.99 by default).
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=cfg["lr"], total_steps=total, cycle_momentum=False
            )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def exported_unet(self) -> UNet:
        """An eval-mode CPU copy of the U-Net that takes raw 0..255 pixel values."""
        return fold_normalization(self.model, self.normalization).eval()


class ValidateAtEnd(Callback):
    """Validate after the last step too when `max_steps` ends training mid-epoch.

    Lightning validates at epoch ends only, unless training is asked to stop: raising
    `should_stop` at the last step makes it validate (and checkpoint the best) before stopping.
    """

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True
