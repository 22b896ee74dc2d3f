"""One partition file of the export, written row batch by row batch to a temporary name
and renamed into place when complete (a reader, or a resumed export, never sees half a
partition): Parquet through Apache Arrow, or CSV under the collector's CSV convention
(collector/exports.py).

Parquet: zstd-compressed (level 3, zstd's default: the codec every reader named in the
issue decodes), row groups of at most ``ROW_GROUP`` rows, the column's unit and meaning in
each field's metadata, and the export and result schema versions in the file's key/value
metadata. Memory is bounded by rows, not sessions: rows arrive as dicts and are turned
into Arrow columns every ``BATCH`` rows, so at most ``BATCH`` dicts and one row group of
columnar data are held per table.

Durability: the file is fsync'ed before the rename and its directory after (POSIX leaves
a rename's data order to the file system: without both, a power loss can keep the new
name over missing blocks, the failure mode ALICE, OSDI 2014, found across applications).
``check`` lets a resumed export verify a partition the manifest says is finished.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from agent.schema import SCHEMA_VERSION
from collector.errors import StoreError
from collector.export.columns import EXPORT_SCHEMA_VERSION, TABLES, Column
from collector.exports import cell

ROW_GROUP = 50_000
BATCH = 4_096  # dicts held before they become Arrow columns
COMPRESSION = "zstd"
SUFFIX = {"parquet": ".parquet", "csv": ".csv"}

_ARROW_TYPES: Mapping[str, Any] = {
    "string": pa.string(), "int64": pa.int64(), "float64": pa.float64(),
    "bool": pa.bool_(), "timestamp": pa.timestamp("us", tz="UTC")}


def file_metadata(table: str, open_data: bool) -> dict[str, str]:
    """The key/value metadata of every Parquet file of the export."""
    return {"bbprobe.export_schema_version": EXPORT_SCHEMA_VERSION,
            "bbprobe.result_schema_version": str(SCHEMA_VERSION),
            "bbprobe.table": table, "bbprobe.open_data": "true" if open_data else "false"}


def arrow_schema(table: str, open_data: bool) -> pa.Schema:
    fields = [pa.field(c.name, _ARROW_TYPES[c.type], nullable=True,
                       metadata={"unit": c.unit, "meaning": c.meaning})
              for c in TABLES[table]]
    return pa.schema(fields, metadata=file_metadata(table, open_data))


def _timestamp(text: Any) -> datetime | None:
    # The store's "2026-05-01T10:00:12.345678Z" and open data's "2026-05-01T10:00Z" both
    # parse (Python 3.11's fromisoformat takes "Z" and a minute-only time).
    return None if text is None else datetime.fromisoformat(text)


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_replace(temp: Path, path: Path) -> None:
    """Rename a complete ``temp`` to ``path`` so that after a crash ``path`` is either
    the old file or all of the new one: the data first, then the rename, then the
    directory entry (reliability.md A2)."""
    fsync_path(temp)
    os.replace(temp, path)
    fsync_path(path.parent)


def check(path: Path, fmt: str, rows: int, size: int | None) -> bool:
    """Whether a finished partition is still whole: its size as recorded and, Parquet,
    a readable footer counting ``rows`` (a cheap read of the file's end); CSV, a last
    line that ends. False for a missing, truncated or otherwise changed file."""
    try:
        actual = path.stat().st_size
        if size is not None and actual != size:
            return False
        if fmt == "parquet":
            return bool(pq.read_metadata(path).num_rows == rows)
        if actual == 0:
            return False
        with path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"
    except (OSError, pa.ArrowException):
        return False


class PartitionWriter(Protocol):
    def write(self, rows: Sequence[Mapping[str, Any]]) -> None: ...

    def close(self) -> int:
        """Finish the file, rename it into place; the rows written."""

    def abort(self) -> None:
        """Remove the temporary file (the export stopped)."""


class _Temp:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.temp = path.with_name(f".{path.name}.tmp")
        self.rows = 0
        path.parent.mkdir(parents=True, exist_ok=True)

    def commit(self) -> int:
        try:
            durable_replace(self.temp, self.path)
        except OSError as exc:
            raise StoreError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        return self.rows

    def abort(self) -> None:
        self.temp.unlink(missing_ok=True)


class ParquetPartition(_Temp):
    """One table's partition as Parquet."""

    def __init__(self, path: Path, table: str, open_data: bool) -> None:
        super().__init__(path)
        self.columns: tuple[Column, ...] = TABLES[table]
        self.schema = arrow_schema(table, open_data)
        self.buffer: list[Mapping[str, Any]] = []  # at most BATCH dicts
        self.batches: list[pa.RecordBatch] = []  # the next row group, columnar
        self.pending = 0
        try:
            self.writer = pq.ParquetWriter(self.temp, self.schema, compression=COMPRESSION)
        except OSError as exc:
            raise StoreError(f"cannot write {self.temp}: {exc}") from None

    def write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        self.buffer.extend(rows)
        if len(self.buffer) >= BATCH:
            self._columnar()
            if self.pending >= ROW_GROUP:
                self._flush()

    def _columnar(self) -> None:
        if not self.buffer:
            return
        data = {}
        for c in self.columns:
            values = [r.get(c.name) for r in self.buffer]
            if c.type == "timestamp":
                values = [_timestamp(v) for v in values]
            data[c.name] = values
        self.batches.append(pa.RecordBatch.from_pydict(data, schema=self.schema))
        self.pending += len(self.buffer)
        self.buffer = []

    def _flush(self) -> None:
        self._columnar()
        if not self.batches:
            return
        table = pa.Table.from_batches(self.batches, schema=self.schema)
        # A row group of ROW_GROUP rows (the last one of a file may be smaller); what is
        # past it stays for the next group.
        groups = self.pending // ROW_GROUP * ROW_GROUP or self.pending
        self.writer.write_table(table.slice(0, groups), row_group_size=ROW_GROUP)
        rest = table.slice(groups)
        self.batches = rest.combine_chunks().to_batches() if rest.num_rows else []
        self.rows += groups
        self.pending -= groups

    def close(self) -> int:
        self._flush()
        if self.pending:
            self._flush()
        self.writer.close()
        return self.commit()

    def abort(self) -> None:
        self.writer.close()
        super().abort()


class CsvPartition(_Temp):
    """One table's partition as CSV, under collector/exports.py's convention (booleans
    true/false, times UTC to the second with Z, null as an empty cell)."""

    def __init__(self, path: Path, table: str) -> None:
        super().__init__(path)
        self.names = [c.name for c in TABLES[table]]
        self.file = self.temp.open("w", encoding="utf-8", newline="")
        self.writer = csv.writer(self.file, lineterminator="\n")
        self.writer.writerow(self.names)

    def write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        self.writer.writerows([cell(n, r.get(n)) for n in self.names] for r in rows)
        self.rows += len(rows)

    def close(self) -> int:
        self.file.close()
        return self.commit()

    def abort(self) -> None:
        self.file.close()
        super().abort()


def open_partition(fmt: str, path: Path, table: str, open_data: bool) -> PartitionWriter:
    if fmt == "parquet":
        return ParquetPartition(path, table, open_data)
    return CsvPartition(path, table)
