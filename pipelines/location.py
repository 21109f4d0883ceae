"""Where a thing is: a local path or an object-storage URL, told apart once where a run's
input is named (`parse_location`), and read through fsspec.

    storage = ObjectStorageConfig(endpoint_url="http://127.0.0.1:9000")
    parse_location("slides/a.tif", storage)             # PosixPath('slides/a.tif')
    parse_location("file:///data/a.tif", storage)       # PosixPath('/data/a.tif')
    archive = parse_location("s3://lab/archive", storage)  # ObjectUrl('s3://lab/archive')
    (archive / "a.tif").suffix, archive.name, archive.parent  # as a PurePosixPath answers
    list_folder(archive)                                # (files, folders): one listing request
    with open_binary(archive / "a.tif") as fh:          # range requests, not a download
        fh.read(8)

An `ObjectUrl` carries the storage settings it was parsed with (endpoint, credentials,
region), so a Dask task handed one can open it; they are no part of its text, its repr, its
equality or its JSON form. Writing there (stores, the workdir, checkpoints, outputs) goes
through `pipelines.storage`, which keeps the same rules on a prefix as in a folder; what
stays local (manifests, exports) is refused in one line by `local_path`, and a URL never
becomes a local folder named `s3:`. The endpoint and credentials come from the standard variables
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), read by
`pipelines.runtime.RuntimeEnvironment` where a run starts, or from the configuration.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Annotated, Any
from urllib.parse import unquote, urlsplit

import fsspec
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer
from pydantic_core import core_schema

from pipelines.redaction import MASK, RedactedUri
from segcore.errors import one_line

#: Object-storage protocols segflow reads, with the package that brings each one's client.
PROTOCOLS = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}
#: How to install that package.
EXTRAS = {"s3fs": "pip install 'segflow[s3]'", "gcsfs": "pip install gcsfs"}
#: Client settings of zarr's stores, beside the storage's: s3fs reads a whole object with a
#: HEAD for its size first (to split a large one into concurrent ranges) unless its concurrency
#: is 1; Zarr's chunks and metadata documents are small and zarr overlaps its own requests, so
#: one GET each halves the requests of every store read (training's loader: +35% input Mpx/s
#: from S3, benchmarks/loader.py).
ZARR_CLIENT_OPTIONS = {"s3fs": {"max_concurrency": 1}}
#: Bytes fetched per range request beyond what a read asks for (tifffile reads tile by tile).
READ_BLOCK_BYTES = 2 << 20
#: Seconds to wait for a connection, and attempts per request, so that an endpoint that
#: cannot be reached fails within seconds rather than after minutes of retries.
CONNECT_TIMEOUT_S = 5
MAX_ATTEMPTS = 2

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_MANGLED = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):$")  # Path("s3://b/k").parts[0] == "s3:"


class LocationError(ValueError):
    """A location cannot be parsed, reached or read; the message starts with it."""


def _mask(secret: str | None) -> str | None:
    return None if secret is None else MASK


#: A credential: the run uses its value, its JSON form (what Prefect records, what a
#: configuration dumps) is `***`, and it is left out of repr.
Secret = Annotated[str | None, PlainSerializer(_mask, when_used="json"), Field(repr=False)]


class ObjectStorageConfig(BaseModel):
    """How to reach object storage; a field left None is the client's default (for S3, the
    AWS endpoint and boto's own credential chain).

    Example: ObjectStorageConfig(endpoint_url="http://127.0.0.1:9000", key="k", secret="s")
    .model_dump(mode="json")["secret"] -> '***'.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The S3 API address (e.g. http://127.0.0.1:9000 for MinIO); default AWS_ENDPOINT_URL.
    endpoint_url: RedactedUri = None
    #: Access key id; default AWS_ACCESS_KEY_ID.
    key: Secret = None
    #: Secret access key, never printed or recorded; default AWS_SECRET_ACCESS_KEY.
    secret: Secret = None
    #: Region; default AWS_DEFAULT_REGION.
    region: str | None = None
    #: Where local copies of slides that only OpenSlide reads (it needs a file) are kept
    #: (None: `staged` beside a local stores folder, in the temporary folder for stores on
    #: object storage: `pipelines.staging.stage_dir_for`).
    stage_dir: Path | None = None
    #: MiB those copies may take; the least recently used go first to make room.
    stage_cache_mb: int = Field(default=8192, ge=1)

    def merged(self, defaults: ObjectStorageConfig) -> ObjectStorageConfig:
        """These settings, with the fields left None taken from `defaults`."""
        unset = {
            name: getattr(defaults, name)
            for name in type(self).model_fields
            if getattr(self, name) is None
        }
        return self.model_copy(update=unset)

    def storage_options(self, protocol: str) -> dict[str, Any]:
        """The fsspec filesystem arguments for `protocol` ("s3", "gs")."""
        if PROTOCOLS.get(protocol) != "s3fs":
            return {"endpoint_url": self.endpoint_url} if self.endpoint_url else {}
        options: dict[str, Any] = {
            # Stages list what they or another client just wrote (a store's chunks, a run's
            # done-markers): a cached listing would hide it.
            "use_listings_cache": False,
            "config_kwargs": {
                "connect_timeout": CONNECT_TIMEOUT_S,
                "retries": {"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
            },
        }
        if self.endpoint_url:
            options["endpoint_url"] = self.endpoint_url
        if self.key is not None or self.secret is not None:
            options |= {"key": self.key, "secret": self.secret}
        if self.region:
            options["client_kwargs"] = {"region_name": self.region}
        return options


@dataclass(frozen=True)
class ObjectUrl:
    """`<protocol>://<bucket>/<key>` with the storage settings to reach it; names and parents
    as a PurePosixPath of `<bucket>/<key>` gives them.

    >>> url = ObjectUrl("s3", "lab/archive/a.ome.tif")
    >>> str(url), url.name, url.suffix, str(url.parent), str(url.parent / "b.png")
    ('s3://lab/archive/a.ome.tif', 'a.ome.tif', '.tif', 's3://lab/archive', 's3://lab/archive/b.png')
    """

    protocol: str
    path: str
    storage: ObjectStorageConfig = field(
        default_factory=ObjectStorageConfig, compare=False, repr=False
    )

    def __str__(self) -> str:
        return f"{self.protocol}://{self.path}"

    def __repr__(self) -> str:
        return f"ObjectUrl({str(self)!r})"

    @property
    def _pure(self) -> PurePosixPath:
        return PurePosixPath(self.path)

    @property
    def name(self) -> str:
        return self._pure.name

    @property
    def suffix(self) -> str:
        return self._pure.suffix

    @property
    def parent(self) -> ObjectUrl:
        """The folder (prefix) holding this object; a bucket is its own parent."""
        if "/" not in self.path:
            return self
        return ObjectUrl(self.protocol, str(self._pure.parent), self.storage)

    def __truediv__(self, name: str) -> ObjectUrl:
        return ObjectUrl(self.protocol, str(self._pure / name), self.storage)

    def with_suffix(self, suffix: str) -> ObjectUrl:
        return ObjectUrl(self.protocol, str(self._pure.with_suffix(suffix)), self.storage)

    def with_name(self, name: str) -> ObjectUrl:
        return ObjectUrl(self.protocol, str(self._pure.with_name(name)), self.storage)

    def relative_to(self, other: ObjectUrl) -> PurePosixPath:
        """This URL's key below `other`'s (ValueError when it is not below it)."""
        return self._pure.relative_to(other._pure)

    def zarr_store(self, read_only: bool) -> Any:
        """zarr's own fsspec store of this prefix (`segcore.store.RemoteLocation`)."""
        from zarr.storage import FsspecStore

        self.filesystem()  # the one-line "needs s3fs" error before zarr's ImportError
        options = self.storage.storage_options(self.protocol)
        options |= ZARR_CLIENT_OPTIONS.get(PROTOCOLS[self.protocol], {})
        return FsspecStore.from_url(str(self), storage_options=options, read_only=read_only)

    def without_credentials(self) -> ObjectUrl:
        """This URL with its key and secret dropped (endpoint and region kept): what may be
        written down, e.g. in a result Prefect pickles to its storage."""
        return ObjectUrl(
            self.protocol, self.path, self.storage.model_copy(update={"key": None, "secret": None})
        )

    def filesystem(self) -> Any:
        """The fsspec filesystem of this URL's protocol and storage settings (fsspec keeps one
        instance per set of arguments)."""
        package = PROTOCOLS[self.protocol]
        if importlib.util.find_spec(package) is None:
            raise LocationError(
                f"{self}: reading {self.protocol}:// needs the {package} package "
                f"({EXTRAS[package]})"
            )
        return fsspec.filesystem(self.protocol, **self.storage.storage_options(self.protocol))

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        """Validated from an ObjectUrl or its text (default storage); serialized as its text."""
        return core_schema.no_info_plain_validator_function(
            lambda value: value if isinstance(value, ObjectUrl) else _parse_url(str(value)),
            serialization=core_schema.plain_serializer_function_ser_schema(str),
        )

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: Any, handler: Any) -> dict[str, str]:
        """A URL string, in the parameter schemas of Prefect deployments."""
        return {"type": "string", "format": "uri"}


#: Where a slide or folder is: a local path or an object-storage URL.
Where = Path | ObjectUrl


def url_of(value: str | Path | ObjectUrl) -> str | None:
    """The URL `value` names, or None for a local path. A Path made from a URL by mistake
    (`Path("s3://b/k")` is `s3:/b/k`) still names its URL.

    >>> url_of("s3://b/k"), url_of(Path("s3://b/k")), url_of("b/k"), url_of("c:/x") is None
    ('s3://b/k', 's3://b/k', None, True)
    """
    if isinstance(value, ObjectUrl):
        return str(value)
    if isinstance(value, Path):
        parts = value.parts
        mangled = _MANGLED.match(parts[0]) if parts else None
        if mangled and (mangled.group(1).lower() in PROTOCOLS or mangled.group(1) == "file"):
            return f"{mangled.group(1)}://{'/'.join(parts[1:])}"
        return None
    return value if _SCHEME.match(value) else None


def _parse_url(url: str, storage: ObjectStorageConfig | None = None) -> Where:
    parts = urlsplit(url)
    protocol = parts.scheme.lower()
    if protocol == "file":
        return Path(unquote(parts.path))
    if protocol not in PROTOCOLS:
        known = ", ".join(f"{p}://" for p in [*PROTOCOLS, "file"])
        raise LocationError(f"{url}: unsupported location (a local path or {known})")
    if not parts.netloc:
        raise LocationError(f"{url}: no bucket in the URL")
    path = f"{parts.netloc}/{parts.path.strip('/')}".rstrip("/")
    return ObjectUrl(protocol, path, storage or ObjectStorageConfig())


def parse_location(
    value: str | Path | ObjectUrl, storage: ObjectStorageConfig | None = None
) -> Where:
    """A local Path or an ObjectUrl (reached with `storage`); `file://` URLs are local paths.

    Raises LocationError for a scheme segflow does not read (`http://...`) or a URL without a
    bucket.
    """
    if isinstance(value, ObjectUrl):
        return value
    url = url_of(value)
    return Path(value) if url is None else _parse_url(url, storage)


def _as_location(value: object) -> object:
    # A local path goes on as text: in JSON mode pydantic's Path accepts only a string.
    if isinstance(value, str | Path):
        value = parse_location(value)
        return str(value) if isinstance(value, Path) else value
    return value


#: A pydantic field holding a local path or an object-storage URL, from either's text.
Location = Annotated[Where, BeforeValidator(_as_location)]


def local_path(value: str | Path | ObjectUrl, what: str = "stores/workdir") -> Path:
    """`value` as a local Path; a URL (or a Path made from one) raises LocationError, since
    segflow does not write to object storage yet.

    Example: local_path("s3://segflow/work") raises "object storage for stores/workdir is
    not supported yet: s3://segflow/work"; local_path("file:///w") is Path("/w").
    """
    url = url_of(value)
    if url is None:
        return Path(value)
    if url.lower().startswith("file://"):
        return Path(unquote(urlsplit(url).path))
    raise LocationError(f"object storage for {what} is not supported yet: {url}")


# --- reading: the same few questions of a local folder and of a prefix -------------------


def _remote(url: ObjectUrl, doing: str, call: Callable[[Any], Any]) -> Any:
    """`call(filesystem)`, its failure one LocationError naming `url` and what was done."""
    fs = url.filesystem()
    try:
        return call(fs)
    except FileNotFoundError:
        raise LocationError(f"{url}: no such object or prefix") from None
    except Exception as exc:  # the client's errors: endpoint unreachable, access denied, ...
        raise LocationError(f"{url}: cannot {doing} ({one_line(exc, 300)})") from exc


def list_folder(folder: Where) -> tuple[list[Where], list[Where]]:
    """(files, folders) directly inside `folder`, each sorted by name: one listing."""
    if isinstance(folder, Path):
        entries = sorted(folder.iterdir())
        return [p for p in entries if p.is_file()], [p for p in entries if p.is_dir()]
    entries = _remote(folder, "list it", lambda fs: fs.ls(folder.path, detail=True))
    files: list[Where] = []
    folders: list[Where] = []
    for entry in sorted(entries, key=lambda e: e["name"]):
        name = entry["name"].rstrip("/")
        if name == folder.path:  # a zero-byte "folder/" marker object
            continue
        child = ObjectUrl(folder.protocol, name, folder.storage)
        (folders if entry["type"] == "directory" else files).append(child)
    return files, folders


def is_folder(where: Where) -> bool:
    """Whether `where` is a folder (a prefix with objects under it)."""
    if isinstance(where, Path):
        return where.is_dir()
    return bool(_remote(where, "list it", lambda fs: fs.isdir(where.path)))


def is_file(where: Where) -> bool:
    """Whether `where` is a file (an object)."""
    if isinstance(where, Path):
        return where.is_file()
    return bool(_remote(where, "read it", lambda fs: fs.isfile(where.path)))


def file_size(where: Where) -> int:
    """Size in bytes of the file (object) `where`."""
    if isinstance(where, Path):
        return where.stat().st_size
    return int(_remote(where, "read it", lambda fs: fs.size(where.path)))


def file_version(where: ObjectUrl) -> str:
    """What changes when the object is replaced: its ETag (else size and modification time)."""
    info = _remote(where, "read it", lambda fs: fs.info(where.path))
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    return str(etag).strip('"') if etag else f"{info.get('size')}-{info.get('LastModified')}"


def open_binary(where: Where) -> IO[bytes]:
    """`where` opened for reading bytes; an object is read by range requests of what is read
    (plus READ_BLOCK_BYTES ahead), never downloaded whole to open it."""
    if isinstance(where, Path):
        return where.open("rb")
    return _remote(
        where,
        "open it",
        lambda fs: fs.open(where.path, "rb", block_size=READ_BLOCK_BYTES, cache_type="readahead"),
    )
