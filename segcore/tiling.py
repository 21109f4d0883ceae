"""Overlap-tile prediction (Ronneberger et al. 2015, Fig. 2): planning apart from running.

Worked example, paper U-Net (depth 5, margin 92, pooling grid 16), 572 px input tiles, a
1000 x 700 image:
  - one tile predicts 388 x 388 output px; tile origins must sit on the 16 px grid, so tiles
    step by 384 (the largest multiple of 16 <= 388) and neighbours overlap by 4 px;
  - rows need origins 0, 384, 768 (the last tile overhangs the image by 156 px, which is
    computed on mirrored pixels and thrown away), columns 0, 384;
  - the input is mirrored by 92 px on the top/left and by 92 + overhang on the bottom/right,
    so every tile reads real or mirrored context and no zero padding reaches a kept pixel.
Because every origin is on the pooling grid of the padded image, each tile computes exactly
what one forward pass over the whole padded image computes for the same pixels.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from segcore.geometry import UNetGeometry

#: Activation memory the CPU default tile is sized for.
CPU_TILE_MEMORY_BYTES = 1 << 30


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of one prediction go, in output coordinates.

    Input tile i covers padded rows origins[i][0] .. + tile_size[0] (the padded image starts
    `margin` px above and left of output pixel 0) and predicts output rows origins[i][0] ..
    + output_size[0].
    """

    out_shape: tuple[int, int]
    tile_size: tuple[int, int]
    output_size: tuple[int, int]
    stride: tuple[int, int]
    margin: int
    origins_y: tuple[int, ...]
    origins_x: tuple[int, ...]

    @property
    def origins(self) -> list[tuple[int, int]]:
        return [(y, x) for y in self.origins_y for x in self.origins_x]

    @property
    def padded_shape(self) -> tuple[int, int]:
        """Extent of the padded input every tile reads from."""
        return (
            self.origins_y[-1] + self.tile_size[0],
            self.origins_x[-1] + self.tile_size[1],
        )

    def __len__(self) -> int:
        return len(self.origins_y) * len(self.origins_x)


def _axis_origins(extent: int, output: int, stride: int) -> tuple[int, ...]:
    """0, stride, 2*stride, ... until the tiles cover [0, extent)."""
    n = 1 if extent <= output else 1 + -(-(extent - output) // stride)
    return tuple(i * stride for i in range(n))


def plan_tiles(
    out_shape: tuple[int, int], geometry: UNetGeometry, tile_size: int | tuple[int, int]
) -> TilePlan:
    """Plan tiles of (at most) `tile_size` input px covering an output of `out_shape`.

    Tile sizes that are not valid inputs are rounded down to the nearest valid size, and shrunk
    to the smallest valid size covering the image when the image is smaller than one tile.
    Origins step by a multiple of the pooling grid, so a plan for a block whose origin is a
    multiple of `stride` places its tiles where the plan of the whole slide would.
    """
    sizes = (tile_size, tile_size) if isinstance(tile_size, int) else tuple(tile_size)
    tiles, outputs, strides = [], [], []
    for extent, requested in zip(out_shape, sizes, strict=True):
        if extent < 1:
            raise ValueError(f"cannot tile an empty image of shape {out_shape}")
        t = geometry.valid_input_size_at_most(requested)
        if t is None:
            raise ValueError(
                f"tile size {requested} is below the smallest valid input "
                f"{geometry.valid_input_size(1)} of this U-Net"
            )
        t = min(t, geometry.valid_input_size(extent))
        o = geometry.output_size(t)
        s = max(o // geometry.pool_factor, 1) * geometry.pool_factor
        if s > o:
            # Tiny nets (output < pooling grid) cannot step on the grid without gaps; grow the
            # tile until one grid step fits in its output.
            t = geometry.valid_input_size(geometry.pool_factor)
            o = geometry.output_size(t)
            s = geometry.pool_factor
        tiles.append(t)
        outputs.append(o)
        strides.append(s)
    return TilePlan(
        out_shape=(int(out_shape[0]), int(out_shape[1])),
        tile_size=(tiles[0], tiles[1]),
        output_size=(outputs[0], outputs[1]),
        stride=(strides[0], strides[1]),
        margin=geometry.margin,
        origins_y=_axis_origins(out_shape[0], outputs[0], strides[0]),
        origins_x=_axis_origins(out_shape[1], outputs[1], strides[1]),
    )


def reflect_indices(start: int, stop: int, size: int) -> np.ndarray:
    """Indices of rows start..stop-1 of an axis of `size`, mirrored (numpy 'reflect') outside.

    reflect_indices(-2, 6, 4) -> [2, 1, 0, 1, 2, 3, 2, 1]. Works for any overhang, also one
    larger than the axis (repeated mirroring), which np.pad needs many passes for.
    """
    idx = np.arange(start, stop)
    if size == 1:
        return np.zeros_like(idx)
    period = 2 * (size - 1)
    idx = np.mod(idx, period)
    return np.where(idx >= size, period - idx, idx)


def mirror_pad(image: np.ndarray | torch.Tensor, plan: TilePlan) -> torch.Tensor:
    """The C x H x W image mirrored out to the plan's padded extent (origin at -margin)."""
    tensor = torch.as_tensor(image)
    m = plan.margin
    ph, pw = plan.padded_shape
    rows = torch.from_numpy(reflect_indices(-m, ph - m, tensor.shape[-2]))
    cols = torch.from_numpy(reflect_indices(-m, pw - m, tensor.shape[-1]))
    return tensor.index_select(-2, rows.to(tensor.device)).index_select(-1, cols.to(tensor.device))


def _batches(plan: TilePlan, batch_size: int) -> Iterator[list[tuple[int, int]]]:
    origins = plan.origins
    for i in range(0, len(origins), batch_size):
        yield origins[i : i + batch_size]


def default_tile_size(model: torch.nn.Module, device: torch.device, batch_size: int) -> int:
    """Largest valid tile whose activations fit a memory budget (free GPU memory or 1 GiB)."""
    geometry: UNetGeometry = model.geometry
    base = model.config.base_channels
    # Live float32 activations per input pixel, summed over levels (channels shrink 4x in area
    # per level but double in width: base * 2^l / 4^l), times ~6 tensors alive at once.
    bytes_per_px = 4 * 6 * sum(base * 2**level / 4**level for level in range(geometry.depth))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free * 0.5
    else:
        budget = CPU_TILE_MEMORY_BYTES
    side = int((budget / (bytes_per_px * batch_size)) ** 0.5)
    side = min(max(side, geometry.valid_input_size(geometry.pool_factor)), 2236)
    return geometry.valid_input_size_at_most(side) or geometry.valid_input_size(1)


@torch.inference_mode()
def predict_padded(
    model: torch.nn.Module,
    padded: torch.Tensor,
    plan: TilePlan,
    batch_size: int = 4,
    device: torch.device | None = None,
    precision: str = "float32",
) -> torch.Tensor:
    """Run the plan's tiles over an already padded C x PH x PW input; float32 K x H x W logits
    on `padded`'s device (a block already on the GPU is reduced there, not copied back whole).

    `padded` must cover `plan.padded_shape` with output pixel (0, 0) at (margin, margin).
    """
    device = device or next(model.parameters()).device
    th, tw = plan.tile_size
    oh, ow = plan.output_size
    H, W = plan.out_shape
    out = torch.empty((model.config.n_classes, H, W), dtype=torch.float32, device=padded.device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16")
    for batch in _batches(plan, batch_size):
        tiles = torch.stack([padded[:, y : y + th, x : x + tw] for y, x in batch])
        if len(batch) == 1 < batch_size:
            # CPU convolutions take another, not bit-identical, path for a batch of one: running
            # a lone tile twice keeps each tile's logits independent of how tiles are batched,
            # so a slide split into blocks reproduces the whole-slide prediction exactly.
            tiles = tiles.expand(2, -1, -1, -1)
        tiles = tiles.to(device, dtype=torch.float32, non_blocking=True)
        with autocast:
            logits = model(tiles)[: len(batch)]
        if logits.shape[-2:] != (oh, ow):
            # Same-padded nets return the whole tile: keep its centre, away from zero padding.
            m = plan.margin
            logits = logits[..., m : m + oh, m : m + ow]
        logits = logits.float().to(out.device)
        for (y, x), tile_logits in zip(batch, logits, strict=True):
            h, w = min(oh, H - y), min(ow, W - x)
            out[:, y : y + h, x : x + w] = tile_logits[:, :h, :w]
    return out


def predict_tiled(
    model: torch.nn.Module,
    image: np.ndarray | torch.Tensor,
    tile_size: int | None = None,
    batch_size: int = 4,
    device: torch.device | str | None = None,
    precision: str = "float32",
) -> np.ndarray | torch.Tensor:
    """Overlap-tile prediction of a C x H x W image: K x H x W float32 logits.

    Equal (to float rounding) to one forward pass over the whole mirror-padded image. Returns
    a numpy array for numpy input, a CPU tensor for tensor input. The model is used as is
    (call `model.eval()` first for deterministic dropout-free output).
    """
    if image.ndim != 3:
        raise ValueError(f"expected a C x H x W image, got shape {tuple(image.shape)}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if tile_size is None:
        tile_size = default_tile_size(model, device, batch_size)
    plan = plan_tiles(tuple(image.shape[-2:]), model.geometry, tile_size)
    padded = mirror_pad(image, plan)
    logits = predict_padded(model, padded, plan, batch_size, device, precision)
    return logits.numpy() if isinstance(image, np.ndarray) else logits
