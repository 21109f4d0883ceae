"""Training tiles and validation blocks from slide stores, for a LightningDataModule.

Where to sample and what to read are kept apart: `TileSampler` draws output-tile origins in
the main process (weighted toward tissue, seeded by (seed, epoch, rank), so every DDP rank
draws its own positions and the stream does not depend on the number of DataLoader workers);
`TileDataset` reads one input tile per origin in a worker, opening the Zarr arrays lazily in
that worker and reading only the chunks under the tile's bounding box.

Worked example, depth-5 U-Net (margin 92), output 388 px, a 1000 x 700 slide: an origin
(y, x) = (612, 0) predicts rows 612..999 and columns 0..387; its input tile reads rows
520..1091 and columns -92..479, mirrored about the slide's edge pixels (row 1000 reads row 998,
column -1 reads column 1), so the network's valid output covers the target crop exactly.
Target and weight are read over the whole input tile too: augmentation deforms all three
with one field, and the module crops target and weight to the output afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import numpy as np
import pytorch_lightning as pl
import torch
import zarr
from torch.utils.data import DataLoader, Dataset, Sampler

from pipelines.inference.plan import SlidePlan, plan_slide
from pipelines.location import Where
from pipelines.training.chunk_cache import ChunkCache, ChunkTransform
from pipelines.training.config import TrainConfig
from segcore.geometry import UNetGeometry
from segcore.normalization import INPUT_DTYPE
from segcore.stain import StainInputError
from segcore.stain_standardization import (
    StainMoments,
    StainStandardization,
    reference_moments,
    slide_stain_moments,
)
from segcore.store import TARGET, TRAINING_GROUP, WEIGHT, SlideStore, open_group, read_checked
from segcore.tiling import reflect_indices

#: The pixel type training reads; exported models take these raw values (0..255) as float,
#: and inference refuses slides of any other type rather than feed them unscaled.


class TrainingDataError(ValueError):
    """A store cannot be trained or validated on (missing arrays, wrong shape or dtype)."""


@dataclass(frozen=True)
class TileShape:
    """Input tile side, and the side of the output it predicts (the target/weight crop)."""

    input: int
    output: int

    @property
    def margin(self) -> int:
        return (self.input - self.output) // 2


def tile_shape(geometry: UNetGeometry, tile_size: int | None, output_size: int) -> TileShape:
    """`tile_size` rounded down to a valid input, or the smallest input covering `output_size`."""
    if tile_size is None:
        size = geometry.valid_input_size(output_size)
    else:
        size = geometry.valid_input_size_at_most(tile_size)
        if size is None:
            raise TrainingDataError(
                f"tile_size {tile_size} is below the smallest valid input "
                f"{geometry.valid_input_size(1)} of this U-Net"
            )
    return TileShape(size, geometry.output_size(size))


@dataclass(frozen=True)
class StoreInfo:
    """What the sampler needs of one training store, read once in the main process."""

    path: Where
    height: int
    width: int
    channels: int
    tissue: np.ndarray | None
    tissue_downsample: int


def open_training_store(path: Where, with_weight: bool) -> StoreInfo:
    """Check that `path` holds an image, a target (and a weight map) of matching shape, every
    chunk of each on disk."""
    store = SlideStore.open(path)
    image = store.verified(store.image(0))
    if image.ndim != 3 or image.dtype != INPUT_DTYPE:
        raise TrainingDataError(
            f"{path}: image must be (c, y, x) {INPUT_DTYPE}, got {image.shape} {image.dtype}; "
            "segflow does not rescale other pixel types silently"
        )
    height, width = image.shape[1:]
    arrays = {"training/target": store.target}
    if with_weight:
        arrays["training/weight"] = store.weight
    for name, array in arrays.items():
        if array is None:
            raise TrainingDataError(f"{path}: no {name}; run the weight-map stage on it first")
        if tuple(array.shape) != (height, width):
            raise TrainingDataError(
                f"{path}: {name} has shape {tuple(array.shape)}, image is {(height, width)}"
            )
        store.verified(array)
    tissue = store.tissue
    if tissue is not None:
        store.verified(tissue)
    return StoreInfo(
        path=path,
        height=height,
        width=width,
        channels=image.shape[0],
        tissue=None if tissue is None else read_checked(tissue, _whole(tissue)) > 0,
        tissue_downsample=store.tissue_downsample if tissue is not None else 1,
    )


def _cell_weights(info: StoreInfo, background_weight: float) -> np.ndarray:
    """Sampling weight per tissue-mask cell: 1 on tissue, `background_weight` elsewhere."""
    if info.tissue is None:
        return np.ones((1, 1))
    weights = np.where(info.tissue, 1.0, background_weight)
    if weights.sum() == 0:  # no tissue and background excluded: fall back to uniform
        return np.ones_like(weights)
    return weights


def output_origin(centre: int, extent: int, output: int) -> int:
    """Origin of an output window of side `output` around `centre`, kept inside the slide.

    A slide smaller than the window gets it centred (target and weight are then mirrored too).
    """
    if extent < output:
        return -((output - extent) // 2)
    return int(np.clip(centre - output // 2, 0, extent - output))


class TileSampler(Sampler[tuple[int, int, int]]):
    """Yields (store index, y, x) output origins, `length` per epoch, for one DDP rank."""

    def __init__(
        self,
        stores: list[StoreInfo],
        tile: TileShape,
        length: int,
        seed: int,
        rank: int = 0,
        background_weight: float = 0.05,
    ) -> None:
        self.stores = stores
        self.tile = tile
        self.length = length
        self.seed = seed
        self.rank = rank
        self.epoch = 0
        cells = [_cell_weights(s, background_weight) for s in stores]
        self._cell_cdf = [np.cumsum(c.ravel()) for c in cells]
        self._cell_shape = [c.shape for c in cells]
        # A store's share is its weighted area: cells times the level-0 px each covers.
        mass = np.array(
            [
                cdf[-1] * s.tissue_downsample**2
                for cdf, s in zip(self._cell_cdf, stores, strict=True)
            ]
        )
        self._store_p = mass / mass.sum()

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def positions(self, rng: np.random.Generator, n: int) -> list[tuple[int, int, int]]:
        """`n` output origins drawn with `rng`."""
        which = rng.choice(len(self.stores), size=n, p=self._store_p)
        out = []
        for s in which:
            info = self.stores[s]
            cdf, cols = self._cell_cdf[s], self._cell_shape[s][1]
            cell = min(
                int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), cdf.size - 1
            )
            cy, cx = divmod(cell, cols)
            if info.tissue is None:
                cy_px, cx_px = rng.integers(info.height), rng.integers(info.width)
            else:
                k = info.tissue_downsample
                cy_px = min(cy * k + int(rng.integers(k)), info.height - 1)
                cx_px = min(cx * k + int(rng.integers(k)), info.width - 1)
            out.append(
                (
                    int(s),
                    output_origin(int(cy_px), info.height, self.tile.output),
                    output_origin(int(cx_px), info.width, self.tile.output),
                )
            )
        return out

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        return iter(self.positions(rng, self.length))


def _whole(array: zarr.Array) -> tuple[slice, ...]:
    return (slice(None),) * array.ndim


def read_mirrored(
    array: zarr.Array,
    rows: np.ndarray,
    cols: np.ndarray,
    cache: ChunkCache | None = None,
    transform: ChunkTransform | None = None,
) -> np.ndarray:
    """array[..., rows, cols] for mirrored index vectors: one bounding-box read (through
    `cache` where given, mapped pixel by pixel by `transform` where given), then a gather.

    A chunk that fails to decode raises `StoreError` naming it (`read_checked`)."""
    r0, r1 = int(rows.min()), int(rows.max()) + 1
    c0, c1 = int(cols.min()), int(cols.max()) + 1
    if cache is None:
        lead = (slice(None),) * (array.ndim - 2)
        block = read_checked(array, (*lead, slice(r0, r1), slice(c0, c1)))
        block = block if transform is None else transform(block)
    else:
        block = cache.read(array, slice(r0, r1), slice(c0, c1), transform)
    return _gather(_gather(block, rows - r0, axis=-2), cols - c0, axis=-1)


def _gather(block: np.ndarray, index: np.ndarray, axis: int) -> np.ndarray:
    """`block` indexed by `index` along `axis`: a view where `index` is a plain run (a tile
    away from the slide's edges), else one 1-D take (several times faster than one 2-D
    fancy index over both axes at once)."""
    if index[0] == 0 and index[-1] == block.shape[axis] - 1 == len(index) - 1:
        return block  # the bounding box of a plain run is the run itself
    return np.take(block, index, axis=axis)


@dataclass(frozen=True)
class _OpenStore:
    """The arrays a training tile reads, opened once per process from one opening of the
    store's group (opening costs milliseconds locally, as much as reading a cached tile, and a
    request per metadata document on object storage). `open_training_store` has checked them
    in the main process."""

    image: zarr.Array
    target: zarr.Array
    weight: zarr.Array | None

    @classmethod
    def open(cls, path: Where) -> _OpenStore:
        group = open_group(path, mode="r")
        training = group[TRAINING_GROUP]
        return cls(group["0"], training[TARGET], training.get(WEIGHT))


class _LazyStores:
    """Zarr arrays and a chunk cache made on first use in each process (DataLoader workers
    fork or spawn, and neither open arrays nor cached chunks should travel with them)."""

    def __init__(self, paths: list[Where], cache_bytes: int) -> None:
        self.paths = paths
        self.cache_bytes = cache_bytes
        self._pid: int | None = None
        self._stores: list[_OpenStore] = []
        self.cache = ChunkCache(cache_bytes)

    def __getstate__(self) -> dict:
        return {"paths": self.paths, "cache_bytes": self.cache_bytes, "_pid": None}

    def __getitem__(self, index: int) -> _OpenStore:
        if self._pid != os.getpid():
            self._stores = [_OpenStore.open(path) for path in self.paths]
            self.cache = ChunkCache(self.cache_bytes)
            self._pid = os.getpid()
        return self._stores[index]


class TileDataset(Dataset):
    """Reads the input tile, target and weight around one output origin (mirrored at edges),
    keeping up to `cache_bytes` of decoded chunks per process (`ChunkCache`); `stains`, one
    per store where given, standardise each store's image.

    Indexed by `TileSampler` positions, so it has no length of its own.
    """

    def __init__(
        self,
        paths: list[Where],
        tile: TileShape,
        with_weight: bool,
        cache_bytes: int = 0,
        stains: list[StainStandardization] | None = None,
    ) -> None:
        self.stores = _LazyStores(paths, cache_bytes)
        self.tile = tile
        self.with_weight = with_weight
        self.stains = stains

    def __getitem__(self, position: tuple[int, int, int]) -> dict[str, torch.Tensor]:
        s, y, x = position
        store = self.stores[s]
        cache = self.stores.cache
        height, width = store.image.shape[1:]
        m, t = self.tile.margin, self.tile.input
        rows = reflect_indices(y - m, y - m + t, height)
        cols = reflect_indices(x - m, x - m + t, width)
        stain = self.stains[s] if self.stains is not None else None
        item = {
            "image": torch.from_numpy(read_mirrored(store.image, rows, cols, cache, stain)),
            "target": torch.from_numpy(read_mirrored(store.target, rows, cols, cache)),
        }
        if self.with_weight:
            weight = read_mirrored(store.weight, rows, cols, cache).astype(np.float32, copy=False)
            item["weight"] = torch.from_numpy(weight)
        return item


@dataclass(frozen=True)
class Region:
    """A validation window of one store, level-0 px."""

    store: Where
    y: int
    x: int
    height: int
    width: int
    #: The store's stain standardisation, for a model trained with one.
    stain: StainStandardization | None = None


def resolve_regions(config: TrainConfig) -> list[Region]:
    """Whole held-out stores plus explicit regions, clipped to their slides."""
    regions = []
    wanted = [(path, 0, 0, None, None) for path in config.val_stores]
    wanted += [(r.store, r.y, r.x, r.height, r.width) for r in config.val_regions]
    for path, y, x, h, w in wanted:
        store = SlideStore.open(path)
        if store.target is None:
            raise TrainingDataError(f"{path}: no training/target to validate against")
        store.verified(store.image(0))
        store.verified(store.target)
        height, width = store.shape[1:]
        if y >= height or x >= width:
            raise TrainingDataError(f"{path}: region origin ({y}, {x}) outside {height}x{width}")
        h = min(h or height - y, height - y)
        w = min(w or width - x, width - x)
        regions.append(Region(path, y, x, h, w))
    return regions


class BlockDataset(Dataset):
    """Validation regions cut into the inference planner's blocks, one item per block.

    Each item is what one block needs, whatever the region's size: the block's mirror-padded
    input (real slide context around it, mirrored only at the slide's own edges), its tiles
    (`TilePlan` fields; `predict_padded` of them is the whole-region prediction of the block's
    px, as in inference) and its target, plus where it sits in the region's block grid, so
    that `segcore.block_scores.SlideScores` adds blocks up to the whole region's scores. A
    region with count 0 (the copies that pad a rank's share to equal length under DDP) is one
    placeholder item that reads nothing.
    """

    def __init__(
        self,
        regions: list[Region],
        counts: list[int],
        geometry: UNetGeometry,
        tile_size: int,
        block_size: int | None = None,
    ) -> None:
        self.regions = regions
        self.counts = counts
        self.plans = [
            plan_slide((r.height, r.width), geometry, tile_size, block_size) for r in regions
        ]
        self.grids = [(block_edges(p, axis=0), block_edges(p, axis=1)) for p in self.plans]
        self.items = [
            (index, block)
            for index, plan in enumerate(self.plans)
            for block in (plan.blocks if counts[index] else plan.blocks[:1])
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, item: int) -> dict:
        index, block = self.items[item]
        if not self.counts[index]:
            return {"index": index, "count": 0}
        region, (row_edges, col_edges) = self.regions[index], self.grids[index]
        store = SlideStore(region.store)
        image = store.image(0)
        height, width = image.shape[1:]
        m = block.tiles.margin
        ph, pw = block.tiles.padded_shape
        y0, x0 = region.y + block.y0, region.x + block.x0
        rows = reflect_indices(y0 - m, y0 - m + ph, height)
        cols = reflect_indices(x0 - m, x0 - m + pw, width)
        ys, xs = slice(y0, region.y + block.y1), slice(x0, region.x + block.x1)
        return {
            "index": index,
            "count": 1,
            "row_edges": row_edges,
            "col_edges": col_edges,
            "block": block.index,
            # Plain values: Lightning's batch transfer rejects frozen dataclasses like TilePlan.
            "tiles": asdict(block.tiles),
            "padded": torch.from_numpy(read_mirrored(image, rows, cols, transform=region.stain)),
            "target": read_checked(store.target, (ys, xs)),
        }


def block_edges(plan: SlidePlan, axis: int) -> tuple[int, ...]:
    """Row (axis 0) or column (axis 1) edges of the plan's block grid, 0 to the slide's end."""
    starts = {block.y0 if axis == 0 else block.x0 for block in plan.blocks}
    return (*sorted(starts), plan.shape[axis])


def shard_regions(
    regions: list[Region], rank: int, world_size: int
) -> tuple[list[Region], list[int]]:
    """Rank `rank`'s regions (round robin), padded with zero-count repeats to equal length."""
    per_rank = -(-len(regions) // world_size)
    mine = regions[rank::world_size]
    counts = [1] * len(mine)
    while len(mine) < per_rank:
        mine.append(regions[0])
        counts.append(0)
    return mine, counts


def first_item(batch: list[dict]) -> dict:
    """Collate for batch_size=1 block loaders: the item itself (its grid and tiles are not
    tensors)."""
    return batch[0]


def validation_loader(
    regions: list[Region],
    rank: int,
    world_size: int,
    geometry: UNetGeometry,
    tile_size: int,
    block_size: int | None = None,
) -> DataLoader:
    """Rank `rank`'s share of the regions, one block per batch, in each region's raster order.

    Blocks are inference's (`block_size` None = its default side, about 2048 px), so a batch
    holds one block's input, logits and target whatever the size of the held-out slide.
    """
    mine, counts = shard_regions(regions, rank, world_size)
    dataset = BlockDataset(mine, counts, geometry, tile_size, block_size)
    return DataLoader(dataset, batch_size=1, collate_fn=first_item)


def _stain_moments(path: Where) -> StainMoments:
    """A store's stain moments (segcore.stain_standardization), or a TrainingDataError naming it."""
    try:
        return slide_stain_moments(SlideStore.open(path).image(0))
    except StainInputError as exc:
        raise TrainingDataError(f"{path}: cannot standardise its stains ({exc})") from exc


class SlideTileDataModule(pl.LightningDataModule):
    """Random training tiles from `config.stores`, validation block by block of held-out regions."""

    def __init__(self, config: TrainConfig, geometry: UNetGeometry, tile: TileShape) -> None:
        super().__init__()
        self.config = config
        self.geometry = geometry
        self.tile = tile
        self.with_weight = config.loss != "ce"
        self.stores = [open_training_store(p, self.with_weight) for p in config.stores]
        channels = {s.channels for s in self.stores}
        if len(channels) != 1:
            raise TrainingDataError(f"training stores disagree on channels: {sorted(channels)}")
        self.channels = channels.pop()
        self.regions = resolve_regions(config)
        #: The stain moments every store is standardised to (`config.stain_standardization`):
        #: the mean of the training stores' own.
        self.stain_reference: StainMoments | None = None
        self.stains: list[StainStandardization] | None = None
        if config.stain_standardization:
            moments = [_stain_moments(s.path) for s in self.stores]
            self.stain_reference = reference_moments(moments)
            self.stains = [StainStandardization(m, self.stain_reference) for m in moments]
            self.regions = [
                replace(
                    r, stain=StainStandardization(_stain_moments(r.store), self.stain_reference)
                )
                for r in self.regions
            ]

    def sampler(self, rank: int) -> TileSampler:
        return TileSampler(
            self.stores,
            self.tile,
            length=self.config.steps_per_epoch * self.config.batch_size,
            seed=self.config.seed,
            rank=rank,
            background_weight=self.config.background_weight,
        )

    def dataset(self) -> TileDataset:
        return TileDataset(
            [s.path for s in self.stores],
            self.tile,
            self.with_weight,
            cache_bytes=self.config.loader_cache_mb * 2**20,
            stains=self.stains,
        )

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def train_dataloader(self) -> DataLoader:
        rank, _ = self._rank_world()
        workers = self.config.num_workers
        return DataLoader(
            self.dataset(),
            batch_size=self.config.batch_size,
            sampler=self.sampler(rank),
            num_workers=workers,
            persistent_workers=workers > 0,
            # Zarr 3 runs an asyncio thread and MLflow/Prefect leave threads too: forking such a
            # process can kill workers at random; a fork server starts them clean.
            multiprocessing_context="forkserver" if workers > 0 else None,
            pin_memory=torch.cuda.is_available(),
            drop_last=True,
        )

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        tile_size = self.config.val_tile_size or self.tile.input
        return validation_loader(self.regions, rank, world, self.geometry, tile_size)
