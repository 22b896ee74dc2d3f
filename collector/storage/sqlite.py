"""SQLite backend: the collector's embedded default, one file.

Durability (shared/reference/reliability.md §6): WAL journal, ``synchronous=FULL`` so an
acknowledged result survives power loss, writes in ``BEGIN IMMEDIATE`` transactions (no
deferred-upgrade SQLITE_BUSY), ``busy_timeout`` for concurrent CLI use, ``quick_check`` at
open. Schema changes are numbered migrations tracked in ``PRAGMA user_version``.

The queries are storage/sql.py's. One connection, not thread-safe: the web app runs the
store on one dedicated thread (``concurrency = 1``; SQLite has one writer anyway).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

from collector.errors import StoreError
from collector.storage.sql import Dialect as _Dialect
from collector.storage.sql import SqlStore, Tx, add_to_day, insert_session_facts

T = TypeVar("T")


def _in_json_list(column: str, values: Sequence[Any]) -> tuple[str, Any]:
    return f"{column} IN (SELECT value FROM json_each(?))", json.dumps(list(values))


DIALECT = _Dialect(
    name="sqlite", placeholder="?", no_limit="LIMIT -1", for_update="", skip_locked="",
    integrity_errors=(sqlite3.IntegrityError,), in_list=_in_json_list,
    # Every probe, named: the planner then reads each probe's time range from the
    # clustered key instead of probing the whole table through the time index.
    every_probe="probe_name IN (SELECT name FROM probes)",
)


def _backfill_facts(db: sqlite3.Connection) -> None:
    """Derive the facts of every stored result from its body (the master copy)."""
    from agent.schema import parse_result
    from collector.compliance.facts import of_result

    tx = Tx(db, DIALECT)
    for started_at, body, probe in db.execute(
            "SELECT started_at, body, probe_name FROM results").fetchall():
        facts = of_result(parse_result(json.loads(body)), started_at)
        insert_session_facts(tx, facts, probe)
        add_to_day(tx, probe, facts)


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
    # 10: the InfluxDB outbox is leased (issue 13): with many collector processes over one
    # database each queued result goes to one sink at a time; a lease that is not
    # finished (the process died) expires and the row is taken again.
    """
    ALTER TABLE influx_outbox ADD COLUMN lease_owner TEXT;
    ALTER TABLE influx_outbox ADD COLUMN leased_until TEXT;
    """,
    # 11: result bodies packed (storage/codec.py, issue 14): a new row keeps its
    # canonical JSON here, losslessly, in about a seventh of the bytes, and '' in body.
    # Rows stored before keep their text body (``compact`` packs them).
    """
    ALTER TABLE results ADD COLUMN body_packed BLOB;
    """,
    # 12: fleet control (issue 15): instruction rules (a probe selector, canonical JSON,
    # and its settings as JSON {dotted key: value}); suppression windows; each probe's
    # latest health report, as it sent it.
    """
    CREATE TABLE instruction_rules (
        selector TEXT PRIMARY KEY,
        settings TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE suppressions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        selector TEXT NOT NULL,
        starts_at TEXT NOT NULL,
        ends_at TEXT NOT NULL,
        reason TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE probe_health (
        probe_name TEXT PRIMARY KEY REFERENCES probes(name),
        received_at TEXT NOT NULL,
        clock_skew_s REAL,
        body TEXT NOT NULL
    );
    """,
    # 13: alerts (issue 16): one row per alert (dedup_key unique: a condition alerts
    # once), and each notifier's delivery state, leased by the collector process that
    # sends it.
    """
    CREATE TABLE alerts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        dedup_key TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        probe_name TEXT,
        severity TEXT NOT NULL,
        created_at TEXT NOT NULL,
        subject TEXT NOT NULL,
        details TEXT NOT NULL
    );
    CREATE TABLE alert_deliveries (
        alert_id INTEGER NOT NULL REFERENCES alerts(id) ON DELETE CASCADE,
        notifier TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        next_at TEXT NOT NULL,
        lease_owner TEXT,
        leased_until TEXT,
        last_error TEXT,
        delivered_at TEXT,
        PRIMARY KEY (alert_id, notifier)
    );
    CREATE INDEX alert_deliveries_due ON alert_deliveries (state, next_at);
    CREATE INDEX alerts_created ON alerts (created_at);
    """,
)


class SqliteStore(SqlStore):
    dialect = DIALECT
    concurrency = 1

    def __init__(self, path: str | Path, *, outbox: bool = False) -> None:
        super().__init__()
        self.path = Path(path)
        self.describe = str(self.path)
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

    @property
    def latest_version(self) -> int:
        return len(MIGRATIONS)

    def _migrate(self) -> None:
        current = self.schema_version
        if current > len(MIGRATIONS):
            raise StoreError(
                f"database {self.path} has schema version {current}, newer than this "
                f"collector ({len(MIGRATIONS)}); upgrade bbprobe"
            )
        for version in range(current, len(MIGRATIONS)):
            step = MIGRATIONS[version]

            def apply(tx: Tx, step: str | Callable[[sqlite3.Connection], None] = step,
                      version: int = version) -> None:
                if callable(step):
                    step(self._db)
                else:
                    for statement in step.split(";"):
                        if statement.strip():
                            self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {version + 1}")

            self._transaction(apply)

    @contextmanager
    def _reading(self) -> Iterator[Tx]:
        # Autocommit reads on the one connection: WAL gives each statement a snapshot.
        yield Tx(self._db, DIALECT)

    def _transaction(self, fn: Callable[[Tx], T]) -> T:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            value = fn(Tx(self._db, DIALECT))
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return value

    def vacuum(self) -> None:
        """Rewrite the file without its free pages (after ``compact``): needs free disk
        about the database's size while it runs, and the collector stopped."""
        try:
            self._db.execute("VACUUM")
            # VACUUM goes through the WAL: fold it back into the file and truncate it.
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot vacuum {self.path}: {exc}") from None

    def size_bytes(self) -> int:
        """The database's size on disk (the file and its WAL)."""
        total = 0
        for suffix in ("", "-wal"):
            with suppress(OSError):
                total += Path(str(self.path) + suffix).stat().st_size
        return total
