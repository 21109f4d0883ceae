"""Unsupervised segmentation by differentiable feature clustering: labels for unlabelled slides.

The method of Kim, Kanezaki & Tanaka, "Unsupervised Learning of Image Segmentation Based on
Differentiable Feature Clustering", IEEE TIP 29, 2020 (arXiv:2007.09990), the extension of
Kanezaki, ICASSP 2018. A small fully convolutional network maps an image to a response map of
q channels; the argmax over channels is each pixel's cluster. The network is trained on the
image itself, with its own argmax as the target:

    network    M blocks of (3x3 conv to p channels, ReLU, batch norm), then a 1x1 conv to q
               channels and batch norm (the normalisation makes the argmax usable as a label)
    loss       L = L_sim + mu * L_con (+ nu * L_scr with scribbles)
    L_sim      cross-entropy between the response r and its own argmax c = argmax_q r
               (`similarity_loss`): pixels of similar features are pulled into one cluster
    L_con      mean |r(y+1, x) - r(y, x)| + mean |r(y, x+1) - r(y, x)|, the L1 norm of the
               response's vertical and horizontal differences (`continuity_loss`): neighbours
               are pulled into one cluster
    L_scr      cross-entropy on the stroked pixels towards their stroke's cluster
               (`scribble_loss`); L_sim then covers only the unstroked pixels
    optimiser  SGD, lr 0.1, momentum 0.9
    stop       when the number of distinct labels falls to `min_labels` (the network starts
               with about q and merges clusters as it trains), or after `max_iterations`

Defaults (`ClusteringConfig`) are the paper's: p = q = 100, mu = 5 (the reference
implementation, kanezaki/pytorch-unsupervised-segmentation-tip demo.py, defaults to
`--stepsize_con 1`; `continuity_weight` sets it), nu = 0.5 (the reference implementation's
scribble weight, whose strokes mark "no stroke" with 255 where segflow uses 0), lr 0.1,
momentum 0.9, T = 1000 iterations, M = 2 and a minimum of 3 labels (the reference
implementation's `--nConv 2`, `--minLabels 3`). With scribbles the minimum becomes the number
of distinct strokes, as there.

Deviations, each for running the network slide by slide rather than on one photograph:
  - inputs are standardised per channel (mean and standard deviation of the training pixels,
    kept in the network as buffers) instead of divided by 255, so 8-bit H&E and 12-bit
    fluorescence reach the first conv on one scale;
  - one network is trained on a batch of tiles (`batch_size` drawn per iteration from the
    tiles given, seeded), as in the paper's extension to unseen images, so that a cluster id
    means the same thing on every slide;
  - with scribbles, a batch ends training only when it holds every stroke value and the
    pixels of each lie in that stroke's cluster (`STROKE_AGREEMENT`) besides showing few
    enough labels: the paper trains on its one image, strokes and all, at every iteration,
    while a batch of tiles may lack a stroke the network has not learned yet (measured: on a
    synthetic slide, a batch without the stroma stroke stopped training at iteration 20 with
    that stroke's pixels in cluster 15, not 2);
  - after training, the batch-norm statistics are recomputed over all training tiles
    (`calibrate_batch_norm`) and the network is applied in eval mode: the response of a pixel
    then depends only on its 2M+1 neighbourhood, so a slide clustered chunk by chunk with a
    halo of M px (`receptive_halo`) equals the whole slide clustered at once
    (`predict_clusters`). The paper predicts with the training batch's own statistics, which
    would make a pixel's label depend on the chunk it falls in.

Worked example: a 2-block network looks 2 px around each pixel (two 3x3 convs, 5x5
receptive field), so a 512 px block of a slide reads 516 x 516 px (2 px each side, clipped at
the slide's edge, where zero padding applies as it would to the whole slide).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

#: The share of each stroke value's pixels in a batch whose cluster must be that value before
#: the label count may end training (see the deviations above).
STROKE_AGREEMENT = 0.95
#: A pixel of a scribble image without a stroke; a stroke of value k pins its pixels to
#: cluster k (so strokes 1 = nucleus, 2 = background make the mapping `nucleus=1`).
UNSTROKED = 0


class ClusteringError(ValueError):
    """Images, scribbles or settings the clustering cannot work with."""


class ClusteringConfig(BaseModel):
    """Settings of the clustering network and its training (Kim, Kanezaki & Tanaka 2020)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: M, the number of 3x3 conv + ReLU + batch-norm blocks (the reference code's 2).
    n_blocks: int = Field(default=2, ge=1)
    #: p, the feature channels of each 3x3 conv.
    channels: int = Field(default=100, ge=1)
    #: q, the channels of the response map: the most clusters there can be (ids fit uint8).
    n_clusters: int = Field(default=100, ge=2, le=255)
    #: mu, the weight of the spatial-continuity loss.
    continuity_weight: float = Field(default=5.0, ge=0)
    #: nu, the weight of the scribble loss (only with scribbles).
    scribble_weight: float = Field(default=0.5, ge=0)
    lr: float = Field(default=0.1, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    #: T, the most training iterations.
    max_iterations: int = Field(default=1000, ge=1)
    #: Training stops once the labels of an iteration's batch number this many or fewer.
    min_labels: int = Field(default=3, ge=1)
    #: Tiles per iteration, drawn from the training tiles (all of them when there are fewer).
    batch_size: int = Field(default=8, ge=1)
    seed: int = 0


class ClusteringNetwork(nn.Module):
    """M x (3x3 conv, ReLU, batch norm), then 1x1 conv and batch norm to q response channels,
    on inputs standardised with the training pixels' per-channel mean and deviation."""

    def __init__(self, in_channels: int, config: ClusteringConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_channels
        for _ in range(config.n_blocks):
            layers += [
                nn.Conv2d(width, config.channels, kernel_size=3, padding=1),
                nn.ReLU(),
                nn.BatchNorm2d(config.channels),
            ]
            width = config.channels
        layers += [
            nn.Conv2d(width, config.n_clusters, kernel_size=1),
            nn.BatchNorm2d(config.n_clusters),
        ]
        self.layers = nn.Sequential(*layers)
        self.register_buffer("mean", torch.zeros(in_channels))
        self.register_buffer("std", torch.ones(in_channels))

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) raw pixel values -> (N, q, H, W) response."""
        x = (x - self.mean[:, None, None]) / self.std[:, None, None]
        return self.layers(x)


def receptive_halo(config: ClusteringConfig) -> int:
    """Pixels of context each side a pixel's cluster depends on: one per 3x3 conv."""
    return config.n_blocks


def similarity_loss(response: Tensor, mask: Tensor | None = None) -> Tensor:
    """Cross-entropy between `response` (N, q, H, W) and its own argmax, over the pixels of
    `mask` (N, H, W bool) or all. The target carries no gradient (it is an argmax)."""
    target = response.argmax(dim=1)
    if mask is None:
        return F.cross_entropy(response, target)
    return F.cross_entropy(response.permute(0, 2, 3, 1)[mask], target[mask])


def continuity_loss(response: Tensor) -> Tensor:
    """Mean absolute vertical plus mean absolute horizontal difference of `response`
    (N, q, H, W). A response constant in space scores 0; the one-channel 2 x 2 map
    [[0, h], [0, h]] scores 0 (no vertical change) + h (both rows step by h)."""
    vertical = (response[:, :, 1:, :] - response[:, :, :-1, :]).abs().mean()
    horizontal = (response[:, :, :, 1:] - response[:, :, :, :-1]).abs().mean()
    return vertical + horizontal


def scribble_loss(response: Tensor, scribbles: Tensor) -> Tensor:
    """Cross-entropy of the stroked pixels of `scribbles` (N, H, W, int; `UNSTROKED` elsewhere)
    towards the cluster their stroke names, averaged per stroke value and then over values;
    0 for a batch without strokes (a mean over no
    pixels would be NaN)."""
    stroked = scribbles != UNSTROKED
    if not stroked.any():
        return response.sum() * 0.0
    pixels, targets = response.permute(0, 2, 3, 1)[stroked], scribbles[stroked].long()
    per_pixel = F.cross_entropy(pixels, targets, reduction="none")
    # The mean of each stroke value's mean, so a dab on stroma weighs as much as long strokes
    # over many nuclei (the paper's one mean lets the larger stroke drown the smaller).
    values, value_of = torch.unique(targets, return_inverse=True)
    sums = torch.zeros(len(values), device=per_pixel.device).index_add_(0, value_of, per_pixel)
    counts = torch.bincount(value_of, minlength=len(values))
    return (sums / counts).mean()


def clustering_loss(
    response: Tensor, config: ClusteringConfig, scribbles: Tensor | None = None
) -> Tensor:
    """L_sim + mu L_con, plus nu L_scr with L_sim on the unstroked pixels when `scribbles`."""
    continuity = config.continuity_weight * continuity_loss(response)
    if scribbles is None:
        return similarity_loss(response) + continuity
    unstroked = scribbles == UNSTROKED
    similarity = similarity_loss(response, unstroked) if unstroked.any() else 0.0
    return similarity + config.scribble_weight * scribble_loss(response, scribbles) + continuity


@dataclass
class ClusteringRun:
    """A trained network (eval mode, batch norm calibrated) and how its training went."""

    network: ClusteringNetwork
    losses: list[float] = field(default_factory=list)
    #: Distinct labels in each iteration's batch, before its update.
    label_counts: list[int] = field(default_factory=list)

    @property
    def iterations(self) -> int:
        return len(self.losses)


def _check_tiles(tiles: np.ndarray, scribbles: np.ndarray | None, config: ClusteringConfig) -> None:
    if tiles.ndim != 4 or 0 in tiles.shape:
        raise ClusteringError(
            f"training tiles must be a non-empty (N, C, H, W) array, got {tiles.shape}"
        )
    if scribbles is None:
        return
    wanted = (tiles.shape[0], *tiles.shape[2:])
    if scribbles.shape != wanted:
        raise ClusteringError(f"scribbles have shape {scribbles.shape}, the tiles need {wanted}")
    top = int(scribbles.max(initial=0))
    if scribbles.min(initial=0) < 0 or top >= config.n_clusters:
        raise ClusteringError(
            f"scribble values must lie in 0..{config.n_clusters - 1} (0 = no stroke), "
            f"got up to {top}"
        )
    if top == UNSTROKED:
        raise ClusteringError("scribbles hold no stroke")


def _new_network(tiles: np.ndarray, config: ClusteringConfig) -> ClusteringNetwork:
    """A network initialised from `config.seed` (without touching torch's global generator),
    standardising with the tiles' per-channel statistics."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        network = ClusteringNetwork(tiles.shape[1], config)
    pixels = tiles.astype(np.float64)
    network.mean.copy_(torch.from_numpy(pixels.mean(axis=(0, 2, 3))))
    # A constant channel (a blank tile set) keeps unit scale rather than dividing by zero.
    network.std.copy_(torch.from_numpy(np.maximum(pixels.std(axis=(0, 2, 3)), 1e-6)))
    return network


def fit_clustering(
    tiles: np.ndarray,
    config: ClusteringConfig | None = None,
    scribbles: np.ndarray | None = None,
    device: str | torch.device = "cpu",
    on_iteration: Callable[[int, float, int], None] | None = None,
) -> ClusteringRun:
    """Train a clustering network on `tiles` (N, C, H, W raw pixels, any numeric dtype):
    every iteration draws `config.batch_size` tiles (seeded), takes one SGD step on their
    loss, and training ends once a batch shows `min_labels` distinct labels or fewer (with
    `scribbles` (N, H, W), the number of distinct strokes, and only on a batch that holds
    every stroke and agrees with them, `strokes_learned`), or after `max_iterations`.

    `on_iteration(iteration, loss, labels)` is called after each step (for progress, tracking).
    The same tiles, config and device give the same network.
    """
    config = config or ClusteringConfig()
    tiles = np.asarray(tiles)
    _check_tiles(tiles, scribbles, config)
    min_labels = config.min_labels
    if scribbles is not None:
        stroke_values = np.unique(scribbles[scribbles != UNSTROKED])
        min_labels = len(stroke_values)
    device = torch.device(device)
    network = _new_network(tiles, config).to(device)
    optimizer = torch.optim.SGD(network.parameters(), lr=config.lr, momentum=config.momentum)
    rng = np.random.default_rng(config.seed)
    pixels = torch.from_numpy(tiles.astype(np.float32))
    strokes = torch.from_numpy(scribbles.astype(np.int64)) if scribbles is not None else None
    run = ClusteringRun(network)
    network.train()
    for iteration in range(config.max_iterations):
        batch = _batch(rng, len(tiles), config.batch_size)
        response = network(pixels[batch].to(device))
        clusters = response.argmax(dim=1)
        labels = int(torch.unique(clusters).numel())
        target = strokes[batch].to(device) if strokes is not None else None
        loss = clustering_loss(response, config, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        run.losses.append(float(loss.detach()))
        run.label_counts.append(labels)
        if on_iteration is not None:
            on_iteration(iteration, run.losses[-1], labels)
        if labels <= min_labels and (
            target is None or strokes_learned(clusters, target, len(stroke_values))
        ):
            break
    calibrate_batch_norm(network, pixels, config.batch_size)
    network.eval()
    return run


def strokes_learned(clusters: Tensor, strokes: Tensor, n_values: int) -> bool:
    """Whether a batch (clusters and strokes, N, H, W) holds all `n_values` stroke values and,
    of each value, at least `STROKE_AGREEMENT` of its pixels lie in that value's cluster (per
    value: a small stroke must not hide behind a large one)."""
    values = torch.unique(strokes[strokes != UNSTROKED])
    if int(values.numel()) < n_values:
        return False
    return all(
        float((clusters[strokes == v] == v).float().mean()) >= STROKE_AGREEMENT for v in values
    )


def _batch(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Indices of one iteration's tiles: all of them in order when there are at most `size`."""
    if n <= size:
        return np.arange(n)
    return np.sort(rng.choice(n, size=size, replace=False))


@torch.no_grad()
def calibrate_batch_norm(network: ClusteringNetwork, pixels: Tensor, batch_size: int) -> None:
    """Set every batch norm's running mean and variance to their averages over `pixels`
    (N, C, H, W) in batches of `batch_size` (cumulative averaging: momentum None), so eval
    mode normalises as training saw the tiles on average."""
    norms = [m for m in network.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    device = network.mean.device
    network.train()
    for start in range(0, len(pixels), batch_size):
        network(pixels[start : start + batch_size].to(device))
    network.eval()


@torch.no_grad()
def predict_clusters(network: ClusteringNetwork, image: np.ndarray, tile: int = 512) -> np.ndarray:
    """Cluster ids (H, W uint8) of `image` (C, H, W raw pixels) by a network in eval mode,
    computed in tiles of `tile` px each read with `receptive_halo` px of context (clipped at
    the image's edge), so the result equals the whole image's at any `tile`."""
    if network.training:
        raise ClusteringError(
            "predict with a trained network in eval mode (fit_clustering returns one)"
        )
    if image.ndim != 3 or image.shape[0] != network.mean.numel():
        raise ClusteringError(
            f"image must be ({network.mean.numel()}, H, W) for this network, got {image.shape}"
        )
    halo = sum(1 for m in network.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
    device = network.mean.device
    height, width = image.shape[1:]
    out = np.empty((height, width), dtype=np.uint8)
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            y0, x0 = max(y - halo, 0), max(x - halo, 0)
            y1, x1 = min(y + tile + halo, height), min(x + tile + halo, width)
            block = torch.from_numpy(image[:, y0:y1, x0:x1].astype(np.float32))[None].to(device)
            clusters = network(block)[0].argmax(dim=0).cpu().numpy()
            ty, tx = min(tile, height - y), min(tile, width - x)
            out[y : y + ty, x : x + tx] = clusters[y - y0 : y - y0 + ty, x - x0 : x - x0 + tx]
    return out
