"""Copy a collector's store into another (``bbprobe-collector migrate --to URL``): SQLite
into PostgreSQL when a fleet outgrows one machine.

Every table is copied as it is, in key order (the primary key's, so each page is an index
range scan), page by page, each page in one transaction of the target: probes, token
digests (tokens keep working; no secret exists in clear), results with their facts and
day rollups, gaps, browser and ndt7 tests, and the InfluxDB outbox with its dead letters.
Rows are copied, not recomputed, so both stores give the same report to the last digit.

Resumable: after each page the last key copied is written to a checkpoint file (JSON,
replaced atomically), and a run that finds one for the same target goes on after it. A
row already in the target is left alone (``ON CONFLICT DO NOTHING``), so walking every row
again (``full``, or no checkpoint) is always safe, only slower. The checkpoint is deleted
once a copy is complete and checked.

Checked by the row count of every table (equal, not merely at least) and by the compliance
report of every probe, from both stores.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collector.storage.sql.copy import TABLES
from collector.storage.store import CopyStore


@dataclass(frozen=True, slots=True)
class TableCopy:
    table: str
    source_rows: int
    target_rows: int
    copied: int  # rows this run added

    @property
    def complete(self) -> bool:
        return self.target_rows == self.source_rows


@dataclass(slots=True)
class Checkpoint:
    """The last key copied per table, for one target; in a file, or only in memory."""

    target: str
    path: Path | None = None
    keys: dict[str, list[Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | None, target: str) -> Checkpoint:
        """The checkpoint in ``path`` if it is for ``target``; else a fresh one (an
        unreadable file is not trusted: the copy then walks every row)."""
        if path is not None:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if data.get("target") == target and isinstance(data.get("keys"), dict):
                    return cls(target, path, {k: list(v) for k, v in data["keys"].items()
                                              if k in TABLES and isinstance(v, list)})
            except (OSError, ValueError, AttributeError):
                pass
        return cls(target, path)

    def save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"target": self.target, "keys": self.keys}),
                       encoding="utf-8")
        os.replace(tmp, self.path)

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def copy_store(source: CopyStore, target: CopyStore, *, page: int = 2000, full: bool = False,
               checkpoint: Checkpoint | None = None,
               progress: Callable[[str, int], None] | None = None) -> list[TableCopy]:
    """Copy every table of ``source`` into ``target``; one TableCopy per table."""
    mark = checkpoint or Checkpoint(target.describe)
    out = []
    for table, (key, columns) in TABLES.items():
        index = [columns.index(k) for k in key]
        start = None if full else mark.keys.get(table)
        copied = 0
        for rows in iterate_pages(source, table, page, start):
            copied += target.load(table, rows)
            mark.keys[table] = [rows[-1][i] for i in index]
            mark.save()
            if progress is not None:
                progress(table, copied)
        target.after_load(table)
        out.append(TableCopy(table, source.count(table), target.count(table), copied))
    return out


def iterate_pages(source: CopyStore, table: str, page: int,
                  after: Sequence[Any] | None = None) -> Iterator[list[tuple[Any, ...]]]:
    """Pages of ``table`` in key order after ``after`` (copying a store)."""
    key, columns = TABLES[table]
    index = [columns.index(k) for k in key]
    while True:
        rows = source.dump(table, after, page)
        if not rows:
            return
        yield rows
        after = [rows[-1][i] for i in index]
