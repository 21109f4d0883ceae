"""Where a run keeps its outputs and which services it talks to: one typed object, resolved once.

With nothing configured everything is embedded on one machine: stores under `<workdir>/stores`,
MLflow in `sqlite:///<workdir>/mlflow.db` (artifacts in `<workdir>/mlartifacts`), a Dask
LocalCluster per stage, and Prefect's temporary local API with its home, database and task
cache under `<workdir>/prefect`. The environment variables MLFLOW_TRACKING_URI,
DASK_SCHEDULER_ADDRESS and PREFECT_API_URL move a run onto real servers; they are read by
`RuntimeEnvironment` and nowhere else, once, where a run starts; so are AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_DEFAULT_REGION, which say how to reach
object storage (`object_storage`, pipelines.location).

The workdir may be a prefix on object storage (`s3://lab/work`, reached with the run's
`object_storage`): stores are then `s3://lab/work/stores`, and nothing local is made of it.
Two things need a local disk and so never go there: MLflow's embedded store is a SQLite file,
so such a run needs a tracking URI (`mlflow_uri` says so in one line), and Prefect's embedded
database and task cache live in a local folder keyed by the workdir's URL
(flows.runtime.prefect_dir).

    runtime = Runtime.from_environment()                 # the `segflow` command, a script
    runtime = Runtime(workdir=Path("work")).resolved()   # the same, with the workdir given
    runtime = Runtime(workdir=Path("/data/work"))        # explicit: reads no variable
    runtime.mlflow_uri                                   # 'sqlite:////data/work/mlflow.db'
    Runtime(workdir="s3://lab/work", tracking_uri="http://mlflow:5000").stores_dir
                                                         # ObjectUrl('s3://lab/work/stores')

Training and inference given no tracking URI use the same store, `default_tracking_uri`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipelines.location import Location, ObjectStorageConfig, ObjectUrl, Where
from pipelines.redaction import RedactedUri

if TYPE_CHECKING:
    from pipelines.cluster import ClusterConfig

ConfigT = TypeVar("ConfigT", bound=BaseModel)

#: The workdir of a run that names none (relative: under the current directory).
DEFAULT_WORKDIR = Path("segflow-work")
SQLITE_PREFIX = "sqlite:///"


def default_tracking_uri(workdir: Path = DEFAULT_WORKDIR) -> str:
    """The embedded MLflow store of `workdir`: where training registers and inference looks
    when neither is given a tracking URI.

    >>> default_tracking_uri(Path("/data/work"))
    'sqlite:////data/work/mlflow.db'
    """
    return f"{SQLITE_PREFIX}{workdir.expanduser().resolve() / 'mlflow.db'}"


def sqlite_database(uri: str) -> Path | None:
    """The database file of a `sqlite:///<path>` URI (SQLAlchemy's form: a fourth slash makes
    the path absolute, a `?query` is not part of it); None for other stores and in-memory.

    >>> sqlite_database("sqlite:////abs/x.db?mode=ro"), sqlite_database("sqlite:///rel/x.db")
    (PosixPath('/abs/x.db'), PosixPath('rel/x.db'))
    >>> sqlite_database("http://mlflow:5000") is None, sqlite_database("sqlite://") is None
    (True, True)
    """
    if not uri.startswith(SQLITE_PREFIX):
        return None
    path = uri.removeprefix(SQLITE_PREFIX).partition("?")[0]
    return Path(path) if path and path != ":memory:" else None


def artifact_root(tracking_uri: str) -> str | None:
    """Artifact root for a new experiment of a SQLite store: `mlartifacts` beside the database
    (not the working directory's ./mlruns); None for a server, which picks its own.

    >>> artifact_root("sqlite:////data/work/mlflow.db")
    'file:///data/work/mlartifacts'
    """
    database = sqlite_database(tracking_uri)
    return None if database is None else (database.resolve().parent / "mlartifacts").as_uri()


class RuntimeEnvironment(BaseSettings):
    """The environment variables segflow reads, and the one place it reads them; an empty
    variable counts as unset."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=True, env_ignore_empty=True)

    tracking_uri: str | None = Field(default=None, validation_alias="MLFLOW_TRACKING_URI")
    scheduler_address: str | None = Field(default=None, validation_alias="DASK_SCHEDULER_ADDRESS")
    prefect_api_url: str | None = Field(default=None, validation_alias="PREFECT_API_URL")
    aws_endpoint_url: str | None = Field(default=None, validation_alias="AWS_ENDPOINT_URL")
    aws_access_key_id: str | None = Field(
        default=None, validation_alias="AWS_ACCESS_KEY_ID", repr=False
    )
    aws_secret_access_key: str | None = Field(
        default=None, validation_alias="AWS_SECRET_ACCESS_KEY", repr=False
    )
    aws_default_region: str | None = Field(default=None, validation_alias="AWS_DEFAULT_REGION")

    def object_storage(self) -> ObjectStorageConfig:
        """The object-storage settings these variables give."""
        return ObjectStorageConfig(
            endpoint_url=self.aws_endpoint_url,
            key=self.aws_access_key_id,
            secret=self.aws_secret_access_key,
            region=self.aws_default_region,
        )


class Runtime(BaseModel):
    """The workdir and services of a run; a service left None is embedded (or, by `resolved`,
    taken from the environment)."""

    model_config = ConfigDict(extra="forbid")

    #: A local folder or an object-storage prefix (reached with `object_storage`).
    workdir: Location = DEFAULT_WORKDIR
    #: MLflow tracking and registry URI; None = the embedded `default_tracking_uri(workdir)`.
    tracking_uri: RedactedUri = None
    #: A running Dask scheduler for every stage; None = each stage starts the LocalCluster its
    #: own `cluster` settings describe.
    scheduler_address: RedactedUri = None
    #: A Prefect server's API; None = the active Prefect profile's, else a temporary local
    #: server on `<workdir>/prefect` (flows.runtime).
    prefect_api_url: RedactedUri = None
    #: How to reach object storage (slides read from s3://...); fields left None are taken
    #: from the environment by `resolved`. Credentials are `***` in its JSON form.
    object_storage: ObjectStorageConfig = ObjectStorageConfig()

    @model_validator(mode="after")
    def _reach_workdir(self) -> Runtime:
        """A workdir URL is reached with this run's object-storage settings."""
        if isinstance(self.workdir, ObjectUrl):
            self.workdir = replace(self.workdir, storage=self.object_storage)
        return self

    @classmethod
    def from_environment(cls, **given: object) -> Runtime:
        """The runtime of the fields `given` (a None value counts as not given), the others
        from the environment (`RuntimeEnvironment`), else embedded."""
        return cls(**{name: value for name, value in given.items() if value is not None}).resolved()

    def resolved(self) -> Runtime:
        """Absolute workdir (a URL as it is), and the services left None filled from the
        environment."""
        workdir = self.workdir
        env = RuntimeEnvironment()
        tracking_uri = self.tracking_uri or env.tracking_uri
        if isinstance(workdir, Path):
            workdir = workdir.expanduser().resolve()
            if tracking_uri == default_tracking_uri(workdir):
                tracking_uri = None  # the embedded store named explicitly
        return Runtime(
            workdir=workdir,
            tracking_uri=tracking_uri,
            scheduler_address=self.scheduler_address or env.scheduler_address,
            prefect_api_url=self.prefect_api_url or env.prefect_api_url,
            object_storage=self.object_storage.merged(env.object_storage()),
        )

    @property
    def stores_dir(self) -> Where:
        """Where ingested slide stores live: `<workdir>/stores`, on object storage too."""
        return self.workdir / "stores"

    @property
    def tracking_store(self) -> str | None:
        """The tracking URI, the embedded one of a local workdir; None for a workdir on object
        storage given none (the embedded store is a local SQLite file)."""
        if self.tracking_uri is not None:
            return self.tracking_uri
        return default_tracking_uri(self.workdir) if isinstance(self.workdir, Path) else None

    @property
    def mlflow_uri(self) -> str:
        """The tracking (and registry) URI to talk to.

        Raises ValueError for a workdir on object storage given none, e.g. "s3://lab/work:
        a workdir on object storage has no embedded MLflow store; give --tracking-uri or
        MLFLOW_TRACKING_URI".
        """
        uri = self.tracking_store
        if uri is None:
            raise ValueError(
                f"{self.workdir}: a workdir on object storage has no embedded MLflow store; "
                "give --tracking-uri or MLFLOW_TRACKING_URI"
            )
        return uri

    def cluster(self, config: ClusterConfig) -> ClusterConfig:
        """A stage's cluster settings, pointed at the run's scheduler when it has one."""
        if self.scheduler_address is None:
            return config
        return config.model_copy(update={"scheduler_address": self.scheduler_address})

    def configure(self, config: ConfigT) -> ConfigT:
        """A stage's configuration with this run's services in it: the one rule for what a
        runtime decides over a stage. Of the fields a stage has, `cluster` is pointed at the
        run's scheduler, `tracking_uri` at its MLflow store and `workdir` at its workdir.

        Example: Runtime(workdir=Path("/w")).configure(InferConfig()).tracking_uri
        -> 'sqlite:////w/mlflow.db'.
        """
        fields = type(config).model_fields
        update: dict[str, object] = {}
        if "cluster" in fields:
            update["cluster"] = self.cluster(config.cluster)
        if "tracking_uri" in fields:
            update["tracking_uri"] = self.mlflow_uri
        if "workdir" in fields:
            update["workdir"] = self.workdir
        return config.model_copy(update=update)
