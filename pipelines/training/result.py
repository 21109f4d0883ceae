"""What a training run produced: kept apart from `pipelines.train` so flows and other callers
can name it without importing Lightning."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel


class TrainResult(BaseModel):
    """What a run produced; on DDP ranks other than 0 only `rank` and `global_step` are set."""

    rank: int = 0
    run_id: str | None = None
    experiment_id: str | None = None
    model_uri: str | None = None
    registered_name: str | None = None
    version: str | None = None
    became_champion: bool = False
    aliases: list[str] = []
    metrics: dict[str, float] = {}
    checkpoint: Path | None = None
    weights: Path | None = None
    global_step: int = 0
    resumed_from_step: int | None = None
