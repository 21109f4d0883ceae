"""Which training configurations Lightning runs by re-running the command line."""

from __future__ import annotations

import pytest

from pipelines.training.config import TrainConfig
from pipelines.training.launch import ranks


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({}, 1),  # "auto" on a CPU-only host: one process
        ({"accelerator": "cpu", "devices": 2, "strategy": "ddp"}, 2),
        ({"accelerator": "cpu", "devices": "2", "strategy": "ddp"}, 2),
        ({"accelerator": "cpu", "devices": [0, 1, 2], "strategy": "ddp"}, 3),
        ({"accelerator": "cpu", "devices": 2, "strategy": "ddp", "num_nodes": 2}, 4),
        ({"accelerator": "cpu", "devices": 2, "strategy": "ddp_spawn"}, 1),
        ({"accelerator": "cpu", "devices": 1, "strategy": "ddp"}, 1),
    ],
)
def test_ranks(settings, expected, tmp_path):
    config = TrainConfig(stores=[tmp_path / "s.zarr"], tracking_uri=None, **settings)
    assert ranks(config) == expected
