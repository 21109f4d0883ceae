"""`python -m pipelines.train`: bad input gets one clear line and a non-zero exit."""

from __future__ import annotations

import numpy as np
import zarr
from train_stores import disk_store, tiny_config, write_config

from pipelines.train import main
from segcore import ngff
from segcore.store import STORE_FORMAT


def test_invalid_configuration_exits_2_with_one_line(tmp_path, capsys):
    config = write_config(tmp_path / "bad.yaml", {"stores": ["a.zarr"], "optimizer": {"lr": -1}})
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.yaml" in err and "optimizer.lr" in err and "\n" not in err


def test_unknown_key_is_refused(tmp_path, capsys):
    config = write_config(tmp_path / "typo.yaml", {"stores": ["a.zarr"], "max_step": 3})
    assert main(["--config", str(config)]) == 2
    assert "max_step" in capsys.readouterr().err


def test_store_without_training_target_exits_1_naming_it(tmp_path, capsys):
    path = tmp_path / "unlabelled.zarr"
    root = zarr.open_group(path, mode="w")
    root.attrs["segflow"] = {"store_format": STORE_FORMAT, "tissue_downsample": 8}
    root.attrs["ome"] = {"multiscales": [{"datasets": [{"path": "0"}]}]}
    ngff.create_array(root, "0", (1, 32, 32), np.uint8, (1, 32, 32))[...] = 0
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, [path], []))
    assert main(["--config", str(config)]) == 1
    err = capsys.readouterr().err.strip()
    assert "unlabelled.zarr: no training/target" in err
    assert "\n" not in err
    assert not (tmp_path / "work" / "checkpoints").exists()


def test_resume_without_a_checkpoint_exits_1(tmp_path, capsys):
    store = disk_store(tmp_path / "a.zarr", size=64)
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, [store], []))
    assert main(["--config", str(config), "resume=true"]) == 1
    assert "nothing to resume" in capsys.readouterr().err
