"""Streaming writers of the exported files: a GeoJSON FeatureCollection and a measurement table.

Both take their rows chunk by chunk and hold none of the earlier ones, and both write through
`segcore.atomic.replacing`, so a reader never sees half a file.

The table is Parquet when pyarrow is importable (it ships with MLflow, so in every segflow
environment): typed columns, compressed, written one row group per batch, the provenance in the
schema metadata, and read by pandas, polars, R and Spark alike. Without pyarrow it is CSV, the
provenance on a first `# segflow: {...}` comment line.
"""

from __future__ import annotations

import csv
import json
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import IO

import numpy as np

from segcore.atomic import replacing

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:  # pragma: no cover - pyarrow comes with mlflow
    pa = pq = None

TABLE_SUFFIX = ".parquet" if pq is not None else ".csv"


class _Atomic(AbstractContextManager):
    """A file written at a temporary sibling that replaces `path` on a clean exit
    (`segcore.atomic.replacing`) and is removed otherwise."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._replacing = replacing(self.path)
        self.temporary = self._replacing.__enter__()

    def _close(self) -> None:
        raise NotImplementedError

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            self._close()
        finally:
            self._replacing.__exit__(kind, error, traceback)


class GeoJsonWriter(_Atomic):
    """A FeatureCollection written feature by feature; `properties` (top level: QuPath and
    GeoJSON readers ignore it) carries the provenance."""

    def __init__(self, path: Path, properties: dict) -> None:
        super().__init__(path)
        self._file: IO[str] = open(self.temporary, "w", encoding="utf-8")  # noqa: SIM115
        header = json.dumps({"type": "FeatureCollection", "properties": properties})
        self._file.write(header[:-1] + ', "features": [\n')
        self._first = True

    def write(self, features: list[str]) -> None:
        """Append features already encoded as JSON objects."""
        for feature in features:
            self._file.write(feature if self._first else ",\n" + feature)
            self._first = False

    def _close(self) -> None:
        self._file.write("\n]}\n")
        self._file.close()


class TableWriter(_Atomic):
    """Measurement rows in batches of columns (the same names every batch; the first batch,
    empty or not, fixes the columns)."""

    def __init__(self, path: Path, provenance: dict) -> None:
        super().__init__(path)
        self._provenance = json.dumps(provenance)
        self._parquet: pq.ParquetWriter | None = None
        self._csv: IO[str] | None = None
        self._rows: csv.writer | None = None
        self._names: list[str] | None = None

    def write(self, columns: dict[str, np.ndarray]) -> None:
        if self._names is None:
            self._names = list(columns)
            self._open(columns)
        if not len(columns["id"]):
            return
        if self._parquet is not None:
            self._parquet.write_table(pa.table(columns, schema=self._parquet.schema))
        else:
            self._rows.writerows(zip(*(columns[n].tolist() for n in self._names), strict=True))

    def _open(self, columns: dict[str, np.ndarray]) -> None:
        if pq is not None:
            schema = pa.table(columns).schema.with_metadata({"segflow": self._provenance})
            self._parquet = pq.ParquetWriter(self.temporary, schema)
            return
        self._csv = open(self.temporary, "w", newline="", encoding="utf-8")  # noqa: SIM115
        self._csv.write(f"# segflow: {self._provenance}\n")
        self._rows = csv.writer(self._csv)
        self._rows.writerow(self._names)

    def _close(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
        if self._csv is not None:
            self._csv.close()
