"""One block on a worker: read its input with context, run its tiles, write its own chunks."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import zarr
from distributed import get_worker

from pipelines.inference.model import ModelPlugin
from pipelines.inference.plan import Block
from pipelines.location import Where
from pipelines.storage import write_file
from segcore.ngff import writable
from segcore.separation import foreground_classes
from segcore.stain_standardization import StainStandardization
from segcore.store import StoreError, read_checked, zarr_location
from segcore.tiling import TilePlan, predict_padded

ProbabilityFormat = Literal["uint8", "float16"]


@dataclass(frozen=True)
class BlockJob:
    """Everything a worker needs for one block; locations (local paths, or object-storage
    URLs with the settings to reach them), so it pickles small."""

    plugin: str
    block: Block
    slide_shape: tuple[int, int]
    image: Where
    tissue: Where | None
    tissue_downsample: int
    segmentation: Where
    probabilities: Where | None
    probability_format: ProbabilityFormat | None
    marker: Where
    batch_size: int
    precision: str
    skip_background: bool
    #: Foreground where P(not background) exceeds it (segcore.separation.foreground_classes);
    #: None: argmax.
    foreground_threshold: float | None = None
    #: The slide's stain standardisation, for a model trained with one (UNetConfig.stain_reference).
    stain: StainStandardization | None = None


def _open(where: Where, mode: str) -> zarr.Array:
    return zarr.open_array(zarr_location(where, read_only=mode == "r"), mode=mode)


def has_tissue(job: BlockJob) -> bool:
    """Whether the block or its margin touches tissue (always true without a tissue mask)."""
    if job.tissue is None:
        return True
    mask = _open(job.tissue, "r")
    d, m, b = job.tissue_downsample, job.block.tiles.margin, job.block
    rows = slice(max(0, (b.y0 - m) // d), min(mask.shape[0], -(-(b.y1 + m) // d)))
    cols = slice(max(0, (b.x0 - m) // d), min(mask.shape[1], -(-(b.x1 + m) // d)))
    return bool(read_checked(mask, (rows, cols)).any())


@dataclass(frozen=True)
class _SourceWindow:
    """A block's source pixels, read once: every pass of the block (one, or one per
    orientation) gathers its mirrored input from them."""

    pixels: np.ndarray
    r0: int
    c0: int

    def gather(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return self.pixels[:, rows - self.r0][:, :, cols - self.c0]


def _read_window(job: BlockJob, indices: list[tuple[np.ndarray, np.ndarray]]) -> _SourceWindow:
    """The bounding window of every (rows, cols) pair of mirrored index vectors in `indices`:
    one contiguous read, stain-standardised where the job says (a per-pixel map, so done once
    for all the passes that gather from it)."""
    r0 = min(int(rows.min()) for rows, _ in indices)
    r1 = max(int(rows.max()) for rows, _ in indices) + 1
    c0 = min(int(cols.min()) for _, cols in indices)
    c1 = max(int(cols.max()) for _, cols in indices) + 1
    window = read_checked(_open(job.image, "r"), (slice(None), slice(r0, r1), slice(c0, c1)))
    if job.stain is not None:
        window = job.stain(window)
    return _SourceWindow(window, r0, c0)


def _predict(job: BlockJob, runner: ModelPlugin) -> tuple[torch.Tensor, bool]:
    """The block's K x H x W scores: logits of the plain pass, or (`True`) the probabilities
    averaged over the orientations of its views, each view an exact overlap-tile pass."""

    def run(pixels: np.ndarray, tiles: TilePlan) -> torch.Tensor:
        # Raw uint8 pixels: exported models fold their training normalisation into the first
        # convolution (pipelines.models), and predict_padded casts each batch to float32, so
        # the block is never held as float.
        with runner.lock:
            return predict_padded(
                runner.model,
                torch.from_numpy(np.ascontiguousarray(pixels)).to(runner.device, non_blocking=True),
                tiles,
                batch_size=job.batch_size,
                device=runner.device,
                precision=job.precision,
            )

    if not job.block.views:
        indices = job.block.input_indices(job.slide_shape)
        return run(_read_window(job, [indices]).gather(*indices), job.block.tiles), False
    # Each orientation's padded input: its source rows and columns gathered (and transposed
    # when the orientation transposes), all from one read.
    sources = [view.source_indices(job.slide_shape) for view in job.block.views]
    window = _read_window(job, sources)
    total = None
    for view, indices in zip(job.block.views, sources, strict=True):
        pixels = window.gather(*indices)
        if view.orientation.transpose:
            pixels = pixels.transpose(0, 2, 1)
        probabilities = torch.softmax(run(pixels, view.tiles)[:, *view.crop], dim=0)
        probabilities = view.orientation.invert(probabilities)
        total = probabilities if total is None else total.add_(probabilities)
    return total.div_(len(job.block.views)), True


def _probabilities(scores: torch.Tensor, fmt: ProbabilityFormat, averaged: bool) -> np.ndarray:
    p = scores if averaged else torch.softmax(scores, dim=0)
    if fmt == "uint8":
        return p.mul_(255.0).round_().to(torch.uint8).cpu().numpy()
    return p.to(torch.float16).cpu().numpy()


class BlockError(RuntimeError):
    """A block failed; the message names the block and its region."""


def run_block(job: BlockJob) -> dict:
    """Compute and write one block, then its done-marker; returns the marker's contents."""
    try:
        return _run_block(job)
    except Exception as exc:
        b = job.block
        # A StoreError names its array and chunk already; its type adds nothing.
        reason = str(exc) if isinstance(exc, StoreError) else f"{type(exc).__name__}: {exc}"
        raise BlockError(
            f"block {b.name} (rows {b.y0}:{b.y1}, columns {b.x0}:{b.x1}) failed: {reason}"
        ) from exc


def _run_block(job: BlockJob) -> dict:
    start = time.perf_counter()
    runner: ModelPlugin = get_worker().plugins[job.plugin]
    n_classes = runner.unet.config.n_classes
    area = (job.block.y1 - job.block.y0) * (job.block.x1 - job.block.x0)
    if job.skip_background and not has_tissue(job):
        # Written as zeros all the same: every chunk of a segflow array is stored, so one
        # missing later is damage, not background (segcore.ngff); zeros compress to nothing.
        segmentation = writable(_open(job.segmentation, "r+"))
        segmentation[job.block.region] = 0
        if job.probabilities is not None:
            probs = writable(_open(job.probabilities, "r+"))
            probs[(slice(None), *job.block.region)] = 0
        outcome = {"status": "background", "class_counts": [area] + [0] * (n_classes - 1)}
    else:
        scores, averaged = _predict(job, runner)
        if job.foreground_threshold is None:
            # max(0).indices: the same first-maximum rule as argmax(0), which is 8x slower.
            classes = scores.max(0).indices.to(torch.uint8).cpu().numpy()
        else:
            p = scores if averaged else torch.softmax(scores, dim=0)
            classes = foreground_classes(p.cpu().numpy(), job.foreground_threshold)
        writable(_open(job.segmentation, "r+"))[job.block.region] = classes
        if job.probabilities is not None:
            probs = writable(_open(job.probabilities, "r+"))
            probs[(slice(None), *job.block.region)] = _probabilities(
                scores, job.probability_format, averaged
            )
        counts = np.bincount(classes.ravel(), minlength=n_classes)
        outcome = {"status": "computed", "class_counts": counts.tolist()}
    outcome["seconds"] = time.perf_counter() - start
    write_file(job.marker, json.dumps(outcome))
    return outcome
