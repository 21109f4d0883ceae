"""Slide and label readers: one interface over OpenSlide, tifffile and Pillow.

`open_slide(path, page)` picks the backend by content first, then by extension:
  - OpenSlide for its vendor formats (.svs, .ndpi, .mrxs, .scn, .vms, .vmu, .bif, .svslide) and
    for TIFFs that OpenSlide recognises as a vendor format (Philips, Ventana, ...);
  - tifffile for other TIFFs (generic tiled/pyramidal, OME-TIFF, ImageJ, multi-page stacks),
    read lazily tile by tile through `TiffFile.aszarr`, so a huge TIFF is never loaded whole;
  - Pillow for PNG and JPEG, which cannot be decoded by region and are read whole.
Every reader returns regions as (C, h, w) arrays at full resolution; RGBA is composited over
white. Errors are `ReaderError`s whose message starts with the file path.

A slide that is not a local file (one on object storage) is read from an open binary file:
`open_slide("s3://lab/a.tif", file=fh)` reads a TIFF through tifffile, tile by tile, and a PNG
through Pillow, `path` only naming it (in messages, and by its extension). OpenSlide reads
local files only: `needs_local_file(path, fh)` says when a slide must be copied first (an
OpenSlide extension, or a TIFF that tifffile recognises as a vendor format).
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import IO

import numpy as np
import openslide
import tifffile
import zarr
from PIL import Image, UnidentifiedImageError

from segcore.errors import one_line

OPENSLIDE_SUFFIXES = frozenset(
    {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide"}
)
TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
PILLOW_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
SUPPORTED_SUFFIXES = OPENSLIDE_SUFFIXES | TIFF_SUFFIXES | PILLOW_SUFFIXES

#: OpenSlide's tile cache per open slide; its default (32 MiB per handle) adds up in every
#: worker, and ingestion reads each tile once, so a small cache loses nothing.
OPENSLIDE_CACHE_BYTES = 8 << 20

#: Axes tifffile uses for stacked planes (pages) rather than channels or space.
_STACK_AXES = frozenset("IZTQRE")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


class ReaderError(ValueError):
    """A slide or label file cannot be read; the message starts with the file path."""


class SlideReader(ABC):
    """Region access to one image: `.shape` (C, H, W), `.dtype`, `.mpp` (µm/px or None)."""

    #: False when a region cannot be decoded without decoding the whole image (PNG, JPEG).
    lazy: bool = True

    def __init__(self, path: str | Path, page: int | None) -> None:
        self.path = path
        self.page = page
        self.shape: tuple[int, int, int] = (0, 0, 0)
        self.dtype: np.dtype = np.dtype(np.uint8)
        self.mpp: float | None = None

    def read_region(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Pixels [y, y+h) x [x, x+w) of level 0 as a (C, h, w) array."""
        _, height, width = self.shape
        if h <= 0 or w <= 0 or y < 0 or x < 0 or y + h > height or x + w > width:
            raise ReaderError(
                f"{self.path}: region y={y} x={x} h={h} w={w} is outside the image "
                f"({height} x {width})"
            )
        try:
            region = self._read(y, x, h, w)
        except ReaderError:
            raise
        except Exception as exc:  # any backend failure (truncated tile, decoder error)
            raise ReaderError(
                f"{self.path}: cannot read region y={y} x={x} h={h} w={w}: {one_line(exc, 300)}"
            ) from exc
        return region

    @abstractmethod
    def _read(self, y: int, x: int, h: int, w: int) -> np.ndarray: ...

    @abstractmethod
    def close(self) -> None:
        """Release the file handle."""

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def composite_over_white(rgba: np.ndarray) -> np.ndarray:
    """(..., C+1) straight-alpha pixels -> (..., C) over a white background, uint8."""
    color, alpha = rgba[..., :-1], rgba[..., -1:]
    if alpha.min() == 255:
        return np.ascontiguousarray(color)
    a = alpha.astype(np.uint32)
    blended = (color.astype(np.uint32) * a + 255 * (255 - a) + 127) // 255
    return blended.astype(np.uint8)


class OpenSlideReader(SlideReader):
    """Whole-slide formats through OpenSlide; level 0 only (segflow builds its own pyramid)."""

    def __init__(self, path: Path, cache_bytes: int = OPENSLIDE_CACHE_BYTES) -> None:
        super().__init__(path, None)
        if _magic(path).startswith(_TIFF_MAGIC):
            # OpenSlide reads a truncated TIFF-based slide until it reaches a missing tile.
            with _open_tiff(path) as tif:
                _check_extents(path, tif, list(tif.pages))
        try:
            self._slide = openslide.OpenSlide(path)
        except (openslide.OpenSlideError, OSError) as exc:
            raise ReaderError(
                f"{path}: cannot open slide ({one_line(exc, 300)}): "
                "unsupported, truncated or corrupt"
            ) from exc
        self._slide.set_cache(openslide.OpenSlideCache(cache_bytes))
        width, height = self._slide.dimensions
        self.shape = (3, height, width)
        props = self._slide.properties
        mpp = [props.get(openslide.PROPERTY_NAME_MPP_Y), props.get(openslide.PROPERTY_NAME_MPP_X)]
        self.mpp = float(np.mean([float(v) for v in mpp])) if all(mpp) else None

    def _read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        rgba = np.asarray(self._slide.read_region((x, y), 0, (w, h)))
        return np.moveaxis(composite_over_white(rgba), -1, 0)

    def close(self) -> None:
        self._slide.close()


@contextmanager
def _tifffile_problems() -> Iterator[list[str]]:
    """Collect what tifffile logs for this thread: it reports a cut-off IFD chain (a truncated
    file) only as a log message, never as an exception."""
    problems: list[str] = []
    ident = threading.get_ident()

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.thread == ident and record.levelno >= logging.WARNING:
                problems.append(record.getMessage())

    handler = _Collect()
    logger = logging.getLogger("tifffile")
    logger.addHandler(handler)
    try:
        yield problems
    finally:
        logger.removeHandler(handler)


def _tiff_mpp(tif: tifffile.TiffFile, page: tifffile.TiffPage) -> float | None:
    """µm/px from OME PhysicalSizeX/Y, ImageJ micron units or centimetre resolution tags."""
    if tif.is_ome and tif.ome_metadata:
        pixels = tifffile.xml2dict(tif.ome_metadata).get("OME", {}).get("Image", {})
        pixels = (pixels[0] if isinstance(pixels, list) else pixels).get("Pixels", {})
        sizes = [pixels.get("PhysicalSizeY"), pixels.get("PhysicalSizeX")]
        units = {pixels.get("PhysicalSizeXUnit", "µm"), pixels.get("PhysicalSizeYUnit", "µm")}
        to_um = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}
        if all(sizes) and len(units) == 1 and units <= to_um.keys():
            return float(np.mean([float(s) for s in sizes])) * to_um[units.pop()]
    tags = page.tags
    if "XResolution" not in tags or "YResolution" not in tags:
        return None
    ppu = [tags[k].value[0] / tags[k].value[1] for k in ("YResolution", "XResolution")]
    if min(ppu) <= 0:
        return None
    unit = tags["ResolutionUnit"].value if "ResolutionUnit" in tags else 2
    if tif.is_imagej and (tif.imagej_metadata or {}).get("unit") in ("micron", "µm", "um"):
        return float(np.mean([1.0 / p for p in ppu]))
    if unit == 3:  # centimetre
        return float(np.mean([1e4 / p for p in ppu]))
    # Inch resolutions of a few hundred dpi are screen/print defaults (72, 96, 300), not optics.
    if unit == 2 and min(ppu) > 1000:
        return float(np.mean([25400.0 / p for p in ppu]))
    return None


def _check_extents(path: Path, tif: tifffile.TiffFile, pages: list) -> None:
    """Raise if image data of `pages` lies beyond the end of the file (a truncated copy)."""
    size = tif.filehandle.size
    for page in pages:
        if page is None:
            raise ReaderError(f"{path}: truncated or corrupt TIFF (missing page)")
        spans = zip(page.dataoffsets, page.databytecounts, strict=True)
        end = max((offset + count for offset, count in spans), default=0)
        if end > size:
            raise ReaderError(
                f"{path}: truncated TIFF (image data ends at byte {end}, the file has {size})"
            )


def _open_tiff(path: str | Path, file: IO[bytes] | None = None) -> tifffile.TiffFile:
    """TiffFile (of `file` when given) with its whole IFD chain indexed; raises if the chain
    is cut off or empty."""
    with _tifffile_problems() as problems:
        try:
            tif = tifffile.TiffFile(path if file is None else file)
            n_pages = len(tif.pages)
        except Exception as exc:
            raise ReaderError(f"{path}: not a readable TIFF ({one_line(exc, 300)})") from exc
    if n_pages == 0 or problems:
        tif.close()
        detail = problems[0] if problems else "no image directory"
        raise ReaderError(f"{path}: truncated or corrupt TIFF ({detail})")
    return tif


def _stack_size(series: tifffile.TiffPageSeries) -> int:
    """Number of 2-D planes in a series stacked along I/Z/T/Q axes (1 for a single image)."""
    extents = zip(series.axes, series.shape, strict=True)
    return int(np.prod([n for axis, n in extents if axis in _STACK_AXES]))


class TiffReader(SlideReader):
    """TIFF, OME-TIFF and TIFF stacks through tifffile's Zarr view: only the tiles (or strips)
    a region touches are decoded."""

    def __init__(self, path: str | Path, page: int | None, file: IO[bytes] | None = None) -> None:
        super().__init__(path, page)
        self._tif = _open_tiff(path, file)
        try:
            self._open()
        except BaseException:
            self._tif.close()
            raise

    def _open(self) -> None:
        path, page = self.path, self.page
        series = self._tif.series[0]
        n_planes = _stack_size(series)
        if page is None:
            if n_planes > 1:
                raise ReaderError(
                    f"{path}: multi-page TIFF stack with {n_planes} pages; read it page by page"
                )
            level = series.levels[0]
            pages, axes = list(level.pages), level.axes
            store = self._tif.aszarr(series=0, level=0)
        else:
            if not 0 <= page < n_planes or len(series.pages) != n_planes:
                holds = f"{n_planes} page" + ("s" if n_planes != 1 else "")
                raise ReaderError(f"{path}: no page {page} (the file holds {holds})")
            frame = series.pages[page]
            pages, axes = [frame], frame.keyframe.axes
            store = frame.aszarr()
        _check_extents(path, self._tif, pages)
        self._array = zarr.open_array(store, mode="r")
        self._axes = axes
        self.dtype = self._array.dtype
        self.shape = self._cyx_shape()
        self.mpp = _tiff_mpp(self._tif, pages[0].keyframe)

    def _cyx_shape(self) -> tuple[int, int, int]:
        extents = dict(zip(self._axes, self._array.shape, strict=True))
        others = [a for a in self._axes if a not in "YX" and extents[a] > 1]
        if "Y" not in extents or "X" not in extents or len(others) > 1:
            raise ReaderError(f"{self.path}: unsupported TIFF layout (axes {self._axes})")
        channels = extents[others[0]] if others else 1
        return (channels, extents["Y"], extents["X"])

    def _read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        index, order = [], []
        for axis, extent in zip(self._axes, self._array.shape, strict=True):
            if axis == "Y":
                index.append(slice(y, y + h))
                order.append(1)
            elif axis == "X":
                index.append(slice(x, x + w))
                order.append(2)
            elif extent > 1:
                index.append(slice(None))
                order.append(0)
            else:
                index.append(0)
        block = np.asarray(self._array[tuple(index)])
        if 0 not in order:
            return block[np.newaxis]
        return np.transpose(block, np.argsort(order))

    def close(self) -> None:
        self._tif.close()


class PillowReader(SlideReader):
    """PNG and JPEG through Pillow. They decode whole (no random access), so `lazy` is False;
    Pillow's decompression-bomb limit bounds their size."""

    lazy = False

    def __init__(
        self, path: str | Path, labels: bool = False, file: IO[bytes] | None = None
    ) -> None:
        super().__init__(path, None)
        try:
            with Image.open(path if file is None else file) as image:
                image.load()
                array = self._to_array(image, labels)
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError) as exc:
            raise ReaderError(f"{path}: cannot decode image ({one_line(exc, 300)})") from exc
        self._array = array if array.ndim == 3 else array[np.newaxis]
        self.shape = tuple(self._array.shape)
        self.dtype = self._array.dtype

    @staticmethod
    def _to_array(image: Image.Image, labels: bool) -> np.ndarray:
        """Pixels as (C, H, W) or (H, W); label images keep palette indices and integer modes."""
        if labels:
            array = np.asarray(image)
            return np.moveaxis(array, -1, 0) if array.ndim == 3 else array
        if image.mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        elif image.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            image = image.convert("RGB")
        elif image.mode == "PA":
            image = image.convert("RGBA")
        elif image.mode == "1":
            image = image.convert("L")
        array = np.asarray(image)
        if image.mode in ("RGBA", "LA"):
            array = composite_over_white(array)
        return np.moveaxis(array, -1, 0) if array.ndim == 3 else array

    def _read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        return self._array[:, y : y + h, x : x + w]

    def close(self) -> None:
        """Nothing to release: the pixels were decoded when the reader was opened."""


def _magic(path: Path) -> bytes:
    with path.open("rb") as fh:
        return fh.read(8)


def _check_file(path: str | Path, file: IO[bytes] | None = None) -> bytes:
    """The file's (or open `file`'s) first bytes, after checking that it exists and is not
    empty."""
    if file is not None:
        if file.seek(0, 2) == 0:
            raise ReaderError(f"{path}: empty file (0 bytes)")
        file.seek(0)
        magic = file.read(8)
        file.seek(0)
        return magic
    path = Path(path)
    if not path.is_file():
        raise ReaderError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ReaderError(f"{path}: empty file (0 bytes)")
    return _magic(path)


def _suffix(path: str | Path) -> str:
    return PurePosixPath(str(path)).suffix.lower()


#: tifffile's flags for the TIFF-based formats OpenSlide reads as a vendor's, with its names.
_VENDOR_FLAGS = {
    "is_svs": "aperio",
    "is_ndpi": "hamamatsu",
    "is_scn": "leica",
    "is_philips": "philips",
    "is_bif": "ventana",
}


def _tiff_vendor(path: str | Path, file: IO[bytes]) -> str | None:
    """The vendor format tifffile sees in the open TIFF `file`, else None."""
    try:
        with tifffile.TiffFile(file) as tif:
            return next((v for flag, v in _VENDOR_FLAGS.items() if getattr(tif, flag, False)), None)
    except Exception as exc:
        raise ReaderError(f"{path}: not a readable TIFF ({one_line(exc, 300)})") from exc
    finally:
        file.seek(0)


def needs_local_file(path: str | Path, file: IO[bytes]) -> bool:
    """Whether the slide `path` (open as `file`) is one OpenSlide reads, which needs a local
    file: an OpenSlide extension, or a TIFF that tifffile recognises as a vendor format."""
    if _suffix(path) in OPENSLIDE_SUFFIXES:
        return True
    return _check_file(path, file).startswith(_TIFF_MAGIC) and _tiff_vendor(path, file) is not None


def _openslide_vendor(path: str | Path, file: IO[bytes] | None = None) -> str | None:
    if file is not None:
        return _tiff_vendor(path, file)
    try:
        return openslide.OpenSlide.detect_format(path)
    except (openslide.OpenSlideError, OSError):
        return None


def _unsupported(path: str | Path) -> ReaderError:
    supported = " ".join(sorted(SUPPORTED_SUFFIXES))
    suffix = PurePosixPath(str(path)).suffix or "(no extension)"
    return ReaderError(f"{path}: unsupported format '{suffix}' (supported: {supported})")


def _named(path: str | Path, file: IO[bytes] | None) -> str | Path:
    """A local file's Path; with an open `file`, `path` only names it and is kept as given
    (Path("s3://b/k") would read `s3:/b/k`)."""
    return Path(path) if file is None else path


def open_slide(
    path: str | Path,
    page: int | None = None,
    openslide_cache_bytes: int = OPENSLIDE_CACHE_BYTES,
    file: IO[bytes] | None = None,
) -> SlideReader:
    """A reader for the image at `path` (`page` selects one plane of a multi-page TIFF stack);
    with `file`, the image is read from that open binary file, which the caller closes after
    the reader. OpenSlide's formats need a local file (`needs_local_file`)."""
    path = _named(path, file)
    magic = _check_file(path, file)
    suffix = _suffix(path)
    is_tiff = magic.startswith(_TIFF_MAGIC)
    if page is None and (suffix in OPENSLIDE_SUFFIXES or is_tiff):
        vendor = _openslide_vendor(path, file) if file is None or is_tiff else None
        if file is not None and (vendor is not None or suffix in OPENSLIDE_SUFFIXES):
            raise ReaderError(
                f"{path}: OpenSlide reads {vendor or suffix} slides from local files only "
                "(stage a local copy)"
            )
        if vendor not in (None, "generic-tiff"):
            return OpenSlideReader(Path(path), openslide_cache_bytes)
        if suffix in OPENSLIDE_SUFFIXES and not is_tiff:
            raise ReaderError(
                f"{path}: not a readable {suffix} slide (OpenSlide does not recognise it: "
                "unsupported, truncated or corrupt)"
            )
    if is_tiff:
        return TiffReader(path, page, file)
    if page is not None:
        raise ReaderError(f"{path}: no page {page} (only TIFF stacks have pages)")
    if magic.startswith((_PNG_MAGIC, _JPEG_MAGIC)):
        return PillowReader(path, file=file)
    if suffix in SUPPORTED_SUFFIXES:
        raise ReaderError(f"{path}: not a valid {suffix} file (its content is not {suffix[1:]})")
    raise _unsupported(path)


def open_labels(
    path: str | Path, page: int | None = None, file: IO[bytes] | None = None
) -> SlideReader:
    """A reader for a label image: one channel of integer (or boolean) pixels (read from the
    open binary `file` when given, as `open_slide` does)."""
    path = _named(path, file)
    magic = _check_file(path, file)
    if magic.startswith(_TIFF_MAGIC):
        reader: SlideReader = TiffReader(path, page, file)
    elif page is not None:
        raise ReaderError(f"{path}: no page {page} (only TIFF stacks have pages)")
    elif magic.startswith((_PNG_MAGIC, _JPEG_MAGIC)):
        reader = PillowReader(path, labels=True, file=file)
    elif _suffix(path) in SUPPORTED_SUFFIXES:
        raise ReaderError(f"{path}: not a valid label image (TIFF, PNG or JPEG content expected)")
    else:
        raise _unsupported(path)
    try:
        if reader.dtype.kind not in "uib":
            raise ReaderError(
                f"{path}: non-integer labels (dtype {reader.dtype}); label images must hold "
                "non-negative integer ids or a binary mask"
            )
        if reader.shape[0] != 1:
            raise ReaderError(
                f"{path}: label image has {reader.shape[0]} channels; one channel expected"
            )
    except ReaderError:
        reader.close()
        raise
    return reader


def page_count(path: str | Path, file: IO[bytes] | None = None) -> int:
    """How many slides `path` (or the open binary `file` it names) holds: the planes of a
    multi-page TIFF stack, else 1."""
    path = _named(path, file)
    if not _check_file(path, file).startswith(_TIFF_MAGIC) or _openslide_vendor(path, file) not in (
        None,
        "generic-tiff",
    ):
        return 1
    try:
        with tifffile.TiffFile(path if file is None else file) as tif:
            return _stack_size(tif.series[0]) if tif.series else 1
    except Exception as exc:
        raise ReaderError(f"{path}: not a readable TIFF ({one_line(exc, 300)})") from exc
    finally:
        if file is not None:
            file.seek(0)
