"""Scribbles for the label bootstrap: a few user strokes kept with a slide as `labels/scribbles`.

The paper's extension (Kim, Kanezaki & Tanaka 2020, section III-D) guides the clustering with
strokes: a stroked pixel is pinned to its stroke's cluster (`segcore.bootstrap.scribble_loss`).
A stroke image is a one-channel integer image (PNG or TIFF, e.g. a napari labels layer saved
as a file) the size of the slide's level 0: 0 (`UNSTROKED`) where nothing is drawn, k where a
stroke pins its pixels to cluster k. So strokes of 1 on a few nuclei and of 2 on stroma,
with `nucleus=1`, tell the bootstrap what a nucleus is.

  pair      `scribble_files`: a folder of stroke images, each named after its slide store
            (`a.png` or `a.tif` for `a.zarr`), matched to the stores; a file that matches no
            store, two files for one store or an empty folder is an error, not ignored
  import    `import_scribbles`: the image streamed in bands of chunk rows into an NGFF label
            `labels/scribbles` (uint8, a full pyramid like every label), its identity the
            sha256 of the file, built in a hidden sibling and installed
            (`pipelines.storage.install`); the same file again is "skipped"
  index     `stroke_index`: per level-0 chunk and stroke value, how many pixels carry it, read
            chunk by chunk in bounded memory, so the bootstrap can centre training tiles on
            strokes of each value (`StrokeIndex.draw`) however large the slide

The bootstrap's identity holds the scribbles' identity of every store (`SCRIBBLES`), so new
strokes redo the labels and the same strokes do not.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from pipelines.location import Where, open_binary
from pipelines.sources import sha256_of
from pipelines.stage import Identity, StageOutput, StageResult, record_identity
from pipelines.storage import (
    install,
    reconsolidate,
    remove_stale_siblings,
    remove_tree,
    temporary_sibling,
)
from segcore import ngff
from segcore.bootstrap import UNSTROKED
from segcore.readers import open_labels
from segcore.store import LABELS_GROUP, SlideStore, open_group, read_checked, zarr_location

SCRIBBLES = "scribbles"
#: The scribbles' identity (the stroke file's sha256) is recorded on their label.
SCRIBBLES_OUTPUT = StageOutput(f"{LABELS_GROUP}/{SCRIBBLES}")
#: Bumped when the label written from the same file changes.
SCRIBBLES_FORMAT = 1
#: The stroke image files taken, by suffix.
STROKE_SUFFIXES = (".png", ".tif", ".tiff")
#: The largest stroke value a uint8 label holds (the clustering has at most 100 clusters by
#: default; `segcore.bootstrap` checks the values against its own count).
_MAX_STROKE = 255


class ScribblesError(ValueError):
    """Stroke images the bootstrap cannot use."""


class ScribblesResult(StageResult):
    """What importing one store's strokes did."""

    #: Stroked pixels, by stroke value.
    strokes: dict[int, int] | None = None


def scribble_files(folder: Path, stores: Sequence[Where]) -> dict[Where, Path]:
    """The stroke image in `folder` of each store that has one (`a.png` / `a.tif` for
    `a.zarr`); raises naming the file for a file matching no store or a store with two."""
    if not folder.is_dir():
        raise ScribblesError(f"{folder}: no such folder of stroke images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in STROKE_SUFFIXES)
    if not files:
        raise ScribblesError(f"{folder}: holds no stroke image ({', '.join(STROKE_SUFFIXES)})")
    by_name = {SlideStore(store).name: store for store in stores}
    pairs: dict[Where, Path] = {}
    for file in files:
        store = by_name.get(file.stem)
        if store is None:
            raise ScribblesError(
                f"{file}: matches no store (name it after one of "
                f"{', '.join(sorted(by_name)[:5])}{', ...' if len(by_name) > 5 else ''})"
            )
        if store in pairs:
            raise ScribblesError(f"{file}: {pairs[store].name} already gives strokes for {store}")
        pairs[store] = file
    return pairs


def import_scribble_folder(folder: Path, stores: Sequence[Where]) -> list[ScribblesResult]:
    """Import the stroke image of every store that has one in `folder` (`scribble_files`),
    in store order; a bad stroke image raises naming its file."""
    pairs = scribble_files(folder, stores)
    return [import_scribbles(store, pairs[store]) for store in stores if store in pairs]


def scribbles_identity(image: Where) -> Identity:
    """What a store's scribbles are made from: the stroke file's content (not its name or
    place, so a moved file with the same strokes is the same input)."""
    return Identity(
        stage=SCRIBBLES, format=SCRIBBLES_FORMAT, inputs={"file": sha256_of(image)}, settings={}
    )


def _copy_strokes(image: Where, store: SlideStore, levels: list[zarr.Array]) -> dict[int, int]:
    """Stream the stroke image into `levels[0]` in bands of chunk rows; returns the stroked
    pixels by value."""
    height, width = store.shape[1:]
    band = int(levels[0].chunks[0])
    counts = np.zeros(_MAX_STROKE + 1, dtype=np.int64)
    with open_binary(image) as fh, open_labels(str(image), file=fh) as reader:
        if tuple(reader.shape[1:]) != (height, width):
            raise ScribblesError(
                f"{image}: strokes of {reader.shape[2]} x {reader.shape[1]} px, the slide "
                f"{store.name} is {width} x {height} px (level 0)"
            )
        for y in range(0, height, band):
            rows = reader.read_region(y, 0, min(band, height - y), width)[0]
            if rows.min(initial=0) < 0 or rows.max(initial=0) > _MAX_STROKE:
                raise ScribblesError(
                    f"{image}: stroke values {rows.min()}..{rows.max()} near row {y}; strokes "
                    f"are 1..{_MAX_STROKE} (0 = no stroke)"
                )
            rows = rows.astype(np.uint8)
            counts += np.bincount(rows.ravel(), minlength=_MAX_STROKE + 1)
            ngff.writable(levels[0])[y : y + rows.shape[0]] = rows
    strokes = {v: int(n) for v, n in enumerate(counts) if n and v != UNSTROKED}
    if not strokes:
        raise ScribblesError(f"{image}: holds no stroke (every pixel is {UNSTROKED})")
    return strokes


def import_scribbles(store: Where, image: Where) -> ScribblesResult:
    """Write the stroke image `image` into `store` as `labels/scribbles` (module docstring);
    "skipped" when the store holds strokes from the same file content already."""
    start = time.perf_counter()
    identity = scribbles_identity(image)
    if SCRIBBLES_OUTPUT.is_current(store, identity):
        return ScribblesResult(store=store, status="skipped", identity=identity.key, seconds=0.0)
    slide = SlideStore.open(store)
    chunk = int(slide.image(0).chunks[-1])
    final = store / LABELS_GROUP / SCRIBBLES
    remove_stale_siblings(final)
    work = temporary_sibling(final)
    try:
        root = zarr.open_group(zarr_location(work, read_only=False), mode="w", zarr_format=3)
        levels = ngff.create_label(
            root, SCRIBBLES, tuple(slide.shape[1:]), np.uint8, slide.n_levels, chunk,
            mpp=slide.metadata.get("mpp"),
        )  # fmt: skip
        strokes = _copy_strokes(image, slide, levels)
        # Nearest keeps stroke values (a mean would invent strokes between two of them).
        for src, dst in zip(levels, levels[1:], strict=False):
            for region in ngff.level_regions(dst.shape, chunk):
                ngff.downsample_region(src, dst, region, "nearest")
        group = open_group(work / LABELS_GROUP / SCRIBBLES, mode="r+")
        record_identity(group, identity, {"source": str(image), "strokes": strokes})
        install(work / LABELS_GROUP / SCRIBBLES, final)
        ngff.list_labels(open_group(store / LABELS_GROUP, mode="r+"), [SCRIBBLES])
    finally:
        remove_tree(work)
    reconsolidate(store)
    return ScribblesResult(
        store=store,
        status="written",
        identity=identity.key,
        seconds=time.perf_counter() - start,
        strokes=strokes,
    )


@dataclass(frozen=True)
class StrokeIndex:
    """Where a store's strokes are, chunk by chunk: `counts[v][i, j]` pixels of stroke value
    v in level-0 chunk (i, j) of `chunk` px."""

    labels: zarr.Array
    counts: dict[int, np.ndarray]
    chunk: int

    @property
    def largest(self) -> int:
        return max(self.counts)

    def total(self, value: int) -> int:
        """Pixels of stroke value `value`."""
        return int(self.counts[value].sum()) if value in self.counts else 0

    def draw(self, value: int, rng: np.random.Generator) -> tuple[int, int]:
        """A pixel (y, x) of stroke value `value`, each equally likely: a chunk drawn by its
        count, then one of its pixels of that value."""
        counts = self.counts[value]
        cell = int(rng.choice(counts.size, p=(counts / counts.sum()).ravel()))
        i, j = divmod(cell, counts.shape[1])
        y0, x0 = i * self.chunk, j * self.chunk
        block = read_checked(self.labels, (slice(y0, y0 + self.chunk), slice(x0, x0 + self.chunk)))
        ys, xs = np.nonzero(block == value)
        k = int(rng.integers(len(ys)))
        return y0 + int(ys[k]), x0 + int(xs[k])

    def window(self, y0: int, x0: int, side: int) -> np.ndarray:
        """The strokes of the `side` px square at (y0, x0)."""
        return read_checked(self.labels, (slice(y0, y0 + side), slice(x0, x0 + side)))


def scribbles_key(store: Where) -> str | None:
    """The identity key of the store's scribbles, or None when it has none. Strokes placed by
    another tool (no segflow identity on the label) are refused: the bootstrap could not tell
    when they change."""
    key = SCRIBBLES_OUTPUT.recorded_key(store)
    if key is not None:
        return key
    try:
        open_group(SCRIBBLES_OUTPUT.node(store), mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return None
    raise ScribblesError(
        f"{store}: labels/{SCRIBBLES} was not imported by segflow; save the strokes as an "
        "image and give it with `segflow bootstrap --scribbles FOLDER`"
    )


def recorded_strokes(store: Where) -> dict[int, int] | None:
    """Pixels per stroke value of the store's scribbles as recorded at import, or None when
    it has none (`scribbles_key`)."""
    if scribbles_key(store) is None:
        return None
    attrs = open_group(SCRIBBLES_OUTPUT.node(store), mode="r").attrs["segflow"]
    return {int(value): int(n) for value, n in attrs["strokes"].items()}


def stroke_index(store: Where) -> StrokeIndex | None:
    """The store's `StrokeIndex`, or None when it has no scribbles (`scribbles_key`)."""
    if scribbles_key(store) is None:
        return None
    labels = open_group(SCRIBBLES_OUTPUT.node(store), mode="r")["0"]
    chunk = int(labels.chunks[0])
    rows, cols = (-(-n // chunk) for n in labels.shape)
    counts = np.zeros((_MAX_STROKE + 1, rows, cols), dtype=np.int64)
    for i in range(rows):
        for j in range(cols):
            block = read_checked(
                labels, (slice(i * chunk, (i + 1) * chunk), slice(j * chunk, (j + 1) * chunk))
            )
            counts[:, i, j] = np.bincount(block.ravel(), minlength=_MAX_STROKE + 1)
    values = [v for v in range(1, _MAX_STROKE + 1) if counts[v].any()]
    return StrokeIndex(labels, {v: counts[v] for v in values}, chunk)
