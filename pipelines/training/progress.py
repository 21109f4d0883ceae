"""Training progress as plain lines, for logs and pipes where Lightning's live bar is off.

On a terminal Lightning draws a bar; written to a file or a CI log that bar is off and a
minutes-long run would show nothing at all. `ProgressLog` prints one line on the first step,
then at most one every `every_s` seconds, and one on the last step:

    train: step 40/150  loss 0.4121  1.32 steps/s  elapsed 0:00:30  ETA 0:01:23
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TextIO

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

#: Seconds between two lines: often enough to see a run move, rare enough for a CI log.
EVERY_S = 30.0


class ProgressLog(Callback):
    """Step, loss, steps/s and ETA on `stream`, from global rank 0 only."""

    def __init__(
        self,
        stream: TextIO,
        every_s: float = EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.every_s = every_s
        self.clock = clock
        self._started = 0.0
        self._first_step = 0
        self._last_line: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = self.clock()
        self._first_step = trainer.global_step  # a resumed run counts its rate from here
        self._last_line = None

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not trainer.is_global_zero:
            return
        now, step = self.clock(), trainer.global_step
        total = _total_steps(trainer)
        due = self._last_line is None or now - self._last_line >= self.every_s
        if not (due or step >= total):
            return
        self._last_line = now
        elapsed = now - self._started
        rate = (step - self._first_step) / elapsed if elapsed > 0 else math.nan
        eta = (total - step) / rate if rate > 0 else math.nan
        print(
            f"train: step {step}/{total}  loss {_loss(outputs, trainer):.4f}  "
            f"{rate:.2f} steps/s  elapsed {_clock_time(elapsed)}  ETA {_clock_time(eta)}",
            file=self.stream,
            flush=True,
        )


def _total_steps(trainer: pl.Trainer) -> int:
    """max_steps, or what max_epochs amounts to when steps are unbounded (-1)."""
    if trainer.max_steps > 0:
        return trainer.max_steps
    return int(trainer.estimated_stepping_batches)


def _loss(outputs: Any, trainer: pl.Trainer) -> float:
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    if loss is None:
        loss = trainer.callback_metrics.get("train_loss", math.nan)
    return float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)


def _clock_time(seconds: float) -> str:
    """0:01:23; "?" before a rate is known."""
    return str(timedelta(seconds=round(seconds))) if math.isfinite(seconds) else "?"
