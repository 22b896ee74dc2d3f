"""SQLite store: the collector's master copy of every probe and result.

Durability (shared/reference/reliability.md §6): WAL journal, ``synchronous=FULL`` so an
acknowledged result survives power loss, writes in ``BEGIN IMMEDIATE`` transactions (no
deferred-upgrade SQLITE_BUSY), ``busy_timeout`` for concurrent CLI use, ``quick_check`` at
open. Schema changes are numbered migrations tracked in ``PRAGMA user_version``.

The class is synchronous and not thread-safe: the web app runs it on one dedicated thread.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from array import array
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from agent.schema import BPS_LIMIT
from agent.stats import Moments
from collector.compliance.evaluate import Observations
from collector.compliance.facts import SessionFacts, TransferFact
from collector.errors import StoreError
from collector.storage.model import (
    HourRow,
    InsertOutcome,
    LineMetadata,
    NewResult,
    Probe,
    Quota,
    StoredResult,
)


def _backfill_facts(db: sqlite3.Connection) -> None:
    """Derive the facts of every stored result from its body (the master copy)."""
    from agent.schema import parse_result
    from collector.compliance.facts import of_result

    rows = db.execute("SELECT started_at, body FROM results").fetchall()
    for started_at, body in rows:
        _insert_facts(db, of_result(parse_result(json.loads(body)), started_at))


# Each entry upgrades the schema from version i to i + 1: SQL statements, or a function
# that rewrites data. Never edit a shipped migration.
MIGRATIONS: tuple[str | Callable[[sqlite3.Connection], None], ...] = (
    """
    CREATE TABLE probes (
        name TEXT PRIMARY KEY,
        token_sha256 TEXT NOT NULL UNIQUE,
        created_at TEXT NOT NULL,
        revoked_at TEXT,
        operator TEXT,
        offer TEXT,
        region TEXT,
        technology TEXT,
        download_nominal_kbps REAL,
        download_min_kbps REAL,
        upload_nominal_kbps REAL,
        upload_min_kbps REAL,
        max_delay_ms REAL,
        max_loss_ratio REAL
    );
    CREATE TABLE results (
        result_id TEXT PRIMARY KEY,
        probe_name TEXT NOT NULL REFERENCES probes(name),
        schema_version INTEGER NOT NULL,
        started_at TEXT NOT NULL,
        ended_at TEXT NOT NULL,
        received_at TEXT NOT NULL,
        body_sha256 TEXT NOT NULL,
        body TEXT NOT NULL
    );
    CREATE INDEX results_probe_started ON results (probe_name, started_at);
    CREATE INDEX results_started ON results (started_at);
    """,
    # 2: per-session facts (collector/compliance/facts.py), clustered by probe and time
    # (WITHOUT ROWID) so a scope reads contiguous rows, and their per-probe UTC-day
    # rollup (valid sessions merged; speeds as packed float64), which evaluates whole days
    # without reading every session; backfilled from the bodies.
    """
    CREATE TABLE session_facts (
        probe_name TEXT NOT NULL,
        started_at TEXT NOT NULL,
        result_id TEXT NOT NULL UNIQUE REFERENCES results(result_id),
        pings_sent INTEGER NOT NULL,
        pings_lost INTEGER NOT NULL,
        rtt_n INTEGER NOT NULL,
        rtt_mean_ms REAL NOT NULL,
        rtt_m2 REAL NOT NULL,
        rtts_ms TEXT NOT NULL,
        valid INTEGER NOT NULL,
        invalid_codes TEXT NOT NULL,
        PRIMARY KEY (probe_name, started_at, result_id)
    ) WITHOUT ROWID;
    CREATE TABLE transfer_facts (
        probe_name TEXT NOT NULL,
        started_at TEXT NOT NULL,
        result_id TEXT NOT NULL REFERENCES results(result_id),
        seq INTEGER NOT NULL,
        direction TEXT NOT NULL,
        ok INTEGER NOT NULL,
        kbps REAL,
        valid INTEGER NOT NULL,
        PRIMARY KEY (probe_name, started_at, result_id, seq)
    ) WITHOUT ROWID;
    CREATE TABLE day_facts (
        probe_name TEXT NOT NULL,
        day TEXT NOT NULL,
        sessions INTEGER NOT NULL,
        pings_sent INTEGER NOT NULL,
        pings_lost INTEGER NOT NULL,
        rtt_n INTEGER NOT NULL,
        rtt_mean_ms REAL NOT NULL,
        rtt_m2 REAL NOT NULL,
        download_attempts INTEGER NOT NULL,
        download_failed INTEGER NOT NULL,
        upload_attempts INTEGER NOT NULL,
        upload_failed INTEGER NOT NULL,
        download_kbps BLOB NOT NULL,
        upload_kbps BLOB NOT NULL,
        invalid_sessions INTEGER NOT NULL,
        invalid_codes TEXT NOT NULL,
        PRIMARY KEY (probe_name, day)
    ) WITHOUT ROWID;
    """,
    _backfill_facts,
    # 3: results waiting to be copied to InfluxDB (collector/influx.py), in arrival order.
    """
    CREATE TABLE influx_outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        result_id TEXT NOT NULL UNIQUE REFERENCES results(result_id),
        queued_at TEXT NOT NULL
    );
    """,
    # 4: the probe clock's offset from ours at delivery (X-Bbprobe-Sent-At), and the gap
    # records of results probes had to drop.
    """
    ALTER TABLE results ADD COLUMN clock_skew_s REAL;
    CREATE TABLE gaps (
        gap_id TEXT PRIMARY KEY,
        probe_name TEXT NOT NULL REFERENCES probes(name),
        received_at TEXT NOT NULL,
        reason TEXT NOT NULL,
        dropped INTEGER NOT NULL,
        first_started_at TEXT NOT NULL,
        last_started_at TEXT NOT NULL,
        body_sha256 TEXT NOT NULL
    );
    CREATE INDEX gaps_probe ON gaps (probe_name, first_started_at);
    """,
    # 5: analyst and admin tokens (collector/auth.py).
    """
    CREATE TABLE tokens (
        name TEXT PRIMARY KEY,
        role TEXT NOT NULL CHECK (role IN ('analyst', 'admin')),
        token_sha256 TEXT NOT NULL UNIQUE,
        created_at TEXT NOT NULL,
        revoked_at TEXT
    );
    """,
    # 6: anonymous browser speed tests (/speedtest), kept apart from probe results.
    """
    CREATE TABLE browser_results (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        received_at TEXT NOT NULL,
        client TEXT NOT NULL,
        body TEXT NOT NULL
    );
    """,
    # 7: ndt7 subtests served to third-party clients (ndt7-js, ndt7-client-go, bbprobe's
    # own ndt7 mode), in the shape of ndt-server's archive; apart from probe results.
    """
    CREATE TABLE ndt7_tests (
        uuid TEXT PRIMARY KEY,
        test TEXT NOT NULL CHECK (test IN ('download', 'upload')),
        started_at TEXT NOT NULL,
        ended_at TEXT NOT NULL,
        client TEXT NOT NULL,
        end_reason TEXT NOT NULL,
        throughput_bps REAL,
        min_rtt_ms REAL,
        body TEXT NOT NULL
    );
    CREATE INDEX ndt7_tests_started ON ndt7_tests (started_at);
    """,
    # 8: results InfluxDB refused for good (a 4xx for that result alone), or whose points
    # could not be built: taken out of the outbox so the ones after them flow (issue 12,
    # reliability.md C6), kept with the reason until retried.
    """
    CREATE TABLE influx_dead_letters (
        result_id TEXT PRIMARY KEY REFERENCES results(result_id),
        failed_at TEXT NOT NULL,
        reason TEXT NOT NULL
    );
    -- The anonymous tables are pruned by age (Quota below).
    CREATE INDEX browser_results_received ON browser_results (received_at);
    """,
    # 9: completeness (reliability.md C8): each result's session_seq (schema v4), and the
    # sequence numbers a gap record stands for, as JSON [[first, last], ...].
    """
    ALTER TABLE results ADD COLUMN session_seq INTEGER;
    CREATE INDEX results_probe_seq ON results (probe_name, session_seq)
        WHERE session_seq IS NOT NULL;
    ALTER TABLE gaps ADD COLUMN seq_ranges TEXT NOT NULL DEFAULT '[]';
    """,
)


PRUNE_EVERY = 64


_LINE_COLUMNS = tuple(f.name for f in fields(LineMetadata))


class SqliteStore:
    def __init__(self, path: str | Path, *, outbox: bool = False) -> None:
        self.path = Path(path)
        # Queue every new result for the InfluxDB sink, in its own transaction.
        self.outbox = outbox
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.path, timeout=5.0, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open database {self.path}: {exc}") from None
        try:
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            check = self._db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise StoreError(f"database {self.path} failed its integrity check: {check}")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise StoreError(f"cannot use database {self.path}: {exc}") from None

    def close(self) -> None:
        self._db.close()

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        current = self.schema_version
        if current > len(MIGRATIONS):
            raise StoreError(
                f"database {self.path} has schema version {current}, newer than this "
                f"collector ({len(MIGRATIONS)}); upgrade bbprobe"
            )
        for version in range(current, len(MIGRATIONS)):
            step = MIGRATIONS[version]
            with self._write():
                if callable(step):
                    step(self._db)
                else:
                    for statement in step.split(";"):
                        if statement.strip():
                            self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {version + 1}")

    @contextmanager
    def _write(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # --- probes ---------------------------------------------------------------------------

    def add_probe(
        self, name: str, token_sha256: str, created_at: str, line: LineMetadata
    ) -> None:
        values = [getattr(line, c) for c in _LINE_COLUMNS]
        try:
            with self._write():
                self._db.execute(
                    f"INSERT INTO probes (name, token_sha256, created_at, "
                    f"{', '.join(_LINE_COLUMNS)}) "
                    f"VALUES (?, ?, ?, {', '.join('?' * len(_LINE_COLUMNS))})",
                    [name, token_sha256, created_at, *values],
                )
        except sqlite3.IntegrityError:
            raise StoreError(f"a probe named {name!r} already exists") from None

    def revoke_probe(self, name: str, revoked_at: str) -> bool:
        with self._write():
            cursor = self._db.execute(
                "UPDATE probes SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                (revoked_at, name),
            )
        return cursor.rowcount == 1

    def add_token(self, name: str, role: str, token_sha256: str, created_at: str) -> None:
        try:
            with self._write():
                self._db.execute("INSERT INTO tokens VALUES (?, ?, ?, ?, NULL)",
                                 (name, role, token_sha256, created_at))
        except sqlite3.IntegrityError:
            raise StoreError(f"a token named {name!r} already exists") from None

    def revoke_token(self, name: str, revoked_at: str) -> bool:
        with self._write():
            cursor = self._db.execute(
                "UPDATE tokens SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                (revoked_at, name))
        return cursor.rowcount == 1

    def tokens(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._db.execute(
            "SELECT name, role, created_at, revoked_at FROM tokens ORDER BY name")]

    def role_for_token(self, token_sha256: str) -> tuple[str, str] | None:
        """(role, name) of a live analyst/admin token, or ("probe", name) of a probe's."""
        row = self._db.execute(
            "SELECT role, name FROM tokens WHERE token_sha256 = ? AND revoked_at IS NULL",
            (token_sha256,)).fetchone()
        if row is not None:
            return str(row[0]), str(row[1])
        probe = self.probe_for_token(token_sha256)
        return ("probe", probe.name) if probe is not None else None

    def probe_for_token(self, token_sha256: str) -> Probe | None:
        row = self._db.execute(
            "SELECT * FROM probes WHERE token_sha256 = ? AND revoked_at IS NULL",
            (token_sha256,),
        ).fetchone()
        return _probe(row) if row else None

    def probe(self, name: str) -> Probe | None:
        row = self._db.execute("SELECT * FROM probes WHERE name = ?", (name,)).fetchone()
        return _probe(row) if row else None

    def probes(self) -> list[Probe]:
        return [_probe(r) for r in self._db.execute("SELECT * FROM probes ORDER BY name")]

    # --- results --------------------------------------------------------------------------

    def insert_result(self, **item: Any) -> InsertOutcome:
        """Store one result (see ``insert_results``)."""
        return self.insert_results([NewResult(**item)])[0]

    def insert_results(self, items: Sequence[NewResult]) -> list[InsertOutcome]:
        """Store results and their facts once each, in one transaction (one fsync for a
        batch). Same id and content again: "duplicate" (nothing written); same id with
        other content: "conflict"."""
        outcomes: list[InsertOutcome] = []
        with self._write():
            for item in items:
                row = self._db.execute(
                    "SELECT body_sha256 FROM results WHERE result_id = ?", (item.result_id,)
                ).fetchone()
                if row is not None:
                    outcomes.append("duplicate" if row[0] == item.body_sha256 else "conflict")
                    continue
                self._db.execute(
                    "INSERT INTO results (result_id, probe_name, schema_version, started_at, "
                    "ended_at, received_at, body_sha256, body, clock_skew_s, session_seq) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (item.result_id, item.probe_name, item.schema_version, item.started_at,
                     item.ended_at, item.received_at, item.body_sha256, item.body,
                     item.clock_skew_s, item.session_seq),
                )
                _insert_facts(self._db, item.facts, item.probe_name)
                if self.outbox:
                    self._db.execute("INSERT INTO influx_outbox (result_id, queued_at) "
                                     "VALUES (?, ?)", (item.result_id, item.received_at))
                outcomes.append("stored")
        return outcomes

    def insert_gap(self, gap_id: str, probe_name: str, received_at: str, reason: str,
                   dropped: int, first: str, last: str, body_sha256: str,
                   seq_ranges: Sequence[tuple[int, int]] = ()) -> InsertOutcome:
        with self._write():
            row = self._db.execute("SELECT body_sha256 FROM gaps WHERE gap_id = ?",
                                   (gap_id,)).fetchone()
            if row is not None:
                return "duplicate" if row[0] == body_sha256 else "conflict"
            self._db.execute(
                "INSERT INTO gaps (gap_id, probe_name, received_at, reason, dropped, "
                "first_started_at, last_started_at, body_sha256, seq_ranges) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (gap_id, probe_name, received_at, reason, dropped, first, last, body_sha256,
                 json.dumps([list(r) for r in seq_ranges])))
        return "stored"

    def session_seqs(self, probes: Sequence[str] | None, since: str | None,
                     until: str | None) -> list[tuple[str, int, str]]:
        """(probe, session_seq, started_at) of every numbered result in scope."""
        where, params = self._scope(probes, since, until)
        return [(r[0], r[1], r[2]) for r in self._db.execute(
            "SELECT probe_name, session_seq, started_at FROM results "
            f"WHERE {where} AND session_seq IS NOT NULL ORDER BY probe_name, session_seq",
            params)]

    def seqs_before(self, probes: Sequence[str] | None, since: str | None) -> dict[str, int]:
        """Each probe's highest session_seq delivered before ``since`` (none: {})."""
        if since is None:
            return {}
        where, params = self._scope(probes, None, since)
        return {r[0]: r[1] for r in self._db.execute(
            f"SELECT probe_name, MAX(session_seq) FROM results WHERE {where} AND "
            "session_seq IS NOT NULL GROUP BY probe_name", params)}

    def gap_seq_ranges(self, probes: Sequence[str] | None) -> dict[str, list[tuple[int, int]]]:
        """Every gap record's dropped sequence numbers, by probe."""
        where, params = self._scope(probes, None, None)
        out: dict[str, list[tuple[int, int]]] = {}
        for probe, ranges in self._db.execute(
                f"SELECT probe_name, seq_ranges FROM gaps WHERE {where}", params):
            out.setdefault(probe, []).extend((int(a), int(b)) for a, b in json.loads(ranges))
        return out

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
        rows = self._db.execute(
            "SELECT gap_id, probe_name, received_at, reason, dropped, first_started_at, "
            f"last_started_at FROM gaps WHERE {where} ORDER BY first_started_at", params)
        return [{"gap_id": r[0], "probe_id": r[1], "received_at": r[2], "reason": r[3],
                 "dropped": r[4], "first_started_at": r[5], "last_started_at": r[6]}
                for r in rows]

    def results(
        self,
        probes: Sequence[str] | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int | None = None,
    ) -> list[StoredResult]:
        """Results by start time, oldest first; ``since`` inclusive, ``until`` exclusive."""
        clauses: list[str] = []
        params: list[Any] = []
        if probes is not None:
            clauses.append(f"probe_name IN ({', '.join('?' * len(probes))})")
            params.extend(probes)
        if since is not None:
            clauses.append("started_at >= ?")
            params.append(since)
        if until is not None:
            clauses.append("started_at < ?")
            params.append(until)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        tail = ""
        if limit is not None:
            tail = " LIMIT ?"
            params.append(limit)
        rows = self._db.execute(
            "SELECT result_id, probe_name, started_at, ended_at, received_at, body, "
            "clock_skew_s "
            f"FROM results {where} ORDER BY started_at, result_id{tail}",
            params,
        )
        return [StoredResult(*row) for row in rows]

    # --- facts: what evaluation reads instead of the bodies ----------------------------------

    @staticmethod
    def _scope(probes: Sequence[str] | None, since: str | None,
               until: str | None, column: str = "started_at") -> tuple[str, list[Any]]:
        """WHERE clause over a facts table. Probes go as one JSON array parameter, so a
        scope of thousands of probes stays one statement."""
        clauses: list[str] = []
        params: list[Any] = []
        if probes is not None:
            clauses.append("probe_name IN (SELECT value FROM json_each(?))")
            params.append(json.dumps(list(probes)))
        else:
            # Every probe, named: the planner then reads each probe's time range from the
            # clustered key instead of probing the whole table through the time index.
            clauses.append("probe_name IN (SELECT name FROM probes)")
        period, bounds = _bounds(column, since, until)
        return " AND ".join(clauses + period), params + bounds

    def _plain(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        cursor = self._db.cursor()
        cursor.row_factory = None  # plain tuples: bulk reads of millions of rows
        return cursor.execute(sql, params).fetchall()

    def observations(self, probes: Sequence[str] | None = None, since: str | None = None,
                     until: str | None = None, include_invalid: bool = False) -> Observations:
        """The evaluator's input for a scope: counts and RTT moments (merged exactly, Chan's
        formula) and every per-test speed (percentiles need the values). Whole UTC days
        come from the day rollup, the partial days at either end from the session rows;
        both hold the same samples. Sessions the agent flagged invalid are left out unless
        ``include_invalid`` (which reads every session row), and counted apart."""
        obs = Observations(invalid_included=include_invalid)
        days = None if include_invalid else _whole_days(since, until)
        if days is None:
            self._observe_sessions(obs, probes, since, until)
            return obs
        lo, hi = days
        self._observe_days(obs, probes, lo and lo[:10], hi and hi[:10])
        if since is not None and lo is not None and since < lo:
            self._observe_sessions(obs, probes, since, lo)
        if until is not None and hi is not None and hi < until:
            self._observe_sessions(obs, probes, hi, until)
        return obs

    def _observe_sessions(self, obs: Observations, probes: Sequence[str] | None,
                          since: str | None, until: str | None) -> None:
        where, params = self._scope(probes, since, until)
        for (codes,) in self._plain(
                f"SELECT invalid_codes FROM session_facts WHERE {where} AND valid = 0", params):
            obs.invalid_sessions += 1
            for code in codes.split():
                obs.invalid_reasons[code] = obs.invalid_reasons.get(code, 0) + 1
        if not obs.invalid_included:
            where += " AND valid = 1"
        sessions, sent, lost, n, total = self._plain(
            "SELECT COUNT(*), TOTAL(pings_sent), TOTAL(pings_lost), TOTAL(rtt_n), "
            f"TOTAL(rtt_n * rtt_mean_ms) FROM session_facts WHERE {where}", params)[0]
        obs.sessions += int(sessions)
        obs.pings_sent += int(sent)
        obs.pings_lost += int(lost)
        obs.rtt = obs.rtt.merge(self._moments("session_facts", where, params, n, total))
        for direction, ok, kbps in self._plain(
                f"SELECT direction, ok, kbps FROM transfer_facts WHERE {where}", params):
            if direction == "download":
                obs.download_attempts += 1
                obs.download_failed += not ok
                if ok and kbps is not None:
                    obs.download_kbps.append(kbps)
            else:
                obs.upload_attempts += 1
                obs.upload_failed += not ok
                if ok and kbps is not None:
                    obs.upload_kbps.append(kbps)

    def _moments(self, table: str, where: str, params: list[Any], n: float,
                 total: float) -> Moments:
        """The RTT moments of many rows: grand mean, then M2 about it (second pass)."""
        if not n:
            return Moments()
        grand = total / n
        (m2,) = self._plain(
            "SELECT TOTAL(rtt_m2 + rtt_n * (rtt_mean_ms - ?) * (rtt_mean_ms - ?)) "
            f"FROM {table} WHERE {where}", [grand, grand, *params])[0]
        return Moments(int(n), grand, m2)

    def _observe_days(self, obs: Observations, probes: Sequence[str] | None,
                      day_lo: str | None, day_hi: str | None) -> None:
        where, params = self._scope(probes, day_lo, day_hi, column="day")
        (sessions, sent, lost, n, total, d_att, d_fail, u_att, u_fail, invalid) = self._plain(
            "SELECT TOTAL(sessions), TOTAL(pings_sent), TOTAL(pings_lost), TOTAL(rtt_n), "
            "TOTAL(rtt_n * rtt_mean_ms), TOTAL(download_attempts), TOTAL(download_failed), "
            "TOTAL(upload_attempts), TOTAL(upload_failed), TOTAL(invalid_sessions) "
            f"FROM day_facts WHERE {where}", params)[0]
        obs.sessions += int(sessions)
        obs.pings_sent += int(sent)
        obs.pings_lost += int(lost)
        obs.download_attempts += int(d_att)
        obs.download_failed += int(d_fail)
        obs.upload_attempts += int(u_att)
        obs.upload_failed += int(u_fail)
        obs.rtt = obs.rtt.merge(self._moments("day_facts", where, params, n, total))
        down: list[bytes] = []
        up: list[bytes] = []
        for d_blob, u_blob in self._plain(
                f"SELECT download_kbps, upload_kbps FROM day_facts WHERE {where}", params):
            down.append(d_blob)
            up.append(u_blob)
        obs.download_kbps += unpack_speeds(b"".join(down))
        obs.upload_kbps += unpack_speeds(b"".join(up))
        if invalid:
            obs.invalid_sessions += int(invalid)
            for (codes,) in self._plain(f"SELECT invalid_codes FROM day_facts WHERE {where} "
                                        "AND invalid_sessions > 0", params):
                for code, count in json.loads(codes).items():
                    obs.invalid_reasons[code] = obs.invalid_reasons.get(code, 0) + count

    def facts(self, probes: Sequence[str] | None = None, since: str | None = None,
              until: str | None = None) -> list[SessionFacts]:
        """Every session's facts in scope, by start time (a line's campaign)."""
        where, params = self._scope(probes, since, until)
        transfers: dict[str, list[TransferFact]] = {}
        for result_id, direction, ok, kbps in self._plain(
            f"SELECT result_id, direction, ok, kbps FROM transfer_facts WHERE {where} "
            "ORDER BY result_id, seq", params):
            transfers.setdefault(result_id, []).append(TransferFact(direction, bool(ok), kbps))
        return [
            SessionFacts(result_id=rid, probe_id=probe, started_at=started,
                         pings_sent=sent, pings_lost=lost, rtt=Moments(n, mean, m2),
                         rtts_ms=tuple(json.loads(rtts)),
                         transfers=tuple(transfers.get(rid, ())), valid=bool(valid),
                         invalid_codes=tuple(codes.split()))
            for probe, started, rid, sent, lost, n, mean, m2, rtts, valid, codes in self._plain(
                "SELECT probe_name, started_at, result_id, pings_sent, pings_lost, rtt_n, "
                f"rtt_mean_ms, rtt_m2, rtts_ms, valid, invalid_codes FROM session_facts "
                f"WHERE {where} ORDER BY started_at, result_id", params)
        ]

    def hourly(self, probes: Sequence[str] | None = None, since: str | None = None,
               until: str | None = None, include_invalid: bool = False) -> list[HourRow]:
        """Per UTC hour: sessions, pings, RTT sum and per-direction speed sums (plots of
        any scope size, collector/plots.py); valid sessions only unless asked."""
        where, params = self._scope(probes, since, until)
        if not include_invalid:
            where += " AND valid = 1"
        rows: dict[str, HourRow] = {}
        for hour, sessions, sent, lost, n, rtt_sum in self._plain(
            "SELECT substr(started_at, 1, 13), COUNT(*), TOTAL(pings_sent), "
            "TOTAL(pings_lost), TOTAL(rtt_n), TOTAL(rtt_n * rtt_mean_ms) FROM session_facts "
            f"WHERE {where} GROUP BY 1 ORDER BY 1", params):
            rows[hour] = HourRow(hour, sessions, int(sent), int(lost), int(n), rtt_sum)
        for hour, direction, count, total in self._plain(
            "SELECT substr(started_at, 1, 13), direction, COUNT(*), TOTAL(kbps) "
            f"FROM transfer_facts WHERE {where} AND ok = 1 AND kbps IS NOT NULL "
            "GROUP BY 1, 2", params):
            row = rows.setdefault(hour, HourRow(hour))
            if direction == "download":
                row.download_n, row.download_kbps_sum = count, total
            else:
                row.upload_n, row.upload_kbps_sum = count, total
        return [rows[h] for h in sorted(rows)]

    # --- InfluxDB outbox ------------------------------------------------------------------

    def outbox_batch(self, limit: int) -> list[tuple[str, str, LineMetadata]]:
        """The oldest ``limit`` queued results as (result_id, body, line). Bodies are
        decoded by the caller, one at a time, so one that fails is set apart alone."""
        rows = self._db.execute(
            "SELECT o.result_id, r.body, p.* FROM influx_outbox o "
            "JOIN results r ON r.result_id = o.result_id "
            "JOIN probes p ON p.name = r.probe_name ORDER BY o.seq LIMIT ?", (limit,))
        return [(row["result_id"], row["body"],
                 LineMetadata(**{c: row[c] for c in _LINE_COLUMNS})) for row in rows]

    def outbox_done(self, result_ids: Sequence[str]) -> None:
        with self._write():
            self._db.executemany("DELETE FROM influx_outbox WHERE result_id = ?",
                                 [(r,) for r in result_ids])
            # Written at last (a backfill after a fix): no longer a dead letter.
            self._db.executemany("DELETE FROM influx_dead_letters WHERE result_id = ?",
                                 [(r,) for r in result_ids])

    def outbox_dead_letter(self, result_id: str, reason: str, failed_at: str) -> None:
        """Out of the outbox, into the dead letters, in one transaction."""
        with self._write():
            self._db.execute("DELETE FROM influx_outbox WHERE result_id = ?", (result_id,))
            self._db.execute("INSERT OR REPLACE INTO influx_dead_letters "
                             "(result_id, failed_at, reason) VALUES (?, ?, ?)",
                             (result_id, failed_at, reason[:1000]))

    def outbox_dead_letters(self) -> list[dict[str, str]]:
        return [dict(row) for row in self._db.execute(
            "SELECT result_id, failed_at, reason FROM influx_dead_letters ORDER BY failed_at")]

    def outbox_dead_count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM influx_dead_letters").fetchone()[0])

    def outbox_retry_dead(self, queued_at: str) -> int:
        """Queue every dead letter again (after the cause was fixed); returns how many."""
        with self._write():
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO influx_outbox (result_id, queued_at) "
                "SELECT result_id, ? FROM influx_dead_letters ORDER BY failed_at",
                (queued_at,))
            self._db.execute("DELETE FROM influx_dead_letters")
        return cursor.rowcount

    def outbox_size(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM influx_outbox").fetchone()[0])

    def outbox_enqueue(self, probes: Sequence[str] | None, since: str | None,
                       until: str | None, queued_at: str) -> int:
        """Queue stored results again (a backfill after enabling the sink); returns how
        many were added (those already queued are not queued twice)."""
        where, params = self._scope(probes, since, until)
        with self._write():
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO influx_outbox (result_id, queued_at) "
                f"SELECT result_id, ? FROM results WHERE {where} ORDER BY started_at",
                [queued_at, *params])
        return cursor.rowcount

    def add_browser_result(self, received_at: str, client: str, body: str,
                           quota: Quota | None = None) -> int:
        with self._write():
            cursor = self._db.execute(
                "INSERT INTO browser_results (received_at, client, body) VALUES (?, ?, ?)",
                (received_at, client, body))
            if quota is not None:
                self._prune("browser_results", "received_at", cursor.lastrowid, quota)
        return int(cursor.lastrowid or 0)

    def _prune(self, table: str, time_column: str, rowid: int | None, quota: Quota) -> None:
        """Anonymous tables stay bounded (issue 12): rows older than the retention go, and
        past max_rows the oldest go. Checked every PRUNE_EVERY inserts, so the cost of
        counting is spread thin; between checks a table may run over by that many."""
        if not rowid or rowid % PRUNE_EVERY:
            return
        self._prune_now(table, time_column, quota)

    def _prune_now(self, table: str, time_column: str, quota: Quota) -> None:
        self._db.execute(f"DELETE FROM {table} WHERE {time_column} < ?", (quota.keep_after,))
        self._db.execute(
            f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} "
            f"ORDER BY {time_column} DESC LIMIT -1 OFFSET ?)", (quota.max_rows,))

    def prune_anonymous(self, browser: Quota, ndt7: Quota) -> None:
        """Apply the quotas now (at start and hourly): retention holds for a table that
        gets no new rows too."""
        with self._write():
            self._prune_now("browser_results", "received_at", browser)
            self._prune_now("ndt7_tests", "started_at", ndt7)

    def browser_results(self, since: str | None = None,
                        until: str | None = None) -> list[dict[str, Any]]:
        where, params = _period("received_at", since, until)
        return [{"id": r[0], "received_at": r[1], "client": r[2], **json.loads(r[3])}
                for r in self._db.execute(
                    f"SELECT id, received_at, client, body FROM browser_results {where} "
                    "ORDER BY id", params)]

    def add_ndt7_test(self, archive: dict[str, Any], started_at: str, ended_at: str,
                      quota: Quota | None = None) -> None:
        summary = archive["Summary"]
        with self._write():
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO ndt7_tests (uuid, test, started_at, ended_at, client, "
                "end_reason, throughput_bps, min_rtt_ms, body) VALUES (?,?,?,?,?,?,?,?,?)",
                (archive["UUID"], archive["Test"], started_at, ended_at, archive["Client"],
                 archive["EndReason"], summary["throughput_bps"], summary["min_rtt_ms"],
                 json.dumps(archive, separators=(",", ":"))))
            if quota is not None:
                self._prune("ndt7_tests", "started_at", cursor.lastrowid, quota)

    def ndt7_tests(self, since: str | None = None, until: str | None = None,
                   measurements: bool = False) -> list[dict[str, Any]]:
        """Stored ndt7 subtests, oldest first; the per-interval measurements only when
        asked (they are most of each record)."""
        where, params = _period("started_at", since, until)
        out = []
        for (body,) in self._db.execute(
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
        import ipaddress

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
        for test, client, reason, bps in self._db.execute(
                f"SELECT test, client, end_reason, throughput_bps FROM ndt7_tests {where} "
                "ORDER BY started_at", params):
            if wanted(client):
                ok = reason in ("done", "client_closed", "early_exit") and bps
                out.append(("ndt7", test, bps / 1000 if ok else None))
        return out

    def result(self, result_id: str) -> StoredResult | None:
        row = self._db.execute(
            "SELECT result_id, probe_name, started_at, ended_at, received_at, body, "
            "clock_skew_s "
            "FROM results WHERE result_id = ?",
            (result_id,),
        ).fetchone()
        return StoredResult(*row) if row else None

    def count_results(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0])


def _bounds(column: str, since: str | None, until: str | None) -> tuple[list[str], list[str]]:
    """Conditions and parameters for [since, until) on ``column`` (either end open)."""
    clauses, params = [], []
    if since is not None:
        clauses.append(f"{column} >= ?")
        params.append(since)
    if until is not None:
        clauses.append(f"{column} < ?")
        params.append(until)
    return clauses, params


def _period(column: str, since: str | None, until: str | None) -> tuple[str, list[str]]:
    """``WHERE`` clause and parameters for [since, until) on ``column``."""
    clauses, params = _bounds(column, since, until)
    return (f"WHERE {' AND '.join(clauses)}" if clauses else ""), params


def _client_host(client: str) -> str:
    """The address of a stored client: ``ip``, ``ip:port`` or ``[ipv6]:port``."""
    if client.startswith("["):
        return client[1:client.find("]")]
    if client.count(":") == 1:
        return client.split(":", 1)[0]
    return client


def _insert_facts(db: sqlite3.Connection, facts: SessionFacts,
                  probe_name: str | None = None) -> None:
    probe = probe_name or facts.probe_id
    rtt = facts.rtt
    db.execute(
        "INSERT INTO session_facts (probe_name, started_at, result_id, pings_sent, pings_lost, "
        "rtt_n, rtt_mean_ms, rtt_m2, rtts_ms, valid, invalid_codes) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (probe, facts.started_at, facts.result_id, facts.pings_sent, facts.pings_lost,
         rtt.n, rtt.mean, rtt.m2, json.dumps(facts.rtts_ms, separators=(",", ":")),
         int(facts.valid), " ".join(facts.invalid_codes)),
    )
    db.executemany(
        "INSERT INTO transfer_facts (probe_name, started_at, result_id, seq, direction, ok, "
        "kbps, valid) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [(probe, facts.started_at, facts.result_id, seq, t.direction, int(t.ok), t.kbps,
          int(facts.valid)) for seq, t in enumerate(facts.transfers)],
    )
    _add_to_day(db, probe, facts)


def pack_speeds(values: Sequence[float]) -> bytes:
    """Per-test speeds as little-endian float64 (the day rollup's speed columns)."""
    packed = array("d", values)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


def unpack_speeds(blob: bytes) -> list[float]:
    packed = array("d")
    packed.frombytes(blob)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tolist()


def _add_to_day(db: sqlite3.Connection, probe: str, facts: SessionFacts) -> None:
    """Merge one session into its probe's UTC-day rollup (same transaction as the facts)."""
    day = facts.started_at[:10]
    row = db.execute(
        "SELECT sessions, pings_sent, pings_lost, rtt_n, rtt_mean_ms, rtt_m2, "
        "download_attempts, download_failed, upload_attempts, upload_failed, download_kbps, "
        "upload_kbps, invalid_sessions, invalid_codes FROM day_facts "
        "WHERE probe_name = ? AND day = ?", (probe, day)).fetchone()
    if row is None:
        row = (0, 0, 0, 0, 0.0, 0.0, 0, 0, 0, 0, b"", b"", 0, "{}")
    (sessions, sent, lost, n, mean, m2, d_att, d_fail, u_att, u_fail, d_blob, u_blob,
     invalid, codes_json) = tuple(row)
    if facts.valid:
        rtt = Moments(n, mean, m2).merge(facts.rtt)
        n, mean, m2 = rtt.n, rtt.mean, rtt.m2
        sessions += 1
        sent += facts.pings_sent
        lost += facts.pings_lost
        down = [t for t in facts.transfers if t.direction == "download"]
        up = [t for t in facts.transfers if t.direction == "upload"]
        d_att += len(down)
        d_fail += sum(not t.ok for t in down)
        u_att += len(up)
        u_fail += sum(not t.ok for t in up)
        d_blob += pack_speeds([t.kbps for t in down if t.ok and t.kbps is not None])
        u_blob += pack_speeds([t.kbps for t in up if t.ok and t.kbps is not None])
    else:
        invalid += 1
        codes = json.loads(codes_json)
        for code in facts.invalid_codes:
            codes[code] = codes.get(code, 0) + 1
        codes_json = json.dumps(codes, sort_keys=True)
    db.execute(
        "INSERT OR REPLACE INTO day_facts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
        "?)", (probe, day, sessions, sent, lost, n, mean, m2, d_att, d_fail, u_att, u_fail,
               d_blob, u_blob, invalid, codes_json))


def _whole_days(since: str | None, until: str | None) -> tuple[str | None, str | None] | None:
    """The UTC days entirely inside [since, until) as day-start timestamps (None: open
    end), or None when no whole day fits."""
    lo = since
    if since is not None and not since.endswith("T00:00:00.000000Z"):
        nxt = datetime.strptime(since[:10], "%Y-%m-%d") + timedelta(days=1)
        lo = nxt.strftime("%Y-%m-%dT00:00:00.000000Z")
    hi = None if until is None else until[:10] + "T00:00:00.000000Z"
    if lo is not None and hi is not None and lo >= hi:
        return None
    return lo, hi


def _probe(row: sqlite3.Row) -> Probe:
    return Probe(
        name=row["name"],
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
        line=LineMetadata(**{c: row[c] for c in _LINE_COLUMNS}),
    )
