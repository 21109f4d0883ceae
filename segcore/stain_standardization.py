"""Per-slide stain standardisation: each slide's H, E and D concentrations moved to the
statistics a model was trained on (Reinhard et al. 2001's colour transfer, done in the
Ruifrok-Johnston HED space of `segcore.stain` instead of l-alpha-beta).

A slide's moments are the mean and standard deviation of each stain's concentration over its
tissue (`slide_stain_moments`); a pixel's concentration c of stain s becomes
(c - slide mean) / slide std * reference std + reference mean. Training standardises every
store to the mean of its training stores' moments and records that reference with the model
(`UNetConfig.stain_reference`); inference standardises each slide to the same reference.
The map is per pixel, so it commutes with tiling, mirroring and flips: an overlap-tile result
stays the whole-slide result.

Worked example (MoNuSeg, measured): a lung tile whose nuclei are pale (H mean 0.27, std 0.28
over tissue) and whose eosin is heavy (E 0.52, 0.09), moved to the training tiles' reference
(H 0.53 / 0.47, E 0.33 / 0.14): a nucleus pixel with H 0.8 becomes (0.8 - 0.27) / 0.28 * 0.47
+ 0.53 = 1.42, as dark as the training set's dark nuclei, and its eosin drops with the rest.

Written here rather than taken from a stain-normalisation library (staintools, torchstain):
those fit stain vectors per image (Macenko, Vahadane), which differs from tile to tile and so
breaks overlap-tile equality; this map has six numbers per slide and is exact per pixel.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import zarr

from segcore.stain import (
    HED_FROM_RGB,
    MIN_INTENSITY,
    RGB_FROM_HED,
    STAINS,
    StainInputError,
    stain_statistics,
)
from segcore.store import read_checked

#: Level-0 chunks read, at most, to measure a slide's moments: evenly spread over its chunk
#: grid, so a gigapixel slide costs 64 chunk reads (16 Mpx in 512 px chunks) and a small tile
#: is read whole.
MAX_SAMPLE_CHUNKS = 64


@dataclass(frozen=True)
class StainMoments:
    """Mean and standard deviation of the H, E and D concentrations over a slide's tissue."""

    h_mean: float
    h_std: float
    e_mean: float
    e_std: float
    d_mean: float
    d_std: float

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():  # plain floats: they go into checkpoints
            object.__setattr__(self, name, float(value))
        if not all(np.isfinite(v) for v in asdict(self).values()) or min(self.stds) <= 0:
            raise StainInputError(f"stain moments must be finite with positive stds: {self}")

    @classmethod
    def from_dict(cls, values: dict[str, float]) -> StainMoments:
        """From `segcore.stain.stain_statistics`'s dict (extra keys ignored) or `to_dict`'s."""
        return cls(
            **{f"{s}_{m}": float(values[f"{s}_{m}"]) for s in STAINS for m in ("mean", "std")}
        )

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @property
    def means(self) -> np.ndarray:
        return np.array([self.h_mean, self.e_mean, self.d_mean])

    @property
    def stds(self) -> np.ndarray:
        return np.array([self.h_std, self.e_std, self.d_std])


def reference_moments(slides: Sequence[StainMoments]) -> StainMoments:
    """The reference a model is trained to: the mean of its training slides' moments."""
    if not slides:
        raise StainInputError("a stain reference needs at least one slide")
    means = np.mean([s.means for s in slides], axis=0)
    stds = np.mean([s.stds for s in slides], axis=0)
    return StainMoments(means[0], stds[0], means[1], stds[1], means[2], stds[2])


def _sample_windows(shape: Sequence[int], chunks: Sequence[int]) -> Iterator[tuple[slice, ...]]:
    """Level-0 chunk windows, at most MAX_SAMPLE_CHUNKS, evenly spread in row-major order."""
    rows = range(0, shape[-2], chunks[-2])
    cols = range(0, shape[-1], chunks[-1])
    n = len(rows) * len(cols)
    picked = np.unique(np.linspace(0, n - 1, min(n, MAX_SAMPLE_CHUNKS)).round().astype(int))
    for k in picked:
        r, c = rows[k // len(cols)], cols[k % len(cols)]
        yield (slice(None), slice(r, r + chunks[-2]), slice(c, c + chunks[-1]))


def slide_stain_moments(image: zarr.Array) -> StainMoments:
    """A slide's stain moments from its level-0 image (uint8 RGB, c x y x x), read chunk by
    chunk over an even sample of at most MAX_SAMPLE_CHUNKS chunks (all of a small slide).

    Raises StainInputError when the slide is not uint8 RGB or the sample holds no tissue.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise StainInputError(f"stain standardisation needs RGB slides, got shape {image.shape}")
    windows = _sample_windows(image.shape, image.chunks)
    stats = stain_statistics(read_checked(image, window) for window in windows)
    if not stats["tissue_pixels"] or min(stats[f"{s}_std"] for s in STAINS) <= 0:
        raise StainInputError("no tissue to measure its stains on")
    return StainMoments.from_dict(stats)


def _optical_density_table() -> np.ndarray:
    """OD of each uint8 intensity, floored as `segcore.stain.rgb_to_od` floors it."""
    return -np.log(np.maximum(np.arange(256) / 255.0, MIN_INTENSITY))


#: OD bounds of the uint8 values: round(255 exp(-od)) >= v exactly when od <= -ln((v - .5) / 255),
#: so a pixel's value is how many of these bounds its OD is at or under (255 minus how many lie
#: below it); ascending, for searchsorted. Worked example: od 0 is under all 255 -> 255 (white).
_BOUNDS = -np.log((np.arange(255, 0, -1) - 0.5) / 255.0)


@dataclass(frozen=True)
class StainStandardization:
    """The map from one slide's stain moments to a reference, on uint8 RGB pixels.

    Computed with tables, adds and a search, never a vectorised exp or log: the same pixel
    gets the same value wherever it lies in whatever window, which overlap-tile equality
    needs (SIMD and scalar transcendental functions may differ in the last bit).
    """

    slide: StainMoments
    reference: StainMoments
    #: terms[k, c, v]: input channel k at value v's share of output channel c's OD.
    _terms: np.ndarray = field(init=False, repr=False, compare=False)
    _offset: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # OD -> HED, then per stain (c - m_s) / s_s * s_r + m_r, then HED -> OD: one affine map
        # od' = od @ A + b in OD space.
        scale = self.reference.stds / self.slide.stds
        shift = self.reference.means - self.slide.means * scale
        a = HED_FROM_RGB @ np.diag(scale) @ RGB_FROM_HED
        od = _optical_density_table()
        object.__setattr__(self, "_terms", a[:, :, None] * od[None, None, :])
        object.__setattr__(self, "_offset", shift @ RGB_FROM_HED)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Standardised copy of a uint8 RGB image, c x ... (channel first)."""
        if image.dtype != np.uint8 or image.shape[0] != 3:
            raise StainInputError(
                f"stain standardisation needs uint8 RGB, got {image.dtype} {image.shape}"
            )
        out = np.empty_like(image)
        for c in range(3):
            od = self._terms[0, c][image[0]] + self._terms[1, c][image[1]]
            od += self._terms[2, c][image[2]]
            od += self._offset[c]
            out[c] = 255 - np.searchsorted(_BOUNDS, od, side="left")
        return out
