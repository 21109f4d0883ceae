"""What a training run produced: kept apart from `pipelines.train` so flows and other callers
can name it without importing Lightning."""

from __future__ import annotations

from pydantic import BaseModel

from pipelines.location import Location


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
    #: Where the checkpoint the model was exported from and its weights file are (a URL
    #: without credentials for a workdir on object storage).
    checkpoint: Location | None = None
    weights: Location | None = None
    global_step: int = 0
    resumed_from_step: int | None = None
