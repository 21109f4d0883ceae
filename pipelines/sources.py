"""What a run reads: slides (with their label images) and slide stores, found from the paths a
user names, each checked before any work starts.

    find_slides([archive])     -> SlideSource per slide (stacks expanded into pages), labels paired
    name_clashes(sources)      -> the sources whose stores would share a name, with the reason
    find_stores([stores_dir])  -> slide stores (`*.zarr` groups) named directly or inside folders

Empty input is an error, never a silent success: a folder with no slide (or no store) in it
raises naming the folder. A source's identity for "has it changed?" is the sha256 of its
files (`file_checksums`), never their paths, so a moved archive is not re-ingested.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from segcore.readers import SUPPORTED_SUFFIXES, ReaderError, page_count
from segcore.store import StoreError


class IngestError(ValueError):
    """A slide cannot be ingested; the message starts with the offending file's path."""


#: Label files next to `<name>.<ext>`: `<name>_labels.*`, `<name>_mask.*`, or `<dir>/<name>.*`.
LABEL_SUFFIXES = ("_labels", "_mask")
LABEL_FOLDERS = ("labels", "label", "masks", "mask")


class SlideSource(BaseModel):
    """One slide to ingest: an image file, its optional label image, and the page of a stack."""

    model_config = ConfigDict(frozen=True)

    image: Path
    labels: Path | None = None
    page: int | None = Field(default=None, ge=0)

    @property
    def name(self) -> str:
        """Store name without `.zarr`: the file name less its extension(s), plus `-pNNN`."""
        stem = self.image.name
        for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
            if stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        stem = stem.removesuffix(".ome")
        return stem if self.page is None else f"{stem}-p{self.page:03d}"


def _find_label(image: Path, name: str) -> Path | None:
    candidates = [image.with_name(name + s) for s in LABEL_SUFFIXES]
    candidates += [image.parent / folder / name for folder in LABEL_FOLDERS]
    if image.parent.name in ("images", "image"):
        candidates += [image.parent.parent / folder / name for folder in LABEL_FOLDERS]
    for stem in candidates:
        for ext in sorted({image.suffix, *SUPPORTED_SUFFIXES}, key=lambda e: e != image.suffix):
            path = stem.with_name(stem.name + ext)
            if path.is_file():
                return path
    return None


def expand_pages(source: SlideSource) -> list[SlideSource]:
    """A multi-page TIFF stack without a page becomes one source per page; others stay."""
    if source.page is not None:
        return [source]
    try:
        n_pages = page_count(source.image)
    except ReaderError as exc:
        raise IngestError(str(exc)) from exc
    if n_pages == 1:
        return [source]
    return [source.model_copy(update={"page": p}) for p in range(n_pages)]


def discover_sources(folder: str | Path) -> list[SlideSource]:
    """The slides in `folder` (not recursive), sorted by name, stacks expanded into pages.

    A file `<name>.<ext>` with a supported extension is a slide; its label image is the first
    that exists of `<name>_labels.*`, `<name>_mask.*`, `labels|label|masks|mask/<name>.*` in
    the folder and, when the folder is called `images` or `image`, the same sub-folders beside
    it (`train/image/0.png` pairs with `train/label/0.png`). The label extension may differ
    from the image's (a TIFF slide with a PNG mask). Files ending in `_labels`/`_mask` are
    labels, never slides. Unreadable files are listed as they are, for ingestion to report.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise IngestError(f"{folder}: not a folder")
    sources = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        name = SlideSource(image=path).name
        if path.suffix.lower() not in SUPPORTED_SUFFIXES or name.endswith(LABEL_SUFFIXES):
            continue
        source = SlideSource(image=path, labels=_find_label(path, name))
        try:
            sources.extend(expand_pages(source))
        except IngestError:  # unreadable: kept whole, so ingesting it reports the problem
            sources.append(source)
    return sources


def _source_files(path: Path) -> list[Path]:
    """The files a slide's pixels come from: MIRAX keeps them in a folder beside the .mrxs."""
    files = [path]
    companion = path.with_suffix("")
    if path.suffix.lower() == ".mrxs" and companion.is_dir():
        files += sorted(p for p in companion.rglob("*") if p.is_file())
    return files


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def file_checksums(source: SlideSource) -> dict[str, str]:
    """sha256 of every source file, streamed; keys are the file paths."""
    paths = _source_files(source.image) + ([source.labels] if source.labels else [])
    try:
        return {str(p): _sha256(p) for p in paths}
    except OSError as exc:
        raise IngestError(f"{exc.filename or source.image}: cannot read ({exc.strerror})") from exc


def source_checksum(files: dict[str, str], source: SlideSource) -> str:
    """One sha256 over the files' contents, roles and the page (not the paths: a moved
    archive is not re-ingested)."""
    roles = ["labels" if path == str(source.labels) else "image" for path in files]
    parts = [f"{role}:{digest}" for role, digest in zip(roles, files.values(), strict=True)]
    parts.append(f"page:{source.page}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _slides_of(path: Path) -> list[SlideSource]:
    if path.is_dir():
        found = discover_sources(path)
        if not found:
            suffixes = ", ".join(sorted(SUPPORTED_SUFFIXES))
            raise IngestError(f"{path}: no slides found in {path} (looked for {suffixes})")
        return found
    if not path.exists():
        raise IngestError(f"{path}: no such file or folder")
    # A file named alone still pairs with its label image, as it would in its folder.
    paired = [s for s in discover_sources(path.parent) if s.image == path]
    return paired or [SlideSource(image=path)]


def find_slides(paths: Iterable[str | Path]) -> list[SlideSource]:
    """The slides named by `paths` (files, or folders read by `discover_sources`).

    Raises `IngestError` for a path that does not exist, a folder without a slide, or no
    path at all.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise IngestError("no slides given: name at least one slide or folder of slides")
    return [source for path in paths for source in _slides_of(path)]


def name_clashes(sources: Sequence[SlideSource]) -> dict[int, str]:
    """{index: error} for every source whose store name another source also has.

    Neither is ingested: which one the store should hold is the user's call, and two writers
    of one store would overwrite each other. Example: `x.tif` and `x.png` in one archive both
    become `x.zarr`, so both fail with "store name x.zarr is shared by x.tif, x.png".
    """
    by_name: dict[str, list[int]] = {}
    for index, source in enumerate(sources):
        by_name.setdefault(source.name, []).append(index)
    clashes = {}
    for name, indices in by_name.items():
        if len(indices) > 1:
            others = ", ".join(str(sources[i].image) for i in indices)
            for index in indices:
                clashes[index] = (
                    f"{sources[index].image}: store name {name}.zarr is shared by {others}; "
                    "rename one of them"
                )
    return clashes


# --- stores -------------------------------------------------------------------------------


def is_store(path: Path) -> bool:
    """Whether `path` is named as a store (`*.zarr`) rather than a folder of stores."""
    return path.suffix == ".zarr" or (path / "zarr.json").exists()


def discover_stores(folder: Path) -> list[Path]:
    """The slide stores (`*.zarr` Zarr groups) directly inside `folder`, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix == ".zarr" and (p / "zarr.json").exists())


def find_stores(paths: Iterable[str | Path]) -> list[Path]:
    """Stores from store paths and folders of stores.

    Raises `StoreError` for a missing path, a store without its `zarr.json` (a deleted or
    half-copied store is not an empty one) and a folder that holds no store.
    """
    stores: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise StoreError(f"{path}: no such file or folder")
        if is_store(path):
            if not (path / "zarr.json").is_file():
                raise StoreError(f"{path}: not a Zarr store (zarr.json is missing)")
            stores.append(path)
            continue
        if not path.is_dir():
            raise StoreError(f"{path}: not a slide store (expected a .zarr folder)")
        found = discover_stores(path)
        if not found:
            raise StoreError(f"{path}: no stores found in {path} (no *.zarr with a zarr.json)")
        stores += found
    if not stores:
        raise StoreError("no stores given: name a store or a folder of stores")
    return stores
