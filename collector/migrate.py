"""Copy a collector's store into another (``bbprobe-collector migrate --to URL``): SQLite
into PostgreSQL when a fleet outgrows one machine.

Every table is copied as it is, in key order, page by page, each page in one transaction
of the target: probes, token digests (tokens keep working; no secret exists in clear),
results with their facts and day rollups, gaps, browser and ndt7 tests, and the InfluxDB
outbox with its dead letters. Rows are copied, not recomputed, so both stores give the
same report to the last digit.

Resumable: a page already in the target is skipped (``ON CONFLICT DO NOTHING``), and a run
starts each table after the highest key the target holds, so a copy that was interrupted
goes on where it stopped. That shortcut assumes the source did not get rows with lower
keys meanwhile (stop the collector first, as the README says); ``full=True`` walks every
row again instead.

Checked by counts per table and by the compliance report of every probe from both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from collector.storage.sql import TABLES, iterate_pages
from collector.storage.store import Store


@dataclass(frozen=True, slots=True)
class TableCopy:
    table: str
    source_rows: int
    target_rows: int
    copied: int  # rows this run added

    @property
    def complete(self) -> bool:
        return self.target_rows >= self.source_rows


def copy_store(source: Store, target: Store, *, page: int = 2000, full: bool = False,
               progress: Callable[[str, int], None] | None = None) -> list[TableCopy]:
    """Copy every table of ``source`` into ``target``; one TableCopy per table."""
    out = []
    for table in TABLES:
        start = None if full else target.last_key(table)
        copied = 0
        for rows in iterate_pages(source, table, page, start):
            copied += target.load(table, rows)
            if progress is not None:
                progress(table, copied)
        target.after_load(table)
        out.append(TableCopy(table, source.count(table), target.count(table), copied))
    return out
