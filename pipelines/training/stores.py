"""Which stores a training run reads: those named, folders of stores, or `<workdir>/stores`.

    training_stores(config)   -> the stores to train on, every folder expanded

A store named directly is trained on as it is (without weight maps it fails naming itself).
A folder, `<workdir>/stores` included when no store is named, is an archive's stores: it also
holds slides without labels, and the validation stores; only its stores with weight maps that
are not held out for validation are trained on. A folder with none of those is an error.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.sources import find_stores, is_store
from pipelines.training.config import TrainConfig
from segcore.store import SlideStore, StoreError


def default_stores_dir(config: TrainConfig) -> Path:
    """Where `segflow ingest` puts stores and `segflow weights` completes them."""
    return config.workdir / "stores"


def training_stores(config: TrainConfig) -> list[Path]:
    """`config.stores` with each folder replaced by its trainable stores (see the module)."""
    paths = list(config.stores)
    if not paths:
        folder = default_stores_dir(config)
        if not folder.is_dir():
            raise StoreError(
                f"{folder}: no stores named and none here; name stores or folders of stores, "
                "or run `segflow ingest` and `segflow weights` first"
            )
        paths = [folder]
    held_out = {Path(p).resolve() for p in config.val_stores}
    stores: list[Path] = []
    for path in map(Path, paths):
        if is_store(path):
            stores += find_stores([path])
            continue
        found = [s for s in find_stores([path]) if s.resolve() not in held_out]
        weighted = [s for s in found if _has_weight_maps(s)]
        if not weighted:
            raise StoreError(
                f"{path}: none of its {len(found)} store(s) has weight maps to train on "
                "(run `segflow weights` first)"
            )
        stores += weighted
    return stores


def _has_weight_maps(store: Path) -> bool:
    """Whether training can read the store's target and weights; an unreadable store counts
    as ready, so that training fails naming it and its problem."""
    try:
        return SlideStore.open(store).weight is not None
    except StoreError:
        return True
