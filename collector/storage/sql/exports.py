"""Reads of the analysts' export (collector/export/): a scope's sessions with their
transfer facts and bodies, page by page, and the distinct (probe, UTC hour) pairs the
open-data mode counts probes per cell from.

Every read is keyset-paginated on the facts tables' primary key (probe_name, started_at,
result_id): each page is one short read of at most ``page`` sessions that seeks where the
last one stopped, so memory stays bounded by the page whatever the scope's size, no
cursor stays open between pages, and neither engine re-reads what an OFFSET would skip.

``received_before`` (every read takes it) leaves out the sessions the collector
received at or after that instant: the export pins it to its first run's start, so the
pages of a resumed run, and the open-data count and pages of one run, read the same
sessions whatever arrives meanwhile (a probe's spool delivers up to 30 days late). It is
one primary-key seek into ``results`` per session, bounded by the session's own start
time and the read's period: on PostgreSQL, whose ``results`` is partitioned by month on
started_at (partitions.py), the planner prunes to the read's months and each seek to the
session's month, instead of probing every month's index.

A session whose ``results`` row is absent is kept, facts only: on PostgreSQL a month's
``results`` partition may be detached for retention (partitions.py ``detach_month``)
while its facts stay attached and in every report, so the export keeps what the reports
count, with the columns only the body holds null (columns.py says so). Such a row cannot
say when it was received; it is older than any pin in practice (a month is detached
long after its sessions arrived).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from collector.compliance.facts import SessionFacts, TransferFact
from collector.storage import codec
from collector.storage.model import StoredResult
from collector.storage.sql.base import SqlBase, readable
from collector.storage.sql.facts import SESSION_FACT_COLUMNS, session_facts_of

# Sessions per page: with bodies (their stream samples left out: a few kB each, tens of kB
# with loaded ping trains) and transfer facts, a few MB to a few tens of MB of Python
# objects; the rows made from them go to the writer in bounded batches (export/run.py).
EXPORT_PAGE = 500
# Distinct (probe, hour) pairs per page of the open-data count.
HOUR_PAGE = 20_000


def _body_text(text: str, packed: Any) -> str:
    """A body's canonical JSON without the transfers' stream samples (which no exported
    column reads, and which are most of the decoding: codec.without_samples); a row an
    older release kept as text, as it is."""
    if packed is None:
        return text
    return codec.without_samples(bytes(packed)).decode()


def _received(where: str, params: list[Any], received_before: str | None,
              since: str | None, until: str | None) -> tuple[str, list[Any]]:
    """``where`` on session_facts, less the sessions received at or after
    ``received_before`` when given (module docstring). NOT EXISTS, not EXISTS of a row
    received before: a session with no readable results row (a detached month) stays.
    ``r.started_at`` equal to the session's lets PostgreSQL prune each seek to one
    month (run-time pruning), and the period's bounds let it prune the plan itself."""
    if received_before is None:
        return where, params
    bounds = ""
    extra: list[Any] = []
    if since is not None:
        bounds += " AND r.started_at >= ?"
        extra.append(since)
    if until is not None:
        bounds += " AND r.started_at < ?"
        extra.append(until)
    return (f"{where} AND NOT EXISTS (SELECT 1 FROM results r WHERE r.result_id = "
            "session_facts.result_id AND r.started_at = session_facts.started_at"
            f"{bounds} AND r.received_at >= ?)", [*params, *extra, received_before])


class ExportQueries(SqlBase):
    """The export's reads (collector/storage/store.py ``ExportStore``)."""

    def export_span(self, probes: Sequence[str] | None, since: str | None,
                    until: str | None, family: str | None = None,
                    received_before: str | None = None) -> tuple[str, str] | None:
        """The first and last start time of the sessions in scope; None when none."""
        where, params = _received(*self._scope(probes, since, until, family=family),
                                  received_before, since, until)
        with self._reading() as tx:
            row = tx.one(f"SELECT MIN(started_at), MAX(started_at) FROM session_facts "
                         f"WHERE {where}", params)
        if row is None or row[0] is None:
            return None
        return str(row[0]), str(row[1])

    def export_sessions(self, probes: Sequence[str] | None, since: str | None,
                        until: str | None, family: str | None = None,
                        page: int = EXPORT_PAGE, received_before: str | None = None
                        ) -> Iterator[list[tuple[SessionFacts, StoredResult | None]]]:
        """The sessions of a scope in pages of at most ``page``, by (probe, start time,
        result id): each one's facts (its transfers in their stored order) and its stored
        row, the body as canonical JSON without stream samples (None: no results row,
        e.g. its month detached on PostgreSQL: module docstring).
        A row whose time no reader can interpret is left out (unreadable.py)."""
        where, params = _received(*self._scope(probes, since, until, family=family),
                                  received_before, since, until)
        t_where, t_params = self._scope(probes, since, until, table="transfer_facts")
        after: tuple[str, str, str] | None = None
        while True:
            keyset = ""
            key_params: list[Any] = []
            if after is not None:
                keyset = " AND (probe_name, started_at, result_id) > (?, ?, ?)"
                key_params = list(after)
            with self._reading() as tx:
                rows = tx.rows(
                    f"SELECT {', '.join(SESSION_FACT_COLUMNS)} FROM session_facts "
                    f"WHERE {where}{keyset} ORDER BY probe_name, started_at, result_id "
                    "LIMIT ?", [*params, *key_params, page])
                if not rows:
                    return
                first = (rows[0][0], rows[0][1], rows[0][2])
                last = (rows[-1][0], rows[-1][1], rows[-1][2])
                clause, ids = self.dialect.in_list("result_id", [r[2] for r in rows])
                # The page's transfers: the same key range of the same primary key (the
                # index seek), and only the page's sessions. Without the id list a page
                # of a rare family (or past many sessions received after the pin) would
                # span, and load, the transfers of every other session in its range.
                transfers: dict[str, list[TransferFact]] = {}
                for rid, direction, ok, kbps in tx.rows(
                        "SELECT result_id, direction, ok, kbps FROM transfer_facts "
                        f"WHERE {t_where} AND {clause} "
                        "AND (probe_name, started_at, result_id) >= (?, ?, ?) "
                        "AND (probe_name, started_at, result_id) <= (?, ?, ?) "
                        "ORDER BY probe_name, started_at, result_id, seq",
                        [*t_params, ids, *first, *last]):
                    transfers.setdefault(rid, []).append(
                        TransferFact(direction, bool(ok), kbps))
                # The page's start times bound the read too: on PostgreSQL's results,
                # partitioned by month on started_at (partitions.py), the planner then
                # prunes to the page's months instead of probing every month's index.
                stored = {r[0]: r for r in tx.rows(
                    "SELECT result_id, probe_name, started_at, ended_at, received_at, body, "
                    f"body_packed, clock_skew_s FROM results WHERE {clause} "
                    "AND started_at >= ? AND started_at <= ?",
                    [ids, min(r[1] for r in rows), max(r[1] for r in rows)])}
            out: list[tuple[SessionFacts, StoredResult | None]] = []
            for row in rows:
                if not readable(row[2], row[1]):
                    continue
                facts = session_facts_of(row, transfers.get(row[2], ()))
                res = stored.get(row[2])
                out.append((facts, None if res is None else StoredResult(
                    res[0], res[1], res[2], res[3], res[4], _body_text(res[5], res[6]),
                    res[7])))
            yield out
            after = last
            if len(rows) < page:
                return

    def export_probe_hours(self, probes: Sequence[str] | None, since: str | None,
                           until: str | None, family: str | None = None,
                           page: int = HOUR_PAGE, received_before: str | None = None
                           ) -> Iterator[tuple[str, str]]:
        """Each distinct (probe, UTC hour "YYYY-MM-DDTHH") with a session in scope, by
        probe and hour; read in pages that seek past the last hour seen (one index range
        scan each)."""
        where, params = _received(*self._scope(probes, since, until, family=family),
                                  received_before, since, until)
        after: tuple[str, str] | None = None
        while True:
            keyset = ""
            key_params: list[Any] = []
            if after is not None:
                # "~" sorts after every character of a stored time: past the whole hour.
                keyset = " AND (probe_name, started_at) > (?, ?)"
                key_params = [after[0], after[1] + "~"]
            with self._reading() as tx:
                rows = tx.rows(
                    "SELECT DISTINCT probe_name, substr(started_at, 1, 13) FROM session_facts "
                    f"WHERE {where}{keyset} ORDER BY 1, 2 LIMIT ?",
                    [*params, *key_params, page])
            for probe, hour in rows:
                yield str(probe), str(hour)
            if len(rows) < page:
                return
            after = (str(rows[-1][0]), str(rows[-1][1]))
