"""The store's queries, written once for every SQL backend (SQLite and PostgreSQL).

A backend (sqlite.py, postgres.py) opens connections, runs its own migrations and says
how it runs a transaction; everything a query means is here, so both backends store and
answer alike (the conformance suite, tests/collector/test_conformance.py, holds them to it).
Queries are written with ``?`` placeholders and the SQL both engines share: upserts with
``ON CONFLICT``, ``RETURNING``, ``CAST``, ``substr``. The few differences are ``Dialect``
fields.

Arithmetic over rows (the day rollup, RTT moments, counts) is in
collector/compliance/rollup.py, in Python: a database's float sums depend on the order
it reads rows in, and the report must not depend on the engine.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields
from datetime import date, timedelta
from functools import lru_cache
from typing import Any, Protocol, TypeVar

import orjson

from agent.schema import BPS_LIMIT, parse_result, parse_utc
from agent.stats import Moments
from collector import unreadable
from collector.compliance import rollup
from collector.compliance.evaluate import Observations
from collector.compliance.facts import SessionFacts, TransferFact
from collector.compliance.rollup import DayRollup
from collector.errors import AlreadyExists, StoreError
from collector.storage import codec
from collector.storage.model import (
    AlertDelivery,
    HourRow,
    InsertOutcome,
    LineMetadata,
    NewResult,
    Probe,
    Quota,
    StoredResult,
)

T = TypeVar("T")

# The anonymous tables are pruned every PRUNE_EVERY inserts a store makes (per process:
# with N collector processes a table may run over its cap by N x PRUNE_EVERY rows until
# the next pass, and the hourly pass applies the quota whatever the count).
PRUNE_EVERY = 64

LINE_COLUMNS = tuple(f.name for f in fields(LineMetadata))
PROBE_COLUMNS = ("name", "created_at", "revoked_at", *LINE_COLUMNS)
DAY_COLUMNS = ("probe_name", "day", "sessions", "pings_sent", "pings_lost", "rtt_n",
               "rtt_mean_ms", "rtt_m2", "download_attempts", "download_failed",
               "upload_attempts", "upload_failed", "download_kbps", "upload_kbps",
               "invalid_sessions", "invalid_codes", "jitter_sum_ns", "jitter_pairs",
               "refused_servers")


class Cursor(Protocol):
    """What both DB-API drivers' cursors give (sqlite3, psycopg)."""

    @property
    def rowcount(self) -> int: ...

    def execute(self, sql: Any, params: Any = ...) -> Any: ...

    def executemany(self, sql: Any, params: Any) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def fetchone(self) -> Any: ...


@dataclass(frozen=True, slots=True)
class Dialect:
    """What differs between the engines, in the queries this module writes."""

    name: str
    # Placeholder of the driver: "?" (sqlite3) or "%s" (psycopg).
    placeholder: str
    # "LIMIT <none>" before an OFFSET: SQLite has no LIMIT ALL.
    no_limit: str
    # Row locks for a read-modify-write (PostgreSQL; SQLite's writer lock covers it).
    for_update: str
    # Lease rows that another process has locked: skip them (PostgreSQL).
    skip_locked: str
    # The exception types of a UNIQUE or PRIMARY KEY violation.
    integrity_errors: tuple[type[BaseException], ...]
    # A clause restricting ``column`` to a list given as one parameter, and that
    # parameter: SQLite reads a JSON array with json_each, PostgreSQL takes an array.
    in_list: Callable[[str, Sequence[Any]], tuple[str, Any]]
    # With no probe named: a clause that still names every probe (SQLite's planner then
    # walks the clustered key), or "" (PostgreSQL plans the plain range better).
    every_probe: str
    # Results in the driver's binary format (PostgreSQL: no hex decoding of the day
    # rollups' packed speeds; about a third less time reading them).
    binary_results: bool = False

    def sql(self, text: str) -> str:
        return _translate(text, self.placeholder)


@lru_cache(maxsize=512)
def _translate(text: str, placeholder: str) -> str:
    if placeholder == "?":
        return text
    return text.replace("%", "%%").replace("?", placeholder)


class Tx:
    """One connection inside a transaction (or autocommit reads), with the dialect's
    placeholders; rows come back as plain tuples."""

    __slots__ = ("_conn", "_dialect")

    def __init__(self, conn: Any, dialect: Dialect) -> None:
        self._conn = conn
        self._dialect = dialect

    def _cursor(self) -> Cursor:
        cursor: Cursor = self._conn.cursor(binary=True) if self._dialect.binary_results \
            else self._conn.cursor()
        return cursor

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cursor = self._cursor()
        cursor.execute(self._dialect.sql(sql), params)
        rows: list[tuple[Any, ...]] = cursor.fetchall()  # tuples from both drivers
        return rows

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        cursor = self._cursor()
        cursor.execute(self._dialect.sql(sql), params)
        row = cursor.fetchone()
        return None if row is None else tuple(row)

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Execute; the number of rows changed."""
        cursor = self._cursor()
        cursor.execute(self._dialect.sql(sql), params)
        return int(cursor.rowcount)

    def many(self, sql: str, seq: Sequence[Sequence[Any]]) -> None:
        if seq:
            self._cursor().executemany(self._dialect.sql(sql), seq)


# A probe's newest rows are read a few deep: a row no reader can interpret (a time an
# older release stored as "999-06-01T...", which sorts after "2026-" as text) is passed
# over, and the newest readable one is the probe's latest (issue 23, finding 1).
_LOOK_PAST = 8


def _readable(result_id: str, *times: object) -> bool:
    """True if every stored time of a result row is in the collector's own form; else
    the row is counted and named as unreadable (collector/unreadable.py)."""
    bad = [t for t in times if not unreadable.canonical_time(t)]
    if not bad:
        return True
    unreadable.skipped("results", result_id, f"stored time {bad[0]!r} is not ISO 8601 UTC")
    return False


class SqlStore:
    """The collector's master copy of every probe and result, over one SQL backend.

    Subclasses give ``dialect``, ``_reading()`` and ``_transaction(fn)``; every public
    method is synchronous (the web app runs them on database threads)."""

    dialect: Dialect
    outbox: bool
    # How many threads may call this store at once (1: SQLite's single connection).
    concurrency: int = 1
    describe: str = "database"

    def __init__(self) -> None:
        self._inserts: dict[str, int] = {}
        self._lock = threading.Lock()

    # --- what a backend provides -----------------------------------------------------------

    def _reading(self) -> AbstractContextManager[Tx]:
        raise NotImplementedError

    def _transaction(self, fn: Callable[[Tx], T]) -> T:
        """Run ``fn`` in one write transaction (retried by the backend where the engine
        may abort it for a deadlock), committed when it returns."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    @property
    def schema_version(self) -> int:
        raise NotImplementedError

    def size_bytes(self) -> int:
        """The database's size on disk."""
        raise NotImplementedError

    def after_load(self, table: str) -> None:
        """Called after ``load`` filled ``table`` (a backend may fix up sequences)."""

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._reading() as tx:
            return tx.rows(sql, params)

    def _count(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self._reading() as tx:
            row = tx.one(sql, params)
        return int(row[0]) if row and row[0] is not None else 0

    # --- probes and tokens -----------------------------------------------------------------

    def add_probe(self, name: str, token_sha256: str, created_at: str,
                  line: LineMetadata) -> None:
        values = [getattr(line, c) for c in LINE_COLUMNS]
        try:
            self._transaction(lambda tx: tx.run(
                f"INSERT INTO probes (name, token_sha256, created_at, "
                f"{', '.join(LINE_COLUMNS)}) "
                f"VALUES (?, ?, ?, {', '.join('?' * len(LINE_COLUMNS))})",
                [name, token_sha256, created_at, *values]))
        except self.dialect.integrity_errors:
            raise AlreadyExists(f"a probe named {name!r} already exists", "probe_id") from None

    def revoke_probe(self, name: str, revoked_at: str) -> bool:
        return self._revoke("probes", name, revoked_at)

    def update_line(self, name: str, changes: Mapping[str, Any]) -> bool:
        """Change some of a probe's line metadata (the offer changed); False if there is
        no such probe."""
        unknown = set(changes) - set(LINE_COLUMNS)
        if unknown:
            raise ValueError(f"not line metadata: {sorted(unknown)}")
        if not changes:
            return self.probe(name) is not None
        names = sorted(changes)
        return self._transaction(lambda tx: tx.run(
            f"UPDATE probes SET {', '.join(f'{n} = ?' for n in names)} WHERE name = ?",
            [*(changes[n] for n in names), name])) == 1

    def _revoke(self, table: str, name: str, revoked_at: str) -> bool:
        """Revoke a live probe or token; False when there is none of that name."""
        return self._transaction(lambda tx: tx.run(
            f"UPDATE {table} SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
            (revoked_at, name))) == 1

    def add_token(self, name: str, role: str, token_sha256: str, created_at: str) -> None:
        try:
            self._transaction(lambda tx: tx.run(
                "INSERT INTO tokens (name, role, token_sha256, created_at, revoked_at) "
                "VALUES (?, ?, ?, ?, NULL)", (name, role, token_sha256, created_at)))
        except self.dialect.integrity_errors:
            raise AlreadyExists(f"a token named {name!r} already exists", "name") from None

    def revoke_token(self, name: str, revoked_at: str) -> bool:
        return self._revoke("tokens", name, revoked_at)

    def tokens(self) -> list[dict[str, Any]]:
        keys = ("name", "role", "created_at", "revoked_at")
        return [dict(zip(keys, r, strict=True)) for r in self._read(
            "SELECT name, role, created_at, revoked_at FROM tokens ORDER BY name")]

    def role_for_token(self, token_sha256: str) -> tuple[str, str] | None:
        """(role, name) of a live analyst/admin token, or ("probe", name) of a probe's."""
        with self._reading() as tx:
            row = tx.one("SELECT role, name FROM tokens WHERE token_sha256 = ? AND "
                         "revoked_at IS NULL", (token_sha256,))
        if row is not None:
            return str(row[0]), str(row[1])
        probe = self.probe_for_token(token_sha256)
        return ("probe", probe.name) if probe is not None else None

    def probe_for_token(self, token_sha256: str) -> Probe | None:
        rows = self._read(f"SELECT {', '.join(PROBE_COLUMNS)} FROM probes "
                          "WHERE token_sha256 = ? AND revoked_at IS NULL", (token_sha256,))
        return _probe(rows[0]) if rows else None

    def probe(self, name: str) -> Probe | None:
        rows = self._read(f"SELECT {', '.join(PROBE_COLUMNS)} FROM probes WHERE name = ?",
                          (name,))
        return _probe(rows[0]) if rows else None

    def probes(self) -> list[Probe]:
        return [_probe(r) for r in self._read(
            f"SELECT {', '.join(PROBE_COLUMNS)} FROM probes ORDER BY name")]

    # --- results ---------------------------------------------------------------------------

    def insert_result(self, **item: Any) -> InsertOutcome:
        """Store one result (see ``insert_results``)."""
        return self.insert_results([NewResult(**item)])[0]

    def insert_results(self, items: Sequence[NewResult]) -> list[InsertOutcome]:
        """Store results and their facts once each, in one transaction (one fsync for a
        batch). Same id and content again: "duplicate" (nothing written); same id with
        other content: "conflict". Safe against the same result arriving at two
        collector processes at once: the second insert waits for the first's commit,
        then finds the row."""
        return self._transaction(lambda tx: self._insert_results(tx, items))

    def _insert_results(self, tx: Tx, items: Sequence[NewResult]) -> list[InsertOutcome]:
        outcomes: list[InsertOutcome] = ["duplicate"] * len(items)
        stored: list[tuple[int, NewResult]] = []
        # In result_id order: two processes inserting overlapping batches take the unique
        # keys in the same order and so cannot deadlock on them.
        for index, item in sorted(enumerate(items), key=lambda pair: pair[1].result_id):
            packed = item.packed
            added = tx.run(
                "INSERT INTO results (result_id, probe_name, schema_version, started_at, "
                "ended_at, received_at, body_sha256, body, body_packed, clock_skew_s, "
                "session_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (result_id) DO NOTHING",
                (item.result_id, item.probe_name, item.schema_version, item.started_at,
                 item.ended_at, item.received_at, item.body_sha256,
                 "" if packed is not None else item.body, packed, item.clock_skew_s,
                 item.session_seq))
            if not added:
                row = tx.one("SELECT body_sha256, body, body_packed FROM results "
                             "WHERE result_id = ?", (item.result_id,))
                # A packed row's hash is of today's canonical form: another hash is
                # other content. Only a row an older release stored as text is
                # compared by content (one parse of it, on this rare path).
                same = row is not None and (row[0] == item.body_sha256 or (
                    row[2] is None and _same_document(row[1], item.body)))
                outcomes[index] = "duplicate" if same else "conflict"
                continue
            insert_session_facts(tx, item.facts, item.probe_name)
            if self.outbox:
                tx.run("INSERT INTO influx_outbox (result_id, queued_at) VALUES (?, ?)",
                       (item.result_id, item.received_at))
            outcomes[index] = "stored"
            stored.append((index, item))
        # Day rows are locked in one order (probe, day) whatever the batch's order, so
        # two processes merging into the same days cannot deadlock. Sessions of one day
        # merge in the batch's order (stable sort, from arrival order).
        for _index, item in sorted(stored, key=lambda pair: (
                pair[1].probe_name, rollup.day_of(pair[1].facts.started_at), pair[0])):
            add_to_day(tx, item.probe_name, item.facts, self.dialect.for_update)
        return outcomes

    def insert_gap(self, gap_id: str, probe_name: str, received_at: str, reason: str,
                   dropped: int, first: str, last: str, body_sha256: str,
                   seq_ranges: Sequence[tuple[int, int]] = ()) -> InsertOutcome:
        def work(tx: Tx) -> InsertOutcome:
            added = tx.run(
                "INSERT INTO gaps (gap_id, probe_name, received_at, reason, dropped, "
                "first_started_at, last_started_at, body_sha256, seq_ranges) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (gap_id) DO NOTHING",
                (gap_id, probe_name, received_at, reason, dropped, first, last, body_sha256,
                 json.dumps([list(r) for r in seq_ranges])))
            if added:
                return "stored"
            row = tx.one("SELECT body_sha256 FROM gaps WHERE gap_id = ?", (gap_id,))
            return "duplicate" if row is not None and row[0] == body_sha256 else "conflict"

        return self._transaction(work)

    def session_seqs(self, probes: Sequence[str] | None, since: str | None,
                     until: str | None) -> list[tuple[str, int, str]]:
        """(probe, session_seq, started_at) of every numbered result in scope."""
        where, params = self._scope(probes, since, until)
        return [(r[0], int(r[1]), r[2]) for r in self._read(
            "SELECT probe_name, session_seq, started_at, result_id FROM results "
            f"WHERE {where} AND session_seq IS NOT NULL ORDER BY probe_name, session_seq",
            params) if _readable(r[3], r[2])]

    def seqs_before(self, probes: Sequence[str] | None, since: str | None) -> dict[str, int]:
        """Each probe's highest session_seq delivered before ``since`` (none: {})."""
        if since is None:
            return {}
        where, params = self._scope(probes, None, since)
        return {r[0]: int(r[1]) for r in self._read(
            f"SELECT probe_name, MAX(session_seq) FROM results WHERE {where} AND "
            "session_seq IS NOT NULL GROUP BY probe_name", params)}

    def gap_seq_ranges(self, probes: Sequence[str] | None) -> dict[str, list[tuple[int, int]]]:
        """Every gap record's dropped sequence numbers, by probe."""
        where, params = self._scope(probes, None, None)
        out: dict[str, list[tuple[int, int]]] = {}
        for probe, ranges in self._read(
                f"SELECT probe_name, seq_ranges FROM gaps WHERE {where} "
                "ORDER BY probe_name, first_started_at, gap_id", params):
            out.setdefault(probe, []).extend((int(a), int(b)) for a, b in json.loads(ranges))
        # Results an operator removed (`result delete`) are documented too, not missing.
        for probe, seq in self._read(
                f"SELECT probe_name, session_seq FROM result_deletions WHERE {where} "
                "AND session_seq IS NOT NULL ORDER BY probe_name, session_seq", params):
            out.setdefault(probe, []).append((int(seq), int(seq)))
        return out

    GAP_KEYS = ("gap_id", "probe_id", "received_at", "reason", "dropped",
                "first_started_at", "last_started_at")

    def gaps(self, probes: Sequence[str] | None = None, since: str | None = None,
             until: str | None = None) -> list[dict[str, Any]]:
        """Gap records overlapping [since, until), oldest first."""
        where, params = self._scope(probes, None, None)
        if since is not None:
            where += " AND last_started_at >= ?"
            params.append(since)
        if until is not None:
            where += " AND first_started_at < ?"
            params.append(until)
        return [dict(zip(self.GAP_KEYS, r, strict=True)) for r in self._read(
            "SELECT gap_id, probe_name, received_at, reason, dropped, first_started_at, "
            f"last_started_at FROM gaps WHERE {where} ORDER BY first_started_at, gap_id",
            params)]

    def results(self, probes: Sequence[str] | None = None, since: str | None = None,
                until: str | None = None, limit: int | None = None,
                family: str | None = None) -> list[StoredResult]:
        """Results by start time, oldest first; ``since`` inclusive, ``until`` exclusive."""
        where, params = self._scope(probes, since, until, named_only=True, family=family,
                                    table="results")
        tail = ""
        if limit is not None:
            tail = " LIMIT ?"
            params.append(limit)
        return [_stored(row) for row in self._read(
            "SELECT result_id, probe_name, started_at, ended_at, received_at, body, "
            f"body_packed, clock_skew_s FROM results WHERE {where} "
            f"ORDER BY started_at, result_id{tail}", params)]

    def pack_text_bodies(self, after: str, limit: int) -> tuple[int, int, str | None]:
        """Pack up to ``limit`` bodies that rows from before issue 14 keep as text, in
        result id order after ``after``: (packed, left as text, the last id seen, or
        None when no row is left). A body the current schema cannot read stays text,
        as it was. The hash follows the body to its canonical form of today, so a
        resent result is a plain duplicate. The rows are read and packed outside any
        transaction; the write is one short transaction, and leaves alone a row that
        changed meanwhile."""
        rows = self._read("SELECT result_id, body, body_sha256 FROM results "
                          "WHERE result_id > ? AND body_packed IS NULL "
                          "ORDER BY result_id LIMIT ?", (after, limit))
        updates: list[tuple[bytes, str, str, str]] = []
        kept = 0
        for result_id, body, digest in rows:
            try:
                result = parse_result(orjson.loads(body))
                canonical = codec.canonical(result)
                stored = codec.pack(result)
            except (ValueError, TypeError):  # SchemaError, orjson's errors
                kept += 1
                continue
            updates.append((stored, hashlib.sha256(canonical).hexdigest(), result_id, digest))

        def work(tx: Tx) -> int:
            return sum(tx.run("UPDATE results SET body = '', body_packed = ?, "
                              "body_sha256 = ? WHERE result_id = ? AND body_sha256 = ? "
                              "AND body_packed IS NULL", u) for u in updates)

        packed = self._transaction(work) if updates else 0
        return packed, kept, (rows[-1][0] if rows else None)

    def result(self, result_id: str) -> StoredResult | None:
        rows = self._read(
            "SELECT result_id, probe_name, started_at, ended_at, received_at, body, "
            "body_packed, clock_skew_s FROM results WHERE result_id = ?", (result_id,))
        return _stored(rows[0]) if rows else None

    def delete_result(self, result_id: str, reason: str, deleted_at: str,
                      deleted_by: str) -> dict[str, Any] | None:
        """Remove a stored result with its facts and outbox entries, rebuild its day's
        rollup from the sessions left, and append who-what-why to result_deletions, in
        one transaction (issue 23: an operator's way out of a poisoned row). None if no
        such result. Its session_seq counts as documented in completeness from then on
        (``gap_seq_ranges``): removed on purpose, not lost."""
        def work(tx: Tx) -> dict[str, Any] | None:
            row = tx.one("SELECT probe_name, started_at, body_sha256, session_seq FROM results "
                         f"WHERE result_id = ? {self.dialect.for_update}", (result_id,))
            if row is None:
                return None
            probe, started, digest, seq = row
            tx.run("INSERT INTO result_deletions (result_id, probe_name, started_at, "
                   "session_seq, body_sha256, deleted_at, deleted_by, reason) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (result_id, probe, started, seq, digest, deleted_at, deleted_by, reason))
            for table in ("transfer_facts", "session_facts", "influx_outbox",
                          "influx_dead_letters", "results"):
                tx.run(f"DELETE FROM {table} WHERE result_id = ?", (result_id,))
            rebuild_day(tx, probe, rollup.day_of(started), self.dialect.for_update,
                        refill=unreadable.canonical_time(started))
            return {"result_id": result_id, "probe_id": probe, "started_at": started,
                    "session_seq": seq, "body_sha256": digest, "deleted_at": deleted_at,
                    "deleted_by": deleted_by, "reason": reason}
        return self._transaction(work)

    def result_deletions(self) -> list[dict[str, Any]]:
        """The audit of ``delete_result``, newest first."""
        return [{"result_id": r[0], "probe_id": r[1], "started_at": r[2],
                 "session_seq": r[3], "body_sha256": r[4], "deleted_at": r[5],
                 "deleted_by": r[6], "reason": r[7]}
                for r in self._read("SELECT result_id, probe_name, started_at, session_seq, "
                                    "body_sha256, deleted_at, deleted_by, reason "
                                    "FROM result_deletions ORDER BY id DESC")]

    def count_results(self) -> int:
        return self._count("SELECT COUNT(*) FROM results")

    def count(self, table: str) -> int:
        """Rows of one of the store's tables (migrate checks its copy with it)."""
        if table not in TABLES:
            raise StoreError(f"no table {table!r}")
        return self._count(f"SELECT COUNT(*) FROM {table}")

    # --- facts: what evaluation reads instead of the bodies ----------------------------------

    def _scope(self, probes: Sequence[str] | None, since: str | None, until: str | None,
               column: str = "started_at", named_only: bool = False,
               family: str | None = None, table: str = "session_facts"
               ) -> tuple[str, list[Any]]:
        """WHERE clause over a facts table. Probes go as one parameter (a JSON array or
        an array), so a scope of thousands of probes stays one statement. ``family``
        ("ipv4"/"ipv6", issue 16) keeps the sessions measured over it, by their
        session_facts row (a session of unknown family, schema < 6, matches neither)."""
        clauses: list[str] = []
        params: list[Any] = []
        if probes is not None:
            clause, param = self.dialect.in_list("probe_name", probes)
            clauses.append(clause)
            params.append(param)
        elif self.dialect.every_probe and not named_only:
            clauses.append(self.dialect.every_probe)
        if since is not None:
            clauses.append(f"{column} >= ?")
            params.append(since)
        if until is not None:
            clauses.append(f"{column} < ?")
            params.append(until)
        if family is not None:
            # On session_facts, its own column; on another table (keyed by result_id),
            # that result's session row, one index seek each (never a scan of every
            # session of the family).
            clauses.append("address_family = ?" if table == "session_facts" else
                           "EXISTS (SELECT 1 FROM session_facts sf WHERE sf.result_id = "
                           f"{table}.result_id AND sf.address_family = ?)")
            params.append(family)
        return " AND ".join(clauses) or "1 = 1", params

    def observations(self, probes: Sequence[str] | None = None, since: str | None = None,
                     until: str | None = None, include_invalid: bool = False,
                     family: str | None = None) -> Observations:
        """The evaluator's input for a scope: counts, RTT moments and every per-test speed
        (percentiles need the values). Whole UTC days come from the day rollup, the
        partial days at either end from the session rows; both hold the same samples.
        Sessions the agent flagged invalid are left out unless ``include_invalid`` (which
        reads every session row), and counted apart."""
        obs = Observations(invalid_included=include_invalid)
        # The day rollup does not split by family: one family reads the session rows.
        days = None if include_invalid or family else rollup.whole_days(since, until)
        with self._reading() as tx:
            if days is None:
                self._observe_sessions(tx, obs, probes, since, until, family)
                return obs
            lo, hi = days
            rollup.observe_days(obs, self._days(tx, probes, lo and lo[:10], hi and hi[:10]))
            if since is not None and lo is not None and since < lo:
                self._observe_sessions(tx, obs, probes, since, lo)
            if until is not None and hi is not None and hi < until:
                self._observe_sessions(tx, obs, probes, hi, until)
        return obs

    def _observe_sessions(self, tx: Tx, obs: Observations, probes: Sequence[str] | None,
                          since: str | None, until: str | None,
                          family: str | None = None) -> None:
        where, params = self._scope(probes, since, until, family=family)
        t_where, t_params = self._scope(probes, since, until, family=family,
                                        table="transfer_facts")
        # Plain tuples straight from the driver (rollup.SessionRow, TransferRow).
        sessions = tx.rows(
            "SELECT pings_sent, pings_lost, rtt_n, rtt_mean_ms, rtt_m2, valid, invalid_codes "
            f"FROM session_facts WHERE {where} ORDER BY probe_name, started_at, result_id",
            params)
        transfers = tx.rows(
            f"SELECT direction, ok, kbps, valid FROM transfer_facts WHERE {t_where} "
            "ORDER BY probe_name, started_at, result_id, seq", t_params)
        rollup.observe_sessions(obs, sessions, transfers)
        # Jitter terms are integers (ns): the database sums them exactly, and the row
        # loop above (millions of rows) carries two columns fewer.
        counted = "" if obs.invalid_included else " AND valid = 1"
        total = tx.one("SELECT COALESCE(SUM(jitter_sum_ns), 0), COALESCE(SUM(jitter_pairs), 0) "
                       f"FROM session_facts WHERE {where}{counted}", params)
        if total is not None:
            obs.jitter_sum_ns += int(total[0])
            obs.jitter_pairs += int(total[1])
        # Attempts the measurement server refused, per server, of every session valid or
        # not (as the day rollup counts them: rollup.add_session); integers again.
        for server, refused in tx.rows(
                "SELECT refused_server, SUM(refused_attempts) FROM session_facts "
                f"WHERE {where} AND refused_attempts > 0 GROUP BY refused_server", params):
            obs.add_refused(server or "", int(refused))

    def _days(self, tx: Tx, probes: Sequence[str] | None, day_lo: str | None,
              day_hi: str | None) -> list[DayRollup]:
        where, params = self._scope(probes, day_lo, day_hi, column="day")
        return [_day(r) for r in tx.rows(
            f"SELECT {', '.join(DAY_COLUMNS)} FROM day_facts WHERE {where} "
            "ORDER BY probe_name, day", params)
            if _readable(f"{r[0]} {r[1]}", f"{r[1]}T00:00:00.000000Z")]

    def day_rollups(self, probes: Sequence[str] | None = None, day_lo: str | None = None,
                    day_hi: str | None = None) -> list[DayRollup]:
        """The day rollups of [day_lo, day_hi) (YYYY-MM-DD), by probe and day."""
        with self._reading() as tx:
            return self._days(tx, probes, day_lo, day_hi)

    def facts(self, probes: Sequence[str] | None = None, since: str | None = None,
              until: str | None = None, family: str | None = None) -> list[SessionFacts]:
        """Every session's facts in scope, by start time (a line's campaign)."""
        with self._reading() as tx:
            return self._facts(tx, probes, since, until, family)

    def _facts(self, tx: Tx, probes: Sequence[str] | None, since: str | None,
               until: str | None, family: str | None = None) -> list[SessionFacts]:
        where, params = self._scope(probes, since, until, family=family)
        t_where, t_params = self._scope(probes, since, until, family=family,
                                        table="transfer_facts")
        return _facts_where(tx, where, params, t_where, t_params)

    def hourly(self, probes: Sequence[str] | None = None, since: str | None = None,
               until: str | None = None, include_invalid: bool = False,
               family: str | None = None) -> list[HourRow]:
        """Per UTC hour: sessions, pings, RTT sum and per-direction speed sums (plots of
        any scope size, collector/reports/plots.py); valid sessions only unless asked. The sums
        are the database's (plots only; no verdict rests on them)."""
        where, params = self._scope(probes, since, until, family=family)
        t_where, t_params = self._scope(probes, since, until, family=family,
                                        table="transfer_facts")
        if not include_invalid:
            where += " AND valid = 1"
            t_where += " AND valid = 1"
        rows: dict[str, HourRow] = {}
        with self._reading() as tx:
            for hour, sessions, sent, lost, n, rtt_sum, jsum, jpairs in tx.rows(
                    "SELECT substr(started_at, 1, 13), COUNT(*), SUM(pings_sent), "
                    "SUM(pings_lost), SUM(rtt_n), SUM(rtt_n * rtt_mean_ms), "
                    "SUM(jitter_sum_ns), SUM(jitter_pairs) "
                    f"FROM session_facts WHERE {where} GROUP BY 1 ORDER BY 1", params):
                rows[hour] = HourRow(hour, int(sessions), int(sent), int(lost), int(n),
                                     float(rtt_sum), jitter_sum_ns=int(jsum or 0),
                                     jitter_pairs=int(jpairs or 0))
            for hour, direction, count, total in tx.rows(
                    "SELECT substr(started_at, 1, 13), direction, COUNT(*), SUM(kbps) "
                    f"FROM transfer_facts WHERE {t_where} AND ok = 1 AND kbps IS NOT NULL "
                    "GROUP BY 1, 2", t_params):
                row = rows.setdefault(hour, HourRow(hour))
                if direction == "download":
                    row.download_n, row.download_kbps_sum = int(count), float(total)
                else:
                    row.upload_n, row.upload_kbps_sum = int(count), float(total)
        return [rows[h] for h in sorted(rows)
                if _readable(f"hour {h}", f"{h}:00:00.000000Z")]

    # --- InfluxDB outbox ------------------------------------------------------------------

    def outbox_lease(self, owner: str, limit: int, now: str,
                     until: str) -> list[tuple[str, str, LineMetadata]]:
        """Lease the oldest ``limit`` queued results that no other live lease holds, to
        ``owner`` until ``until``; return them as (result_id, body, line). The owner's own
        leases are taken again (a write that failed is retried with the same rows). With many
        collector processes each row goes to one of them (PostgreSQL skips the rows
        another is leasing); a process that dies leaves its lease to expire. Bodies are
        decoded by the caller, one at a time, so one that fails is set apart alone."""
        def work(tx: Tx) -> list[tuple[str, str, LineMetadata]]:
            seqs = [int(r[0]) for r in tx.rows(
                "SELECT seq FROM influx_outbox WHERE leased_until IS NULL OR "
                "leased_until < ? OR lease_owner = ? "
                f"ORDER BY seq LIMIT ? {self.dialect.skip_locked}", (now, owner, limit))]
            if not seqs:
                return []
            clause, param = self.dialect.in_list("seq", seqs)
            tx.run(f"UPDATE influx_outbox SET lease_owner = ?, leased_until = ? "
                   f"WHERE {clause}", (owner, until, param))
            clause, param = self.dialect.in_list("o.seq", seqs)
            cols = ", ".join(f"p.{c}" for c in LINE_COLUMNS)
            return [(r[0], _body(r[1], r[2]), LineMetadata(*r[3:])) for r in tx.rows(
                f"SELECT o.result_id, r.body, r.body_packed, {cols} FROM influx_outbox o "
                "JOIN results r ON r.result_id = o.result_id "
                f"JOIN probes p ON p.name = r.probe_name WHERE {clause} ORDER BY o.seq",
                (param,))]

        return self._transaction(work)

    def outbox_batch(self, limit: int) -> list[tuple[str, str, LineMetadata]]:
        """The oldest ``limit`` queued results as (result_id, body, line), leased or not
        (for inspection; the sink leases with ``outbox_lease``)."""
        cols = ", ".join(f"p.{c}" for c in LINE_COLUMNS)
        return [(r[0], _body(r[1], r[2]), LineMetadata(*r[3:])) for r in self._read(
            f"SELECT o.result_id, r.body, r.body_packed, {cols} FROM influx_outbox o "
            "JOIN results r ON r.result_id = o.result_id "
            "JOIN probes p ON p.name = r.probe_name ORDER BY o.seq LIMIT ?", (limit,))]

    def outbox_done(self, result_ids: Sequence[str]) -> None:
        def work(tx: Tx) -> None:
            tx.many("DELETE FROM influx_outbox WHERE result_id = ?", [(r,) for r in result_ids])
            # Written at last (a backfill after a fix): no longer a dead letter.
            tx.many("DELETE FROM influx_dead_letters WHERE result_id = ?",
                    [(r,) for r in result_ids])

        self._transaction(work)

    def outbox_release(self, owner: str) -> None:
        """Give back what ``owner`` leased and did not finish (a clean stop)."""
        self._transaction(lambda tx: tx.run(
            "UPDATE influx_outbox SET lease_owner = NULL, leased_until = NULL "
            "WHERE lease_owner = ?", (owner,)))

    def outbox_dead_letter(self, result_id: str, reason: str, failed_at: str) -> None:
        """Out of the outbox, into the dead letters, in one transaction."""
        def work(tx: Tx) -> None:
            tx.run("DELETE FROM influx_outbox WHERE result_id = ?", (result_id,))
            tx.run("INSERT INTO influx_dead_letters (result_id, failed_at, reason) "
                   "VALUES (?, ?, ?) ON CONFLICT (result_id) DO UPDATE SET "
                   "failed_at = excluded.failed_at, reason = excluded.reason",
                   (result_id, failed_at, reason[:1000]))

        self._transaction(work)

    def outbox_dead_letters(self) -> list[dict[str, str]]:
        return [{"result_id": r[0], "failed_at": r[1], "reason": r[2]} for r in self._read(
            "SELECT result_id, failed_at, reason FROM influx_dead_letters "
            "ORDER BY failed_at, result_id")]

    def outbox_dead_count(self) -> int:
        return self._count("SELECT COUNT(*) FROM influx_dead_letters")

    def outbox_retry_dead(self, queued_at: str) -> int:
        """Queue every dead letter again (after the cause was fixed); returns how many.
        Exactly the letters this statement deletes are queued: one that another process
        sets apart meanwhile stays a dead letter."""
        def work(tx: Tx) -> int:
            taken = sorted(tx.rows("DELETE FROM influx_dead_letters "
                                   "RETURNING failed_at, result_id"))
            tx.many("INSERT INTO influx_outbox (result_id, queued_at) VALUES (?, ?) "
                    "ON CONFLICT (result_id) DO NOTHING",
                    [(result_id, queued_at) for _failed, result_id in taken])
            return len(taken)

        return self._transaction(work)

    def outbox_size(self) -> int:
        return self._count("SELECT COUNT(*) FROM influx_outbox")

    def outbox_enqueue(self, probes: Sequence[str] | None, since: str | None,
                       until: str | None, queued_at: str) -> int:
        """Queue stored results again (a backfill after enabling the sink); returns how
        many were added (those already queued are not queued twice)."""
        where, params = self._scope(probes, since, until, named_only=True)
        return self._transaction(lambda tx: tx.run(
            "INSERT INTO influx_outbox (result_id, queued_at) "
            f"SELECT result_id, CAST(? AS TEXT) FROM results WHERE {where} "
            "ORDER BY started_at, result_id ON CONFLICT (result_id) DO NOTHING",
            [queued_at, *params]))

    # --- anonymous tables -------------------------------------------------------------------

    def add_browser_result(self, received_at: str, client: str, body: str,
                           quota: Quota | None = None) -> int:
        def work(tx: Tx) -> int:
            row = tx.one("INSERT INTO browser_results (received_at, client, body) "
                         "VALUES (?, ?, ?) RETURNING id", (received_at, client, body))
            new_id = int(row[0]) if row else 0
            # Every PRUNE_EVERY ids, whichever process took the id.
            if quota is not None and new_id % PRUNE_EVERY == 0:
                self._prune_now(tx, "browser_results", quota)
            return new_id

        return self._transaction(work)

    def _prune_due(self, table: str) -> bool:
        """Whether this insert should prune: every PRUNE_EVERY inserts this store makes,
        counted once per call (not per transaction attempt), under a lock (PostgreSQL
        stores are called from several threads)."""
        with self._lock:
            count = self._inserts[table] = self._inserts.get(table, 0) + 1
        return count % PRUNE_EVERY == 0

    def _prune_now(self, tx: Tx, table: str, quota: Quota) -> None:
        """Anonymous tables stay bounded (issue 12): rows older than the retention go, and
        past max_rows the oldest go. Run every PRUNE_EVERY inserts, so the cost of
        counting is spread thin; between runs a table may exceed its cap by that many,
        and the hourly pass applies the quota whatever the inserts."""
        key, time_column = ANONYMOUS[table]
        tx.run(f"DELETE FROM {table} WHERE {time_column} < ?", (quota.keep_after,))
        tx.run(f"DELETE FROM {table} WHERE {key} IN (SELECT {key} FROM {table} "
               f"ORDER BY {time_column} DESC, {key} DESC {self.dialect.no_limit} OFFSET ?)",
               (quota.max_rows,))

    def prune_anonymous(self, browser: Quota, ndt7: Quota) -> None:
        """Apply the quotas now (at start and hourly): retention holds for a table that
        gets no new rows too."""
        def work(tx: Tx) -> None:
            self._prune_now(tx, "browser_results", browser)
            self._prune_now(tx, "ndt7_tests", ndt7)

        self._transaction(work)

    def browser_results(self, since: str | None = None,
                        until: str | None = None) -> list[dict[str, Any]]:
        where, params = _period("received_at", since, until)
        return [{"id": r[0], "received_at": r[1], "client": r[2], **json.loads(r[3])}
                for r in self._read(
                    f"SELECT id, received_at, client, body FROM browser_results {where} "
                    "ORDER BY id", params)]

    def add_ndt7_test(self, archive: dict[str, Any], started_at: str, ended_at: str,
                      quota: Quota | None = None) -> None:
        summary = archive["Summary"]
        prune = quota is not None and self._prune_due("ndt7_tests")

        def work(tx: Tx) -> None:
            tx.run("INSERT INTO ndt7_tests (uuid, test, started_at, ended_at, client, "
                   "end_reason, throughput_bps, min_rtt_ms, body) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (uuid) DO NOTHING",
                   (archive["UUID"], archive["Test"], started_at, ended_at, archive["Client"],
                    archive["EndReason"], summary["throughput_bps"], summary["min_rtt_ms"],
                    json.dumps(archive, separators=(",", ":"))))
            if prune and quota is not None:
                self._prune_now(tx, "ndt7_tests", quota)

        self._transaction(work)

    def ndt7_tests(self, since: str | None = None, until: str | None = None,
                   measurements: bool = False) -> list[dict[str, Any]]:
        """Stored ndt7 subtests, oldest first; the per-interval measurements only when
        asked (they are most of each record)."""
        where, params = _period("started_at", since, until)
        out = []
        for (body,) in self._read(
                f"SELECT body FROM ndt7_tests {where} ORDER BY started_at, uuid", params):
            record = json.loads(body)
            if not measurements:
                record.pop("ServerMeasurements", None)
                record.pop("ClientMeasurements", None)
            out.append(record)
        return out

    def customer_speeds(self, since: str | None = None, until: str | None = None,
                        network: str | None = None) -> list[tuple[str, str, float | None]]:
        """(kind, direction, kbps or None) of every customer test in [since, until): each
        browser result gives a download and an upload, each ndt7 subtest one direction
        (None when it did not end normally). ``network``: only clients inside this CIDR."""
        inside = ipaddress.ip_network(network, strict=False) if network else None

        def wanted(client: str) -> bool:
            if inside is None:
                return True
            try:
                return ipaddress.ip_address(_client_host(client)) in inside
            except ValueError:
                return False

        out: list[tuple[str, str, float | None]] = []
        for row in self.browser_results(since, until):
            if wanted(row["client"]):
                for direction in ("download", "upload"):
                    bps = row.get(f"{direction}_bps")
                    # Rows stored before numbers were bounded (issue 12) may hold anything:
                    # a speed outside any physical range counts as none.
                    kbps = bps / 1000 if isinstance(bps, int | float) and not isinstance(
                        bps, bool) and 0 < bps <= BPS_LIMIT else None
                    out.append(("browser", direction, kbps))
        where, params = _period("started_at", since, until)
        for test, client, reason, bps in self._read(
                f"SELECT test, client, end_reason, throughput_bps FROM ndt7_tests {where} "
                "ORDER BY started_at, uuid", params):
            if wanted(client):
                ok = reason in ("done", "client_closed", "early_exit") and bps
                out.append(("ndt7", test, bps / 1000 if ok else None))
        return out

    # --- fleet control (issue 15) ---------------------------------------------------------

    def instruction_rules(self) -> list[tuple[str, dict[str, Any], str]]:
        """(selector key, settings, updated_at) of every instruction rule."""
        return [(r[0], json.loads(r[1]), r[2]) for r in self._read(
            "SELECT selector, settings, updated_at FROM instruction_rules ORDER BY selector")]

    def update_instruction_rule(
        self, selector: str, change: Callable[[dict[str, Any]], dict[str, Any]],
        updated_at: str,
    ) -> dict[str, Any]:
        """Replace a rule's settings with ``change(current)`` ({} when there is no rule)
        in one transaction; an empty result deletes the rule. Returns the new settings."""
        def work(tx: Tx) -> dict[str, Any]:
            # The row first (empty when new), then locked: two admins creating the same
            # rule at once take turns instead of one failing on the primary key.
            tx.run("INSERT INTO instruction_rules (selector, settings, updated_at) "
                   "VALUES (?, '{}', ?) ON CONFLICT (selector) DO NOTHING",
                   (selector, updated_at))
            row = tx.one("SELECT settings FROM instruction_rules WHERE selector = ? "
                         f"{self.dialect.for_update}", (selector,))
            settings = change(json.loads(row[0]) if row else {})
            if not settings:
                tx.run("DELETE FROM instruction_rules WHERE selector = ?", (selector,))
            else:
                tx.run("UPDATE instruction_rules SET settings = ?, updated_at = ? "
                       "WHERE selector = ?", (json.dumps(settings), updated_at, selector))
            return settings

        return self._transaction(work)

    SUPPRESSION_KEYS = ("id", "selector", "starts_at", "ends_at", "reason", "created_at")

    def suppressions(self, ending_after: str | None = None) -> list[dict[str, Any]]:
        """Suppression windows (those not over at ``ending_after``, if given)."""
        where, params = ("WHERE ends_at > ?", [ending_after]) if ending_after else ("", [])
        return [dict(zip(self.SUPPRESSION_KEYS, r, strict=True)) for r in self._read(
            f"SELECT {', '.join(self.SUPPRESSION_KEYS)} FROM suppressions {where} "
            "ORDER BY starts_at, id", params)]

    def add_suppression(self, selector: str, starts_at: str, ends_at: str, reason: str,
                        created_at: str, max_open: int | None = None,
                        forget_before: str | None = None) -> int | None:
        """Add a window; None when ``max_open`` windows not over at ``created_at``
        exist already (counted in the same transaction). Windows that ended before
        ``forget_before`` are deleted first (the certificates of those days list them
        no more: keep ``forget_before`` beyond the campaigns still to certify)."""
        def work(tx: Tx) -> int | None:
            if forget_before is not None:
                tx.run("DELETE FROM suppressions WHERE ends_at < ?", (forget_before,))
            if max_open is not None:
                row = tx.one("SELECT COUNT(*) FROM suppressions WHERE ends_at > ?",
                             (created_at,))
                if row is not None and int(row[0]) >= max_open:
                    return None
            row = tx.one("INSERT INTO suppressions (selector, starts_at, ends_at, reason, "
                         "created_at) VALUES (?, ?, ?, ?, ?) RETURNING id",
                         (selector, starts_at, ends_at, reason, created_at))
            assert row is not None
            return int(row[0])

        return self._transaction(work)

    def delete_suppression(self, ident: int) -> bool:
        return self._transaction(lambda tx: tx.run(
            "DELETE FROM suppressions WHERE id = ?", (ident,))) == 1

    def put_health(self, probe_name: str, received_at: str, clock_skew_s: float | None,
                   body: str) -> None:
        """A probe's latest health report (replaces the one before)."""
        self._transaction(lambda tx: tx.run(
            "INSERT INTO probe_health (probe_name, received_at, clock_skew_s, body) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (probe_name) DO UPDATE SET "
            "received_at = excluded.received_at, clock_skew_s = excluded.clock_skew_s, "
            "body = excluded.body", (probe_name, received_at, clock_skew_s, body)))

    def health(self) -> dict[str, tuple[str, float | None, dict[str, Any]]]:
        """probe -> (received_at, clock skew, report) of each probe's latest report; one
        the reader cannot interpret is left out (collector/unreadable.py)."""
        out: dict[str, tuple[str, float | None, dict[str, Any]]] = {}
        for name, received, skew, body in self._read(
                "SELECT probe_name, received_at, clock_skew_s, body FROM probe_health"):
            try:
                report = json.loads(body)
                parse_utc(received)
                if not isinstance(report, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                unreadable.skipped("health", name, exc)
                continue
            out[name] = (received, skew, report)
        return out

    def activity(self, since: str) -> dict[str, dict[str, Any]]:
        """Per probe: its newest result's start and arrival, and its sessions since
        ``since`` (valid and in all), from the session facts."""
        out: dict[str, dict[str, Any]] = {}
        with self._reading() as tx:
            for (name,) in tx.rows("SELECT name FROM probes ORDER BY name"):
                # One index seek per probe (results (probe_name, started_at)).
                last = next((r for r in tx.rows(
                    "SELECT started_at, received_at, result_id FROM results "
                    "WHERE probe_name = ? ORDER BY started_at DESC LIMIT ?",
                    (name, _LOOK_PAST)) if _readable(r[2], r[0], r[1])), None)
                counts = tx.one("SELECT COUNT(*), SUM(valid) FROM session_facts "
                                "WHERE probe_name = ? AND started_at >= ?", (name, since))
                out[name] = {
                    "last_started_at": last[0] if last else None,
                    "last_received_at": last[1] if last else None,
                    "sessions": int(counts[0]) if counts else 0,
                    "valid_sessions": int(counts[1] or 0) if counts else 0}
        return out

    def latest_sessions(self, probes: Sequence[str]) -> list[SessionFacts]:
        """Each named probe's newest session facts (by start time), for the per-probe
        metrics (issue 16): two index seeks a probe, whatever its history."""
        out: list[SessionFacts] = []
        with self._reading() as tx:
            for name in probes:
                row = next((r for r in tx.rows(
                    f"SELECT {', '.join(SESSION_FACT_COLUMNS)} FROM session_facts "
                    "WHERE probe_name = ? "
                    "ORDER BY started_at DESC, result_id DESC LIMIT ?", (name, _LOOK_PAST))
                    if _readable(r[2], r[1])), None)
                if row is None:
                    continue
                probe, started, rid = row[:3]
                transfers = tuple(
                    TransferFact(direction, bool(ok), kbps) for direction, ok, kbps in tx.rows(
                        "SELECT direction, ok, kbps FROM transfer_facts WHERE probe_name = ? "
                        "AND started_at = ? AND result_id = ? ORDER BY seq",
                        (probe, started, rid)))
                out.append(_session_facts(row, transfers))
        return out

    # --- alerts (issue 16) -----------------------------------------------------------------

    def add_alert(self, key: str, kind: str, probe: str | None, severity: str,
                  created_at: str, subject: str, details: str,
                  notifiers: Sequence[str]) -> int | None:
        """Record an alert and a pending delivery per notifier, in one transaction;
        None when an alert with ``key`` exists already (it was raised before)."""
        def work(tx: Tx) -> int | None:
            row = tx.one(
                "INSERT INTO alerts (dedup_key, kind, probe_name, severity, created_at, "
                "subject, details) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (dedup_key) DO NOTHING RETURNING id",
                (key, kind, probe, severity, created_at, subject, details))
            if row is None:
                return None
            ident = int(row[0])
            tx.many("INSERT INTO alert_deliveries (alert_id, notifier, state, attempts, "
                    "next_at) VALUES (?, ?, 'pending', 0, ?)",
                    [(ident, name, created_at) for name in notifiers])
            return ident

        return self._transaction(work)

    def alert_keys(self, keys: Sequence[str]) -> set[str]:
        """Which of ``keys`` were raised already."""
        if not keys:
            return set()
        clause, param = self.dialect.in_list("dedup_key", list(keys))
        return {r[0] for r in self._read(f"SELECT dedup_key FROM alerts WHERE {clause}",
                                         (param,))}

    def lease_deliveries(self, owner: str, now: str, until: str, limit: int,
                         notifiers: Sequence[str], alert_id: int | None = None
                         ) -> list[AlertDelivery]:
        """Pending deliveries due at ``now`` to one of ``notifiers`` (the ones this
        process can send: a delivery to a notifier it does not know waits for a process
        that does), that no live lease holds, leased to ``owner`` until ``until``
        (PostgreSQL skips rows another process is leasing), oldest first, with their
        alerts; only those of ``alert_id`` if given."""
        if not notifiers:
            return []

        def work(tx: Tx) -> list[AlertDelivery]:
            clause, param = self.dialect.in_list("notifier", list(notifiers))
            only, extra = ("AND alert_id = ? ", [alert_id]) if alert_id is not None \
                else ("", [])
            keys = tx.rows(
                "SELECT alert_id, notifier FROM alert_deliveries WHERE state = 'pending' "
                "AND next_at <= ? AND (leased_until IS NULL OR leased_until < ? OR "
                f"lease_owner = ?) AND {clause} {only}"
                "ORDER BY next_at, alert_id, notifier LIMIT ? "
                f"{self.dialect.skip_locked}", (now, now, owner, param, *extra, limit))
            out = []
            for ident, notifier in keys:
                tx.run("UPDATE alert_deliveries SET lease_owner = ?, leased_until = ? "
                       "WHERE alert_id = ? AND notifier = ?", (owner, until, ident, notifier))
                row = tx.one("SELECT d.attempts, a.dedup_key, a.kind, a.probe_name, "
                             "a.severity, a.created_at, a.subject, a.details "
                             "FROM alert_deliveries d JOIN alerts a ON a.id = d.alert_id "
                             "WHERE d.alert_id = ? AND d.notifier = ?", (ident, notifier))
                assert row is not None
                out.append(AlertDelivery(int(ident), notifier, int(row[0]), *row[1:]))
            return out

        return self._transaction(work)

    def finish_delivery(self, alert_id: int, notifier: str, owner: str, state: str,
                        attempts: int, next_at: str, error: str | None,
                        delivered_at: str | None) -> bool:
        """Record a send's outcome, if ``owner`` still holds the lease (False if not)."""
        return self._transaction(lambda tx: tx.run(
            "UPDATE alert_deliveries SET state = ?, attempts = ?, next_at = ?, "
            "last_error = ?, delivered_at = ?, lease_owner = NULL, leased_until = NULL "
            "WHERE alert_id = ? AND notifier = ? AND lease_owner = ?",
            (state, attempts, next_at, error, delivered_at, alert_id, notifier,
             owner))) == 1

    def release_deliveries(self, owner: str) -> int:
        """Give up ``owner``'s leases (a process stopping): others may send at once."""
        return self._transaction(lambda tx: tx.run(
            "UPDATE alert_deliveries SET lease_owner = NULL, leased_until = NULL "
            "WHERE lease_owner = ?", (owner,)))

    def alerts(self, limit: int, since: str | None = None,
               ident: int | None = None) -> list[dict[str, Any]]:
        """The newest ``limit`` alerts (since ``since``; or the one ``ident``), each with
        its deliveries."""
        params: list[Any]
        where, params = "", []
        if ident is not None:
            where, params = "WHERE id = ?", [ident]
        elif since:
            where, params = "WHERE created_at >= ?", [since]
        with self._reading() as tx:
            rows = tx.rows(
                "SELECT id, dedup_key, kind, probe_name, severity, created_at, subject, "
                f"details FROM alerts {where} ORDER BY id DESC LIMIT ?", [*params, limit])
            out = []
            for r in rows:
                deliveries = [
                    {"notifier": d[0], "state": d[1], "attempts": d[2], "next_at": d[3],
                     "last_error": d[4], "delivered_at": d[5]}
                    for d in tx.rows(
                        "SELECT notifier, state, attempts, next_at, last_error, "
                        "delivered_at FROM alert_deliveries WHERE alert_id = ? "
                        "ORDER BY notifier", (r[0],))]
                out.append({"id": int(r[0]), "key": r[1], "kind": r[2], "probe": r[3],
                            "severity": r[4], "created_at": r[5], "subject": r[6],
                            "details": json.loads(r[7]), "deliveries": deliveries})
        return out

    def prune_alerts(self, before: str) -> int:
        """Delete the alerts created before ``before`` (and their deliveries)."""
        def work(tx: Tx) -> int:
            tx.run("DELETE FROM alert_deliveries WHERE alert_id IN "
                   "(SELECT id FROM alerts WHERE created_at < ?)", (before,))
            return tx.run("DELETE FROM alerts WHERE created_at < ?", (before,))

        return self._transaction(work)

    # --- copying a whole store (migrate) ---------------------------------------------------

    def dump(self, table: str, after: Sequence[Any] | None,
             limit: int) -> list[tuple[Any, ...]]:
        """Rows of ``table`` in key order after the key ``after`` (a page of a copy)."""
        key, columns = TABLES[table]
        where, params = "", []
        if after is not None:
            where = f"WHERE ({', '.join(key)}) > ({', '.join('?' * len(key))})"
            params = list(after)
        return self._read(f"SELECT {', '.join(columns)} FROM {table} {where} "
                          f"ORDER BY {', '.join(key)} LIMIT ?", [*params, limit])

    def load(self, table: str, rows: Sequence[Sequence[Any]]) -> int:
        """Insert copied rows as they are (keys already present are left alone: a copy
        that is run again resumes). Returns how many were new."""
        _key, columns = TABLES[table]
        marks = ", ".join("?" * len(columns))

        def work(tx: Tx) -> int:
            added = 0
            for row in rows:
                added += tx.run(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks}) "
                                "ON CONFLICT DO NOTHING", row)
            return added

        return self._transaction(work)


# The copyable tables, in an order that satisfies their foreign keys: (key, columns).
# Generated keys (browser_results.id, influx_outbox.seq) are copied as they are.
TABLES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "probes": (("name",), ("name", "token_sha256", "created_at", "revoked_at",
                           *LINE_COLUMNS)),
    "tokens": (("name",), ("name", "role", "token_sha256", "created_at", "revoked_at")),
    "results": (("result_id",), ("result_id", "probe_name", "schema_version", "started_at",
                                 "ended_at", "received_at", "body_sha256", "body",
                                 "clock_skew_s", "session_seq", "body_packed")),
    # Facts in their primary key's order: a page is an index range scan in both engines.
    "session_facts": (("probe_name", "started_at", "result_id"),
                      ("probe_name", "started_at", "result_id", "pings_sent", "pings_lost",
                       "rtt_n", "rtt_mean_ms", "rtt_m2", "rtts_ms", "valid",
                       "invalid_codes", "jitter_sum_ns", "jitter_pairs", "address_family",
                       "dual_stack", "refused_attempts", "refused_server")),
    "transfer_facts": (("probe_name", "started_at", "result_id", "seq"),
                       ("probe_name", "started_at", "result_id", "seq", "direction", "ok",
                        "kbps", "valid")),
    "day_facts": (("probe_name", "day"), DAY_COLUMNS),
    "gaps": (("gap_id",), ("gap_id", "probe_name", "received_at", "reason", "dropped",
                           "first_started_at", "last_started_at", "body_sha256",
                           "seq_ranges")),
    "browser_results": (("id",), ("id", "received_at", "client", "body")),
    "ndt7_tests": (("uuid",), ("uuid", "test", "started_at", "ended_at", "client",
                               "end_reason", "throughput_bps", "min_rtt_ms", "body")),
    "influx_outbox": (("seq",), ("seq", "result_id", "queued_at")),
    "influx_dead_letters": (("result_id",), ("result_id", "failed_at", "reason")),
    "instruction_rules": (("selector",), ("selector", "settings", "updated_at")),
    "suppressions": (("id",), ("id", "selector", "starts_at", "ends_at", "reason",
                               "created_at")),
    "probe_health": (("probe_name",), ("probe_name", "received_at", "clock_skew_s",
                                       "body")),
    "alerts": (("id",), ("id", "dedup_key", "kind", "probe_name", "severity", "created_at",
                         "subject", "details")),
    "result_deletions": (("id",), ("id", "result_id", "probe_name", "started_at",
                                   "session_seq", "body_sha256", "deleted_at", "deleted_by",
                                   "reason")),
    # The sessions the refusal migration reclassified (issue 24, storage/refusals.py).
    "refusal_reclassifications": (("id",), ("id", "result_id", "probe_name", "started_at",
                                            "attempts", "refused_server", "migrated_at")),
    "alert_deliveries": (("alert_id", "notifier"), (
        "alert_id", "notifier", "state", "attempts", "next_at", "lease_owner",
        "leased_until", "last_error", "delivered_at")),
}

ANONYMOUS = {"browser_results": ("id", "received_at"), "ndt7_tests": ("uuid", "started_at")}


def _body(text: str, packed: bytes | None) -> str:
    """A result's canonical JSON: packed (issue 14) or, for rows stored before, as text.
    A packed body that cannot be read is a StoreError (503), never a wrong document."""
    if packed is None:
        return text
    try:
        return codec.unpack(bytes(packed)).decode()
    except codec.CodecError as exc:
        raise StoreError(str(exc)) from None


def _stored(row: Sequence[Any]) -> StoredResult:
    return StoredResult(row[0], row[1], row[2], row[3], row[4], _body(row[5], row[6]),
                        row[7])


def _same_document(stored: str, body: str) -> bool:
    """Whether a stored body is the same result as a canonical ``body`` whose hash
    differs: a row that an older release canonicalised its own way (sorted keys,
    ``1e-05``; storage/codec.py) is compared by content, so a result resent across the
    upgrade stays a duplicate, not a conflict."""
    try:
        return codec.canonical(parse_result(orjson.loads(stored))).decode() == body
    except (ValueError, TypeError):  # SchemaError, orjson's errors: not the same
        return False


def insert_session_facts(tx: Tx, facts: SessionFacts, probe: str) -> None:
    rtt = facts.rtt
    tx.run(
        "INSERT INTO session_facts (probe_name, started_at, result_id, pings_sent, "
        "pings_lost, rtt_n, rtt_mean_ms, rtt_m2, rtts_ms, valid, invalid_codes, "
        "jitter_sum_ns, jitter_pairs, address_family, dual_stack, refused_attempts, "
        "refused_server) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (probe, facts.started_at, facts.result_id, facts.pings_sent, facts.pings_lost,
         rtt.n, rtt.mean, rtt.m2, json.dumps(facts.rtts_ms, separators=(",", ":")),
         int(facts.valid), " ".join(facts.invalid_codes), facts.jitter_sum_ns,
         facts.jitter_pairs, facts.address_family, int(facts.dual_stack),
         facts.refused_attempts, facts.refused_server))
    insert_transfer_facts(tx, facts, probe)


def insert_transfer_facts(tx: Tx, facts: SessionFacts, probe: str) -> None:
    tx.many(
        "INSERT INTO transfer_facts (probe_name, started_at, result_id, seq, direction, "
        "ok, kbps, valid) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [(probe, facts.started_at, facts.result_id, seq, t.direction, int(t.ok), t.kbps,
          int(facts.valid)) for seq, t in enumerate(facts.transfers)])


# What a SessionFacts is read from (``_session_facts``), in this order.
SESSION_FACT_COLUMNS = ("probe_name", "started_at", "result_id", "pings_sent", "pings_lost",
                        "rtt_n", "rtt_mean_ms", "rtt_m2", "rtts_ms", "valid",
                        "invalid_codes", "jitter_sum_ns", "jitter_pairs", "address_family",
                        "dual_stack", "refused_attempts", "refused_server")


def _session_facts(row: Sequence[Any], transfers: Sequence[TransferFact]) -> SessionFacts:
    (probe, started, rid, sent, lost, n, mean, m2, rtts, valid, codes, jsum, jpairs, fam,
     dual, refused, server) = row
    return SessionFacts(result_id=rid, probe_id=probe, started_at=started,
                        pings_sent=sent, pings_lost=lost, rtt=Moments(n, mean, m2),
                        rtts_ms=tuple(json.loads(rtts)), transfers=tuple(transfers),
                        valid=bool(valid), invalid_codes=tuple(codes.split()),
                        jitter_sum_ns=int(jsum), jitter_pairs=int(jpairs),
                        address_family=fam, dual_stack=bool(dual),
                        refused_attempts=int(refused), refused_server=server)


def _facts_where(tx: Tx, where: str, params: Sequence[Any], t_where: str,
                 t_params: Sequence[Any]) -> list[SessionFacts]:
    """The facts of the sessions ``where`` selects (their transfers: ``t_where``), by
    start time; a row no reader can interpret is left out (unreadable.py)."""
    transfer_rows = tx.rows(
        f"SELECT result_id, direction, ok, kbps FROM transfer_facts WHERE {t_where} "
        "ORDER BY result_id, seq", t_params)
    session_rows = tx.rows(
        f"SELECT {', '.join(SESSION_FACT_COLUMNS)} FROM session_facts WHERE {where} "
        "ORDER BY started_at, result_id", params)
    transfers: dict[str, list[TransferFact]] = {}
    for result_id, direction, ok, kbps in transfer_rows:
        transfers.setdefault(result_id, []).append(TransferFact(direction, bool(ok), kbps))
    return [_session_facts(row, transfers.get(row[2], ())) for row in session_rows
            if _readable(row[2], row[1])]


def rebuild_day(tx: Tx, probe: str, day: str, for_update: str, refill: bool = True) -> None:
    """One probe's day rollup again from its sessions' facts, merged in their stored
    order (a merged sum cannot give one session back exactly: the speeds are a sorted
    list, the moments Welford's): after a result is deleted, or its facts re-derived.
    The row is emptied first, not deleted: that locks it (PostgreSQL), and a concurrent
    add_to_day that already found it finds it still. ``refill`` False: emptied only (a
    day an older release spelt otherwise, which no reader interprets)."""
    tx.run("UPDATE day_facts SET sessions = 0, pings_sent = 0, pings_lost = 0, "
           "rtt_n = 0, rtt_mean_ms = 0, rtt_m2 = 0, download_attempts = 0, "
           "download_failed = 0, upload_attempts = 0, upload_failed = 0, "
           "download_kbps = ?, upload_kbps = ?, invalid_sessions = 0, "
           "invalid_codes = '{}', jitter_sum_ns = 0, jitter_pairs = 0, "
           "refused_servers = '{}' WHERE probe_name = ? AND day = ?", (b"", b"", probe, day))
    if not refill:
        return
    lo = day + rollup.DAY_START
    hi = (date.fromisoformat(day) + timedelta(days=1)).isoformat() + rollup.DAY_START
    where = "probe_name = ? AND started_at >= ? AND started_at < ?"
    merged = DayRollup(probe, day)
    # In memory, as add_to_day would one at a time (its reads give back what it wrote:
    # integers, IEEE doubles and bytes), without a round trip per session.
    for facts in _facts_where(tx, where, (probe, lo, hi), where, (probe, lo, hi)):
        merged = rollup.add_session(merged, facts)
    _put_day(tx, merged)


def add_to_day(tx: Tx, probe: str, facts: SessionFacts, for_update: str = "") -> None:
    """Merge one session into its probe's UTC-day rollup (same transaction as the
    facts): read the row under a lock, merge in Python (compliance/rollup.py), write it
    back."""
    day = rollup.day_of(facts.started_at)
    _empty_day(tx, probe, day)
    row = tx.one(f"SELECT {', '.join(DAY_COLUMNS)} FROM day_facts "
                 f"WHERE probe_name = ? AND day = ? {for_update}", (probe, day))
    assert row is not None
    _put_day(tx, rollup.add_session(_day(row), facts), exists=True)


def _empty_day(tx: Tx, probe: str, day: str) -> None:
    """An empty row if there is none, so there is a row to lock even for a day's first
    session."""
    tx.run(f"INSERT INTO day_facts ({', '.join(DAY_COLUMNS)}) "
           "VALUES (?, ?, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, ?, ?, 0, '{}', 0, 0, '{}') "
           "ON CONFLICT (probe_name, day) DO NOTHING", (probe, day, b"", b""))


def _put_day(tx: Tx, merged: DayRollup, exists: bool = False) -> None:
    if not exists:
        _empty_day(tx, merged.probe_name, merged.day)
    tx.run("UPDATE day_facts SET sessions = ?, pings_sent = ?, pings_lost = ?, "
           "rtt_n = ?, rtt_mean_ms = ?, rtt_m2 = ?, download_attempts = ?, "
           "download_failed = ?, upload_attempts = ?, upload_failed = ?, "
           "download_kbps = ?, upload_kbps = ?, invalid_sessions = ?, invalid_codes = ?, "
           "jitter_sum_ns = ?, jitter_pairs = ?, refused_servers = ? "
           "WHERE probe_name = ? AND day = ?",
           (*_day_values(merged)[2:], merged.probe_name, merged.day))


def _period(column: str, since: str | None, until: str | None) -> tuple[str, list[str]]:
    """``WHERE`` clause and parameters for [since, until) on ``column``."""
    clauses, params = [], []
    if since is not None:
        clauses.append(f"{column} >= ?")
        params.append(since)
    if until is not None:
        clauses.append(f"{column} < ?")
        params.append(until)
    return (f"WHERE {' AND '.join(clauses)}" if clauses else ""), params


def _client_host(client: str) -> str:
    """The address of a stored client: ``ip``, ``ip:port`` or ``[ipv6]:port``."""
    if client.startswith("["):
        return client[1:client.find("]")]
    if client.count(":") == 1:
        return client.split(":", 1)[0]
    return client


def _probe(row: Sequence[Any]) -> Probe:
    name, created_at, revoked_at, *line = row
    return Probe(name=name, created_at=created_at, revoked_at=revoked_at,
                 line=LineMetadata(*line))


def _day(row: Sequence[Any]) -> DayRollup:
    (probe, day, sessions, sent, lost, n, mean, m2, d_att, d_fail, u_att, u_fail, d_blob,
     u_blob, invalid, codes, jsum, jpairs, refused) = row
    return DayRollup(probe, day, int(sessions), int(sent), int(lost),
                     Moments(int(n), float(mean), float(m2)), int(d_att), int(d_fail),
                     int(u_att), int(u_fail), bytes(d_blob), bytes(u_blob), int(invalid),
                     codes, int(jsum), int(jpairs), refused)


def _day_values(d: DayRollup) -> tuple[Any, ...]:
    return (d.probe_name, d.day, d.sessions, d.pings_sent, d.pings_lost, d.rtt.n,
            d.rtt.mean, d.rtt.m2, d.download_attempts, d.download_failed, d.upload_attempts,
            d.upload_failed, d.download_kbps, d.upload_kbps, d.invalid_sessions,
            d.invalid_codes, d.jitter_sum_ns, d.jitter_pairs, d.refused_servers)


class Dumps(Protocol):
    def dump(self, table: str, after: Sequence[Any] | None,
             limit: int) -> list[tuple[Any, ...]]: ...


def iterate_pages(source: Dumps, table: str, page: int,
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
