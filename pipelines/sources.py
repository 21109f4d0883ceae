"""What a run reads: slides (with their label images) and slide stores, found from the paths a
user names, each checked before any work starts.

    find_slides([archive])     -> FoundSlides: a SlideSource per slide (stacks expanded into
                                  pages, labels paired) and a note per label file left out
    read_manifest(pairs.csv)   -> the slides a manifest names, each row checked
    name_clashes(sources)      -> the sources whose stores would share a name, with the reason
    find_stores([stores_dir])  -> slide stores (`*.zarr` groups) named directly or inside folders

Empty input is an error, never a silent success: a folder with no slide (or no store) in it
raises naming the folder. A source's identity for "has it changed?" is the sha256 of its
files (`file_checksums`), never their paths, so a moved archive is not re-ingested.

How a label image pairs with its slide (the one rule; `discover_sources` has the details):
a file *looks like labels* when a word of its name is a label word (`LABEL_WORDS`: label,
mask, seg, gt, annotation, ...) or its folder's name ends in one: `a_labels.png`,
`mask2d.tif`, `train-labels.tif`, `binary_masks/x.png` (not `labelled_cases/x.tif`). It pairs
with the slide whose name is the same once the label and image words (`IMAGE_WORDS`: image,
img, volume) are taken out of both (`pairing_key`): `img2d.tif` + `mask2d.tif`,
`train-volume.tif` + `train-labels.tif` (page by page), `images/x.tif` +
`binary_masks/x.png`. Such files are never slides of a folder; one that pairs with no slide
is left out with a note (`FoundSlides.notes`), not silently ingested. Named explicitly (a
file on its own, `--labels`, a manifest) any file is what it is named as.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from pipelines.location import (
    Location,
    LocationError,
    ObjectUrl,
    Where,
    is_file,
    is_folder,
    list_folder,
    local_path,
    open_binary,
    parse_location,
)
from segcore.readers import SUPPORTED_SUFFIXES, ReaderError, page_count
from segcore.store import StoreError


class IngestError(ValueError):
    """A slide cannot be ingested; the message starts with the offending file's path."""


#: Words (whole, any case) that make a file or folder name look like label images.
LABEL_WORDS = frozenset(
    ("label", "labels", "labelled", "labeled", "mask", "masks", "seg", "segs", "segmentation")
    + ("segmentations", "gt", "annotation", "annotations", "annot", "annots")
)
#: Words that name the image side of a pair, dropped with the label words by `pairing_key`.
IMAGE_WORDS = frozenset({"image", "images", "img", "imgs", "volume"})
#: A name's words: capitalised or lower-case letter runs, digit runs, and what separates them
#: (`trainLabels` -> train, Labels; `mask2d` -> mask, 2, d; `GTEx` stays one word, not gt).
_WORDS = re.compile(r"[A-Z]+[a-z]*|[a-z]+|\d+|[^A-Za-z\d]+")
#: A manifest is a CSV file with these columns (`labels` and `page` optional).
MANIFEST_SUFFIX = ".csv"
MANIFEST_COLUMNS = ("image", "labels", "page")

#: What is directly in a folder: (files, folders), each sorted by name (`location.list_folder`,
#: or a memo of it so that one run lists each folder once).
Lister = Callable[[Where], tuple[list[Where], list[Where]]]


def slide_stem(path: Where) -> str:
    """The file name less its slide extension(s): `a.ome.tif` -> `a`."""
    stem = path.name
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return stem.removesuffix(".ome")


class SlideSource(BaseModel):
    """One slide to ingest: an image file, its optional label image, and the page of a stack."""

    model_config = ConfigDict(frozen=True)

    image: Location
    labels: Location | None = None
    page: int | None = Field(default=None, ge=0)

    @property
    def name(self) -> str:
        """Store name without `.zarr`: the file name less its extension(s), plus `-pNNN`."""
        stem = slide_stem(self.image)
        return stem if self.page is None else f"{stem}-p{self.page:03d}"

    def without_credentials(self) -> SlideSource:
        """This source with object-storage keys and secrets dropped from its URLs."""

        def bare(where: Location | None) -> Location | None:
            return where.without_credentials() if isinstance(where, ObjectUrl) else where

        return self.model_copy(update={"image": bare(self.image), "labels": bare(self.labels)})


@dataclass(frozen=True)
class FoundSlides:
    """The slides to ingest, and one note per label file that none of them takes."""

    sources: list[SlideSource]
    notes: list[str] = field(default_factory=list)


def _has_word(name: str, words: frozenset[str]) -> bool:
    return any(word.lower() in words for word in _WORDS.findall(name))


def _ends_in_word(folder: Where, words: frozenset[str]) -> bool:
    """Whether the folder's last word of letters is one of `words`: a folder is named for
    what it holds (`binary_masks`, `Tissue_Images`, `labels_2024`), while `labelled_cases`
    or `seg_runs` hold cases and runs."""
    letters = [word for word in _WORDS.findall(folder.name) if word.isalpha()]
    return bool(letters) and letters[-1].lower() in words


def looks_like_labels(path: Where) -> bool:
    """Whether a word of the file's name is a label word, or its folder's name ends in one."""
    return _has_word(slide_stem(path), LABEL_WORDS) or _ends_in_word(path.parent, LABEL_WORDS)


def pairing_key(stem: str) -> str:
    """`stem` less its label and image words, each with the separator before it.

    `img2d` and `mask2d` -> `2d`; `train-volume` and `train-labels` -> `train`; `a_labels` ->
    `a`; `x_seg_v2` -> `x_v2`. Other separators stay: `a-1` and `a1` do not pair.
    """
    kept: list[str] = []
    for word in _WORDS.findall(stem):
        if word.lower() in LABEL_WORDS | IMAGE_WORDS:
            if kept and not kept[-1][0].isalnum():
                kept.pop()
            continue
        kept.append(word)
    return re.sub(r"^[^A-Za-z\d]+|[^A-Za-z\d]+$", "", "".join(kept))


def _is_slide_file(path: Where) -> bool:
    """Whether a file of a listing is a slide (or label) file: not hidden, a slide extension."""
    return not path.name.startswith(".") and path.suffix.lower() in SUPPORTED_SUFFIXES


def _label_folders(folder: Where, ls: Lister) -> list[Where]:
    """Where the label images of `folder`'s slides may be, in order of preference: the folder
    itself, its label folders, and, when its name ends in an image word (`images`,
    `Tissue_Images`), the label folders beside it (`labels`, `binary_masks`)."""
    places = [folder]
    places += [p for p in ls(folder)[1] if _ends_in_word(p, LABEL_WORDS)]
    if _ends_in_word(folder, IMAGE_WORDS) and folder.parent != folder:
        places += [p for p in ls(folder.parent)[1] if p != folder and _ends_in_word(p, LABEL_WORDS)]
    return places


def _label_files(folder: Where, ls: Lister) -> list[tuple[int, Where]]:
    """(place, file) of every label-looking image file where `folder`'s slides look for theirs."""
    return [
        (place, path)
        for place, where in enumerate(_label_folders(folder, ls))
        for path in ls(where)[0]
        if _is_slide_file(path) and looks_like_labels(path)
    ]


def _by_key(label_files: Sequence[tuple[int, Where]]) -> dict[str, list[tuple[int, Where]]]:
    """Label files by `pairing_key`: one look-up per slide, however large the archive."""
    index: dict[str, list[tuple[int, Where]]] = {}
    for place, path in label_files:
        index.setdefault(pairing_key(slide_stem(path)), []).append((place, path))
    return index


def _find_label(image: Where, by_key: dict[str, list[tuple[int, Where]]]) -> Where | None:
    """The label file of `image`: the same pairing key, the nearest place first, then the
    image's own extension (a TIFF slide may still have a PNG mask), then by name."""
    suffix = image.suffix.lower()
    candidates = [
        (place, path.suffix.lower() != suffix, path.name, path)
        for place, path in by_key.get(pairing_key(slide_stem(image)), [])
        if path != image
    ]
    return min(candidates)[-1] if candidates else None


def pages_in(image: Where) -> int:
    """`segcore.readers.page_count` of a local file or an object (its header read by range
    requests)."""
    if isinstance(image, Path):
        return page_count(image)
    with open_binary(image) as fh:
        return page_count(str(image), fh)


def expand_pages(source: SlideSource) -> list[SlideSource]:
    """A multi-page TIFF stack without a page becomes one source per page; others stay."""
    if source.page is not None:
        return [source]
    try:
        n_pages = pages_in(source.image)
    except (ReaderError, LocationError) as exc:
        raise IngestError(str(exc)) from exc
    if n_pages == 1:
        return [source]
    return [source.model_copy(update={"page": p}) for p in range(n_pages)]


def _pages(source: SlideSource) -> list[SlideSource]:
    """`expand_pages`, keeping an unreadable file whole for ingestion to report."""
    try:
        return expand_pages(source)
    except IngestError:
        return [source]


def discover_sources(folder: str | Where, ls: Lister = list_folder) -> list[SlideSource]:
    """The slides in `folder` (not recursive), sorted by name, stacks expanded into pages.

    A file with a supported extension is a slide unless it looks like labels (a label word in
    its name, or the folder's name ends in one; see the module's docstring). Its label image
    is the label-looking file with the same `pairing_key`, looked for in the folder, then in
    its label folders (names ending in a label word: `labels/`, `masks/`, `GT/`), then, when
    the folder's name ends in an image word, in the label folders beside it
    (`train/image/0.png` pairs with `train/label/0.png`, `images/x.tif` with
    `binary_masks/x.png`); the nearest wins, then one with the slide's own extension. A label
    file that two slides would pair with is an error (name the pairs in a manifest).
    Unreadable files are listed as they are, for ingestion to report. The same rules hold for a
    prefix on object storage (`folder` an ObjectUrl): `ls` gives what a folder holds, one
    listing per folder.
    """
    folder = parse_location(folder)
    if not is_folder(folder):
        raise IngestError(f"{folder}: not a folder")
    by_key = _by_key(_label_files(folder, ls))
    sources = [
        SlideSource(image=path, labels=_find_label(path, by_key))
        for path in ls(folder)[0]
        if _is_slide_file(path) and not looks_like_labels(path)
    ]
    takers: dict[Where, list[Where]] = {}
    for source in sources:
        if source.labels is not None:
            takers.setdefault(source.labels, []).append(source.image)
    for labels, images in takers.items():
        if len(images) > 1:
            raise IngestError(
                f"{labels}: label file of {' and '.join(map(str, images))}; "
                "name the pairs in a manifest (columns image,labels)"
            )
    return [page for source in sources for page in _pages(source)]


def unpaired_labels(
    folder: Where, sources: Sequence[SlideSource], ls: Lister = list_folder
) -> list[str]:
    """A note for every label-looking file where `folder`'s slides look for labels that none
    of `sources` takes: it is not a slide, and no slide is labelled by it."""
    taken = {source.labels for source in sources}
    return [
        f"{path}: looks like a label image but pairs with no slide; not ingested "
        "(name its slide in a manifest: image,labels)"
        for _, path in _label_files(folder, ls)
        if path not in taken
    ]


def source_files(path: Where) -> list[Where]:
    """The files a slide's pixels come from: MIRAX keeps them in a folder beside the .mrxs."""
    if isinstance(path, ObjectUrl):
        if path.suffix.lower() == ".mrxs":
            raise IngestError(f"{path}: MIRAX slides on object storage are not supported yet")
        return [path]
    files: list[Where] = [path]
    companion = path.with_suffix("")
    if path.suffix.lower() == ".mrxs" and companion.is_dir():
        files += sorted(p for p in companion.rglob("*") if p.is_file())
    return files


def sha256_of(path: Where) -> str:
    """The sha256 of a file's (an object's) content, streamed."""
    digest = hashlib.sha256()
    with open_binary(path) as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def file_checksums(source: SlideSource, image: Where | None = None) -> dict[str, str]:
    """sha256 of every source file, streamed; keys are the file paths. `image`, when given, is
    where the slide's bytes are read instead (its local staged copy: one download, not two)."""
    images = source_files(source.image)
    paths = images + ([source.labels] if source.labels else [])
    read = {images[0]: image} if image is not None else {}
    try:
        return {str(p): sha256_of(read.get(p, p)) for p in paths}
    except OSError as exc:
        raise IngestError(f"{exc.filename or source.image}: cannot read ({exc.strerror})") from exc


def source_checksum(files: dict[str, str], source: SlideSource) -> str:
    """One sha256 over the files' contents, roles and the page (not the paths: a moved
    archive is not re-ingested)."""
    roles = ["labels" if path == str(source.labels) else "image" for path in files]
    parts = [f"{role}:{digest}" for role, digest in zip(roles, files.values(), strict=True)]
    parts.append(f"page:{source.page}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


# --- manifests: image/label pairs named explicitly -----------------------------------------


def is_manifest(path: Path) -> bool:
    """Whether `path` names a manifest (a `.csv` file) rather than a slide or a folder."""
    return path.suffix.lower() == MANIFEST_SUFFIX


def as_manifest(path: Path) -> Path:
    """`path`, checked to be named as a manifest."""
    if not is_manifest(path):
        raise IngestError(f"{path}: a manifest is a {MANIFEST_SUFFIX} file (columns image,labels)")
    return path


def read_manifest(path: Path) -> list[SlideSource]:
    """The slides a manifest names, stacks without a `page` expanded into pages.

    A manifest is a CSV file with a header row and a row per slide: `image` (required),
    `labels` (may be empty: an unlabelled slide) and `page` (may be empty: every page of a
    stack, each paired with the same page of the label stack). Paths are relative to the
    manifest's folder. Example:

        image,labels,page
        img2d.tif,mask2d.tif,
        isbi/train-volume.tif,isbi/train-labels.tif,
        scans/slide-7.svs,,

    Rows are numbered as a spreadsheet shows them (the header is row 1); an error names the
    manifest and the row: a missing file, an image (or page) named twice, a page beyond the
    stack, an unknown column, text that is not CSV. A manifest without rows is an error too.
    """
    seen: dict[Path, dict[int | None, int]] = {}
    sources: list[SlideSource] = []
    row_number = 0  # of the last row read: an unreadable one is the next
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = csv.reader(fh, strict=True)  # bad quoting is an error, not a guess
            columns = _manifest_columns(path, next(rows, None))
            row_number = rows.line_num
            for row in rows:
                row_number = rows.line_num
                if any(cell.strip() for cell in row):
                    sources += _manifest_row(path, row_number, columns, row, seen)
    except UnicodeDecodeError:
        raise IngestError(f"{path}: unreadable CSV (not UTF-8 text)") from None
    except csv.Error as exc:
        raise IngestError(f"{path}: row {row_number + 1}: unreadable CSV ({exc})") from exc
    except OSError as exc:
        raise IngestError(f"{path}: cannot read ({exc.strerror})") from exc
    if not sources:
        raise IngestError(f"{path}: no slides in the manifest (a header and no rows)")
    return sources


def _manifest_columns(path: Path, header: list[str] | None) -> list[str]:
    if header is None:
        raise IngestError(f"{path}: empty manifest (expected a header row: image,labels,page)")
    columns = [cell.strip().lower() for cell in header]
    for column in columns:
        if column not in MANIFEST_COLUMNS:
            expected = ", ".join(MANIFEST_COLUMNS)
            raise IngestError(f"{path}: row 1: unknown column {column!r} (columns: {expected})")
        if columns.count(column) > 1:
            raise IngestError(f"{path}: row 1: column {column!r} appears twice")
    if "image" not in columns:
        raise IngestError(f"{path}: row 1: no image column (header: {','.join(columns)})")
    return columns


def _manifest_row(
    manifest: Path,
    number: int,
    columns: list[str],
    row: list[str],
    seen: dict[Path, dict[int | None, int]],
) -> list[SlideSource]:
    """The pages of row `number`'s slide; `seen` (image -> {page: row}) catches repeats."""
    where = f"{manifest}: row {number}"
    if len(row) > len(columns):
        raise IngestError(f"{where}: {len(row)} fields, the header has {len(columns)}")
    cells = {column: cell.strip() for column, cell in zip(columns, row, strict=False)}
    if not cells.get("image"):
        raise IngestError(f"{where}: no image")
    image = _manifest_file(where, manifest.parent / cells["image"])
    labels = cells.get("labels")
    labels_path = _manifest_file(where, manifest.parent / labels) if labels else None
    page = _manifest_page(where, image, cells.get("page", ""))
    # An image named twice would be one store written twice, unless the rows name two pages.
    pages = seen.setdefault(image.resolve(), {})
    earlier = (
        list(pages.values()) if page is None else [pages[p] for p in (page, None) if p in pages]
    )
    if earlier:
        raise IngestError(f"{where}: {image} is already in row {earlier[0]}")
    pages[page] = number
    return _pages(SlideSource(image=image, labels=labels_path, page=page))


def _manifest_file(where: str, path: Path) -> Path:
    if not path.exists():
        raise IngestError(f"{where}: {path}: no such file")
    if not path.is_file():
        raise IngestError(f"{where}: {path}: not a file")
    return path


def _manifest_page(where: str, image: Path, text: str) -> int | None:
    """The row's page: empty for every page, else a page the stack has (checked when the
    stack is readable; an unreadable one fails when ingested, naming the file)."""
    if not text:
        return None
    if not text.isdigit():
        raise IngestError(f"{where}: page {text!r} is not a whole number >= 0")
    page = int(text)
    try:
        n_pages = page_count(image)
    except ReaderError:
        return page
    if page >= n_pages:
        raise IngestError(f"{where}: page {page} of {image}, which has {n_pages} page(s)")
    return page


# --- what a run reads --------------------------------------------------------------------


def _named_pair(source: SlideSource) -> SlideSource:
    """An explicit image/label pair (`segflow ingest IMAGE --labels LABELS`), its files checked."""
    for path in (source.image, source.labels):
        if path is not None and not is_file(path):
            missing = not is_folder(path) and not (isinstance(path, Path) and path.exists())
            raise IngestError(f"{path}: {'no such file' if missing else 'not a file'}")
    return source


def _slides_of(item: str | Where | SlideSource, ls: Lister) -> FoundSlides:
    if isinstance(item, SlideSource):
        return FoundSlides(_pages(_named_pair(item)))
    path = parse_location(item)
    if is_folder(path):
        sources = discover_sources(path, ls)
        notes = unpaired_labels(path, sources, ls)
        if not sources:
            suffixes = ", ".join(sorted(SUPPORTED_SUFFIXES))
            left_out = f"; {len(notes)} label file(s) pair with no slide" if notes else ""
            raise IngestError(
                f"{path}: no slides found in {path} (looked for {suffixes}{left_out})"
            )
        return FoundSlides(sources, notes)
    if not is_file(path):
        raise IngestError(f"{path}: no such file or folder")
    if is_manifest(path):
        return FoundSlides(read_manifest(local_path(path, "manifests")))
    # A file named alone still pairs with its label image, as it would in its folder.
    labels = _find_label(path, _by_key(_label_files(path.parent, ls)))
    return FoundSlides(_pages(SlideSource(image=path, labels=labels)))


def find_slides(items: Iterable[str | Where | SlideSource]) -> FoundSlides:
    """The slides named by `items`: slide files, folders (`discover_sources`), manifests
    (`.csv`, `read_manifest`) and explicit image/label pairs (SlideSource), with a note for
    each label file of a folder that pairs with no slide. Items may be on object storage
    (ObjectUrl, or its `s3://...` text): each folder there is listed once.

    Raises `IngestError` for a path that does not exist, a folder without a slide, a bad
    manifest, or no item at all.
    """
    items = list(items)
    if not items:
        raise IngestError("no slides given: name at least one slide or folder of slides")
    ls = functools.cache(list_folder)
    found = [_slides_of(item, ls) for item in items]
    return FoundSlides(
        [source for each in found for source in each.sources],
        [note for each in found for note in each.notes],
    )


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


def is_store(path: Where) -> bool:
    """Whether `path` is named as a store (`*.zarr`) rather than a folder of stores."""
    return path.suffix == ".zarr" or is_file(path / "zarr.json")


def discover_stores(folder: Where) -> list[Where]:
    """The slide stores (`*.zarr` Zarr groups) directly inside `folder`, sorted by name."""
    _, folders = list_folder(folder)
    return [p for p in folders if p.suffix == ".zarr" and is_file(p / "zarr.json")]


def find_stores(paths: Iterable[str | Where]) -> list[Where]:
    """Stores from store paths and folders of stores, local or on object storage.

    Raises `StoreError` for a missing path, a store without its `zarr.json` (a deleted or
    half-copied store is not an empty one) and a folder that holds no store.
    """
    stores: list[Where] = []
    for path in map(parse_location, paths):
        if not (is_folder(path) or is_file(path)):
            raise StoreError(f"{path}: no such file or folder")
        if is_store(path):
            if not is_file(path / "zarr.json"):
                raise StoreError(f"{path}: not a Zarr store (zarr.json is missing)")
            stores.append(path)
            continue
        if not is_folder(path):
            raise StoreError(f"{path}: not a slide store (expected a .zarr folder)")
        found = discover_stores(path)
        if not found:
            raise StoreError(f"{path}: no stores found in {path} (no *.zarr with a zarr.json)")
        stores += found
    if not stores:
        raise StoreError("no stores given: name a store or a folder of stores")
    return stores


def ready_stores(
    paths: Iterable[str | Where], ready: Callable[[Where], bool], need: str
) -> list[Where]:
    """Stores a stage works on: each store named directly, as it is (the stage fails it naming
    its problem), and from each folder the stores `ready` says the stage can use. A folder of
    an archive's stores also holds stores a stage has nothing to do with (unlabelled slides
    for weight maps; unweighted or held-out ones for training). A store that cannot be read
    counts as ready, so that it fails in its own task, saying why.

    Raises `StoreError("<folder>: none of its N store(s) <need>")` for a folder with none.
    """
    stores: list[Where] = []
    for path in map(parse_location, paths):
        found = find_stores([path])
        if is_store(path):
            stores += found
            continue
        usable = [store for store in found if _ready_or_unreadable(store, ready)]
        if not usable:
            raise StoreError(f"{path}: none of its {len(found)} store(s) {need}")
        stores += usable
    return stores


def _ready_or_unreadable(store: Where, ready: Callable[[Where], bool]) -> bool:
    try:
        return ready(store)
    except StoreError:
        return True
