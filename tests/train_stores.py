"""Tiny slide stores with training targets and weights for the training tests.

Built directly with zarr in the layout of segcore/store.py (image, tissue mask, training
target and weight), from segcore.synthetic regions and segcore.weights, so the tests do not
depend on the ingest and weight-map stages.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
import zarr

from segcore import ngff
from segcore.store import STORE_FORMAT
from segcore.synthetic import SlideSpec, render_region
from segcore.weights import separate_touching, training_target, weight_map

TISSUE_DOWNSAMPLE = 8


def _write_array(root: zarr.Group, name: str, data: np.ndarray, chunks: tuple) -> None:
    ngff.create_array(root, name, data.shape, data.dtype, chunks)[...] = data


def write_store(
    path: Path,
    image: np.ndarray,
    labels: np.ndarray,
    chunk: int = 64,
    tissue: np.ndarray | None = None,
) -> Path:
    """A store from a (C, H, W) uint8 image and (H, W) instance labels."""
    root = zarr.open_group(path, mode="w")
    c, h, w = image.shape
    k = TISSUE_DOWNSAMPLE
    if tissue is None:
        tissue = image.mean(0) < 225  # anything darker than glass
    tissue_small = tissue[::k, ::k].astype(np.uint8)
    root.attrs["segflow"] = {
        "store_format": STORE_FORMAT,
        "tissue_downsample": k,
        "checksum": f"sha256:{abs(hash(image.tobytes())):x}",
        "source": str(path),
    }
    root.attrs["ome"] = {"version": "0.5", "multiscales": [{"datasets": [{"path": "0"}]}]}
    _write_array(root, "0", image, (c, chunk, chunk))
    _write_array(root, "labels/tissue/0", tissue_small, (chunk, chunk))
    separated = separate_touching(labels)
    _write_array(root, "training/target", training_target(labels), (chunk, chunk))
    weight = weight_map(separated).astype(np.float32)
    _write_array(root, "training/weight", weight, (chunk, chunk))
    return path


def synthetic_store(path: Path, size: int = 160, seed: int = 2) -> Path:
    """An RGB H&E-like store of size x size px with nuclei and their weights."""
    image, labels = render_region(SlideSpec(size, size, seed), 0, 0, size, size)
    return write_store(path, np.ascontiguousarray(image.transpose(2, 0, 1)), labels)


def disk_store(path: Path, size: int = 96, seed: int = 0, channels: int = 1) -> Path:
    """Bright noisy disks (cells, some touching) on a dark background: learnt in a few steps."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    labels = np.zeros((size, size), np.uint32)
    for i in range(size * size // 500):
        cy, cx, r = rng.integers(0, size), rng.integers(0, size), rng.integers(4, 9)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i + 1
    image = np.where(labels > 0, 170.0, 60.0) + rng.normal(0, 20, (channels, size, size))
    tissue = np.ones((size, size), bool)
    return write_store(path, np.clip(image, 0, 255).astype(np.uint8), labels, tissue=tissue)


def tiny_config(tmp_path: Path, stores: list[Path], val: list[Path], **overrides) -> dict:
    """A TrainConfig dict for a base-4, depth-3 U-Net that trains a few steps in seconds."""
    config = {
        "stores": [str(p) for p in stores],
        "val_stores": [str(p) for p in val],
        "model": {"base_channels": 4, "depth": 3, "dropout": 0.0},
        "output_size": 32,
        "batch_size": 2,
        "max_steps": 6,
        "steps_per_epoch": 3,
        "checkpoint_every": 2,
        "num_workers": 0,
        "optimizer": {"name": "adamw", "lr": 0.01},
        "workdir": str(tmp_path / "work"),
        "tracking_uri": None,
        "experiment": "test-train",
        "registered_model_name": "test-unet",
        "seed": 3,
    }
    config.update(overrides)
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path
