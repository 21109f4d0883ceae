"""Training progress as plain lines when Lightning's bar is off: a real Trainer, a stepped clock."""

from __future__ import annotations

import io
import re

import pytorch_lightning as pl
from pytorch_lightning.demos.boring_classes import BoringModel

from pipelines.training.progress import ProgressLog

LINE = re.compile(
    r"train: step (\d+)/(\d+)  loss (\d+\.\d{4})  (\d+\.\d\d) steps/s  "
    r"elapsed (\d+:\d\d:\d\d)  ETA (\d+:\d\d:\d\d|\?)"
)


class SteppedClock:
    """Each reading is `step` seconds after the previous one."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def fit(callback: ProgressLog, **trainer_args) -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[callback],
        **trainer_args,
    )
    trainer.fit(BoringModel())


def test_a_line_first_then_every_interval_and_on_the_last_step():
    stream = io.StringIO()
    # One clock reading at start and one per step, 10 s apart: a line at most every 25 s.
    fit(ProgressLog(stream, every_s=25, clock=SteppedClock(10.0)), max_steps=10)
    lines = stream.getvalue().splitlines()
    matches = [LINE.fullmatch(line) for line in lines]
    assert all(matches), lines
    steps = [int(m[1]) for m in matches]
    assert steps == [1, 4, 7, 10]
    assert {int(m[2]) for m in matches} == {10}
    # Step 4 is read 40 s after the start: 0.10 steps/s, 6 steps (60 s) to go.
    assert matches[1][4] == "0.10" and matches[1][5] == "0:00:40" and matches[1][6] == "0:01:00"
    assert matches[-1][6] == "0:00:00"
    assert all(float(m[3]) > 0 for m in matches)


def test_epochs_without_a_step_limit_count_their_batches():
    stream = io.StringIO()
    fit(ProgressLog(stream, every_s=1e9), max_epochs=2, limit_train_batches=3)
    steps = [LINE.fullmatch(line).group(1, 2) for line in stream.getvalue().splitlines()]
    assert steps == [("1", "6"), ("6", "6")]
