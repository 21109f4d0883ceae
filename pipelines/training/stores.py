"""Which stores a training run reads: those named, folders of stores, or `<workdir>/stores`.

    training_stores(config)   -> the stores to train on, every folder expanded

A store named directly is trained on as it is (without weight maps it fails naming itself).
A folder, `<workdir>/stores` included when no store is named, is an archive's stores: it also
holds slides without labels, and the validation stores; only its stores with weight maps that
are not held out for validation are trained on. A folder with none of those is an error.
Stores and folders may be local or on object storage (a folder there is a prefix, listed).
"""

from __future__ import annotations

from pathlib import Path

from pipelines.location import Where, is_folder
from pipelines.sources import ready_stores
from pipelines.training.config import TrainConfig
from segcore.store import SlideStore, StoreError


def default_stores_dir(config: TrainConfig) -> Where:
    """Where `segflow ingest` puts stores and `segflow weights` completes them."""
    return config.workdir / "stores"


def same_place(where: Where) -> Path | str:
    """What two names of one store have in common: a local path resolved (links and `..`
    followed), a URL's text (`s3://lab/a.zarr`)."""
    return where.resolve() if isinstance(where, Path) else str(where)


def training_stores(config: TrainConfig) -> list[Where]:
    """`config.stores` with each folder replaced by its trainable stores (see the module)."""
    paths = list(config.stores)
    if not paths:
        folder = default_stores_dir(config)
        if not is_folder(folder):
            raise StoreError(
                f"{folder}: no stores named and none here; name stores or folders of stores, "
                "or run `segflow ingest` and `segflow weights` first"
            )
        paths = [folder]
    held_out = {same_place(p) for p in config.val_stores}

    def trainable(store: Where) -> bool:
        return same_place(store) not in held_out and SlideStore.open(store).weight is not None

    need = "has weight maps to train on (run `segflow weights` first)"
    return ready_stores(paths, trainable, need)
