"""PostgreSQL backend: one database behind many collector processes.

Driver: psycopg 3 (PyPI ``psycopg[binary,pool]``), not asyncpg. The store is synchronous
(the CLI and migrations call it directly; the web app runs it on database threads), and
psycopg has a synchronous API of the same DB-API shape as sqlite3, so both backends share
storage/sql.py. It parses libpq connection URIs with libpq itself (sslmode, service
files, ~/.pgpass, $PGPASSWORD all work as in psql), and ``psycopg_pool`` gives a
thread-safe pool. asyncpg is faster per query but asynchronous only, with its own URI
parser.

- Every text column is ``COLLATE "C"``: keys, names and timestamps sort by their bytes,
  as in SQLite, whatever the database's locale (a report must not depend on it).
- Writes are READ COMMITTED transactions. A result inserted by two processes at once:
  the second ``INSERT ... ON CONFLICT DO NOTHING`` waits for the first to commit, then
  finds the row (duplicate, or conflict). A day rollup is read ``FOR UPDATE``. A
  transaction the server aborts for a deadlock or a serialization failure is run again.
- Reads that take several statements (a report) run in one REPEATABLE READ READ ONLY
  transaction: one snapshot.
- Migrations are numbered, as SQLite's, in table ``bbprobe_schema``, applied under an
  advisory lock so processes starting together migrate once.
- The password never appears in a message: URIs are shown with it masked.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import quote

import psycopg
import psycopg_pool
from psycopg import errors as pg_errors

from collector.errors import StoreError, Unacceptable
from collector.storage import refusals
from collector.storage.sql import Dialect, SqlStore, Tx

T = TypeVar("T")


def _in_array(column: str, values: Sequence[Any]) -> tuple[str, Any]:
    return f"{column} = ANY(?)", list(values)


DIALECT = Dialect(
    name="postgresql", placeholder="%s", no_limit="", for_update="FOR UPDATE",
    skip_locked="FOR UPDATE SKIP LOCKED", integrity_errors=(pg_errors.UniqueViolation,),
    in_list=_in_array, every_probe="", binary_results=True,
)

RETRIED = (pg_errors.DeadlockDetected, pg_errors.SerializationFailure)
ATTEMPTS = 6
# pg_advisory_xact_lock key for migrations: "bbpr".
MIGRATION_LOCK = 0x62627072


def _reclassify_refusals(tx: Tx) -> None:
    refusals.reclassify(tx, DIALECT)


# The schema of SQLite's version 10 (storage/sqlite.py), as PostgreSQL types. Each entry
# upgrades version i to i + 1: SQL statements, or a function that rewrites data; never
# edit a shipped one. "TEXT" is every text column and becomes TEXT COLLATE "C" (see
# above).
MIGRATIONS: tuple[str | Callable[[Tx], None], ...] = (
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
        download_nominal_kbps DOUBLE PRECISION,
        download_min_kbps DOUBLE PRECISION,
        upload_nominal_kbps DOUBLE PRECISION,
        upload_min_kbps DOUBLE PRECISION,
        max_delay_ms DOUBLE PRECISION,
        max_loss_ratio DOUBLE PRECISION
    );
    CREATE TABLE results (
        result_id TEXT PRIMARY KEY,
        probe_name TEXT NOT NULL REFERENCES probes(name),
        schema_version INTEGER NOT NULL,
        started_at TEXT NOT NULL,
        ended_at TEXT NOT NULL,
        received_at TEXT NOT NULL,
        body_sha256 TEXT NOT NULL,
        body TEXT NOT NULL,
        clock_skew_s DOUBLE PRECISION,
        session_seq BIGINT
    );
    CREATE INDEX results_probe_started ON results (probe_name, started_at);
    CREATE INDEX results_started ON results (started_at);
    CREATE INDEX results_probe_seq ON results (probe_name, session_seq)
        WHERE session_seq IS NOT NULL;
    CREATE TABLE session_facts (
        probe_name TEXT NOT NULL,
        started_at TEXT NOT NULL,
        result_id TEXT NOT NULL UNIQUE REFERENCES results(result_id),
        pings_sent INTEGER NOT NULL,
        pings_lost INTEGER NOT NULL,
        rtt_n INTEGER NOT NULL,
        rtt_mean_ms DOUBLE PRECISION NOT NULL,
        rtt_m2 DOUBLE PRECISION NOT NULL,
        rtts_ms TEXT NOT NULL,
        valid INTEGER NOT NULL,
        invalid_codes TEXT NOT NULL,
        PRIMARY KEY (probe_name, started_at, result_id)
    );
    CREATE TABLE transfer_facts (
        probe_name TEXT NOT NULL,
        started_at TEXT NOT NULL,
        result_id TEXT NOT NULL REFERENCES results(result_id),
        seq INTEGER NOT NULL,
        direction TEXT NOT NULL,
        ok INTEGER NOT NULL,
        kbps DOUBLE PRECISION,
        valid INTEGER NOT NULL,
        PRIMARY KEY (probe_name, started_at, result_id, seq)
    );
    CREATE TABLE day_facts (
        probe_name TEXT NOT NULL,
        day TEXT NOT NULL,
        sessions INTEGER NOT NULL,
        pings_sent BIGINT NOT NULL,
        pings_lost BIGINT NOT NULL,
        rtt_n BIGINT NOT NULL,
        rtt_mean_ms DOUBLE PRECISION NOT NULL,
        rtt_m2 DOUBLE PRECISION NOT NULL,
        download_attempts INTEGER NOT NULL,
        download_failed INTEGER NOT NULL,
        upload_attempts INTEGER NOT NULL,
        upload_failed INTEGER NOT NULL,
        download_kbps BYTEA NOT NULL,
        upload_kbps BYTEA NOT NULL,
        invalid_sessions INTEGER NOT NULL,
        invalid_codes TEXT NOT NULL,
        PRIMARY KEY (probe_name, day)
    );
    CREATE TABLE influx_outbox (
        seq BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        result_id TEXT NOT NULL UNIQUE REFERENCES results(result_id),
        queued_at TEXT NOT NULL,
        lease_owner TEXT,
        leased_until TEXT
    );
    CREATE TABLE gaps (
        gap_id TEXT PRIMARY KEY,
        probe_name TEXT NOT NULL REFERENCES probes(name),
        received_at TEXT NOT NULL,
        reason TEXT NOT NULL,
        dropped BIGINT NOT NULL,
        first_started_at TEXT NOT NULL,
        last_started_at TEXT NOT NULL,
        body_sha256 TEXT NOT NULL,
        seq_ranges TEXT NOT NULL DEFAULT '[]'
    );
    CREATE INDEX gaps_probe ON gaps (probe_name, first_started_at);
    CREATE TABLE tokens (
        name TEXT PRIMARY KEY,
        role TEXT NOT NULL CHECK (role IN ('analyst', 'admin')),
        token_sha256 TEXT NOT NULL UNIQUE,
        created_at TEXT NOT NULL,
        revoked_at TEXT
    );
    CREATE TABLE browser_results (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        received_at TEXT NOT NULL,
        client TEXT NOT NULL,
        body TEXT NOT NULL
    );
    CREATE INDEX browser_results_received ON browser_results (received_at);
    CREATE TABLE ndt7_tests (
        uuid TEXT PRIMARY KEY,
        test TEXT NOT NULL CHECK (test IN ('download', 'upload')),
        started_at TEXT NOT NULL,
        ended_at TEXT NOT NULL,
        client TEXT NOT NULL,
        end_reason TEXT NOT NULL,
        throughput_bps DOUBLE PRECISION,
        min_rtt_ms DOUBLE PRECISION,
        body TEXT NOT NULL
    );
    CREATE INDEX ndt7_tests_started ON ndt7_tests (started_at);
    CREATE TABLE influx_dead_letters (
        result_id TEXT PRIMARY KEY REFERENCES results(result_id),
        failed_at TEXT NOT NULL,
        reason TEXT NOT NULL
    );
    """,
    # 2 (SQLite's 11): the packed body (storage/codec.py, issue 14). Stored as it is
    # (STORAGE EXTERNAL): it is zstd already, and pglz would only spend CPU on it.
    """
    ALTER TABLE results ADD COLUMN body_packed BYTEA;
    ALTER TABLE results ALTER COLUMN body_packed SET STORAGE EXTERNAL
    """,
    # 3 (SQLite's 12): fleet control (issue 15).
    """
    CREATE TABLE instruction_rules (
        selector TEXT PRIMARY KEY,
        settings TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE suppressions (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        selector TEXT NOT NULL,
        starts_at TEXT NOT NULL,
        ends_at TEXT NOT NULL,
        reason TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE probe_health (
        probe_name TEXT PRIMARY KEY REFERENCES probes(name),
        received_at TEXT NOT NULL,
        clock_skew_s DOUBLE PRECISION,
        body TEXT NOT NULL
    )
    """,
    # 4 (SQLite's 13): alerts (issue 16).
    """
    CREATE TABLE alerts (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        dedup_key TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        probe_name TEXT,
        severity TEXT NOT NULL,
        created_at TEXT NOT NULL,
        subject TEXT NOT NULL,
        details TEXT NOT NULL
    );
    CREATE TABLE alert_deliveries (
        alert_id BIGINT NOT NULL REFERENCES alerts(id) ON DELETE CASCADE,
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
    CREATE INDEX alerts_created ON alerts (created_at)
    """,
    # 5 (SQLite's 14 and 15): the 156/23/CONS KPIs (issue 16): normally available speeds;
    # jitter terms per session and day (whole nanoseconds: exact sums), backfilled from
    # the raw RTTs (answered ones, in train order: the sum of |differences| of
    # consecutive ones, each rounded to the nanosecond as facts.jitter_terms does, and
    # their number); the technologies spelt as collector/lines.py does. One pass over
    # session_facts under the migration's lock: on a big database, upgrade in a quiet
    # hour (README).
    """
    ALTER TABLE probes ADD COLUMN download_normal_kbps DOUBLE PRECISION;
    ALTER TABLE probes ADD COLUMN upload_normal_kbps DOUBLE PRECISION;
    ALTER TABLE session_facts ADD COLUMN jitter_sum_ns BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE session_facts ADD COLUMN jitter_pairs INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE day_facts ADD COLUMN jitter_sum_ns BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE day_facts ADD COLUMN jitter_pairs INTEGER NOT NULL DEFAULT 0;
    UPDATE probes SET technology = 'ADSL' WHERE lower(trim(technology)) = 'adsl';
    UPDATE probes SET technology = 'VDSL' WHERE lower(trim(technology)) = 'vdsl';
    UPDATE probes SET technology = 'FTTC' WHERE lower(trim(technology)) = 'fttc';
    UPDATE probes SET technology = 'FTTB' WHERE lower(trim(technology)) = 'fttb';
    UPDATE probes SET technology = 'FTTH' WHERE lower(trim(technology)) = 'ftth';
    UPDATE probes SET technology = 'FWA' WHERE lower(trim(technology)) = 'fwa';
    UPDATE probes SET technology = 'cable' WHERE lower(trim(technology)) = 'cable';
    UPDATE probes SET technology = 'satellite' WHERE lower(trim(technology)) = 'satellite';
    UPDATE probes SET technology = 'other' WHERE lower(trim(technology)) = 'other';
    UPDATE session_facts s SET jitter_sum_ns = j.total, jitter_pairs = j.pairs FROM (
        SELECT result_id, COALESCE(SUM(ROUND(ABS(v - prev) * 1000000)), 0)::bigint AS total,
               COUNT(prev) AS pairs
        FROM (SELECT f.result_id, e.value::text::float8 AS v,
                     LAG(e.value::text::float8) OVER (PARTITION BY f.result_id
                                                      ORDER BY e.ord) AS prev
              FROM session_facts f,
                   jsonb_array_elements(f.rtts_ms::jsonb) WITH ORDINALITY AS e(value, ord)
              WHERE jsonb_typeof(e.value) = 'number') answered
        GROUP BY result_id) j
    WHERE s.result_id = j.result_id;
    UPDATE day_facts d SET jitter_sum_ns = x.total, jitter_pairs = x.pairs FROM (
        SELECT probe_name, substr(started_at, 1, 10) AS day, SUM(jitter_sum_ns) AS total,
               SUM(jitter_pairs) AS pairs
        FROM session_facts WHERE valid = 1 GROUP BY 1, 2) x
    WHERE d.probe_name = x.probe_name AND d.day = x.day
    """,
    # 6 (SQLite's 16): the IP version each session measured over (schema 6, issue 16).
    # NULL: unknown; every row already stored is of schema 5 or older (no backfill).
    """
    ALTER TABLE session_facts ADD COLUMN address_family TEXT;
    ALTER TABLE session_facts ADD COLUMN dual_stack INTEGER NOT NULL DEFAULT 0
    """,
    # 7 (SQLite's 17): results an operator removed (issue 23), an audit row each.
    """
    CREATE TABLE result_deletions (
        id BIGSERIAL PRIMARY KEY,
        result_id TEXT NOT NULL,
        probe_name TEXT NOT NULL,
        started_at TEXT NOT NULL,
        session_seq BIGINT,
        body_sha256 TEXT NOT NULL,
        deleted_at TEXT NOT NULL,
        deleted_by TEXT NOT NULL,
        reason TEXT NOT NULL
    );
    CREATE INDEX result_deletions_probe ON result_deletions (probe_name)
    """,
    # 8 (SQLite's 18): attempts the measurement server refused (issue 24), counted apart
    # from the line's failures, per session with the server that refused them, and per
    # day as JSON {server: attempts}; the audit of migration 9, a row per stored session
    # it reclassified.
    """
    ALTER TABLE session_facts ADD COLUMN refused_attempts INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE session_facts ADD COLUMN refused_server TEXT;
    ALTER TABLE day_facts ADD COLUMN refused_servers TEXT NOT NULL DEFAULT '{}';
    CREATE TABLE refusal_reclassifications (
        id BIGSERIAL PRIMARY KEY,
        result_id TEXT NOT NULL,
        probe_name TEXT NOT NULL,
        started_at TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        refused_server TEXT,
        migrated_at TEXT NOT NULL
    );
    CREATE INDEX refusal_reclassifications_probe
        ON refusal_reclassifications (probe_name, started_at)
    """,
    # 9 (SQLite's 19): the refusals stored before as failed attempts, out of the failure
    # rate (storage/refusals.py): only sessions with a failed transfer fact are decoded;
    # each session changed is logged in sum and listed in refusal_reclassifications.
    _reclassify_refusals,
)


def masked(url: str) -> str:
    """The URI as shown in messages and logs: any password (in the user part or as a
    ``password=`` parameter) replaced by ***. A URI libpq cannot parse is not shown at
    all (its error text may quote the password)."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error:
        return "<a PostgreSQL URI that does not parse: check its percent-encoding>"
    user = params.pop("user", None)
    secret = params.pop("password", None)
    host = str(params.pop("host", "") or "")
    port = str(params.pop("port", "") or "")
    dbname = str(params.pop("dbname", "") or "")
    hosts = host.split(",") if host else []
    ports = port.split(",") if port else []
    netloc = ",".join(h if "/" not in h else quote(h, safe="") for h in hosts)
    if ports:
        netloc = ",".join(f"{h}:{p}" for h, p in zip(hosts or [""] * len(ports), ports,
                                                      strict=False))
    if user is not None:
        netloc = f"{user}{':***' if secret is not None else ''}@{netloc}"
    elif secret is not None:
        netloc = f":***@{netloc}"
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return f"postgresql://{netloc}/{dbname}" + (f"?{query}" if query else "")


def _ddl(step: str) -> str:
    return step.replace(" TEXT", ' TEXT COLLATE "C"')


class PostgresStore(SqlStore):
    dialect = DIALECT

    def __init__(self, url: str, *, outbox: bool = False, password: str | None = None,
                 pool_size: int = 8, connect_timeout_s: float = 10.0) -> None:
        super().__init__()
        self.url = url
        self.describe = masked(url)
        self.outbox = outbox
        self.concurrency = pool_size
        kwargs: dict[str, Any] = {"autocommit": True,
                                  "connect_timeout": max(1, round(connect_timeout_s)),
                                  "application_name": "bbprobe-collector"}
        if password is not None:
            kwargs["password"] = password
        try:
            psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.Error:
            # libpq's text may quote the password: say what is wrong, not what it read.
            raise StoreError("storage.url: not a PostgreSQL connection URI libpq can parse "
                             "(check its percent-encoding)") from None
        try:
            # One connection first: a wrong password or host fails now, with libpq's own
            # reason (the pool would only retry until its timeout).
            psycopg.connect(url, **kwargs).close()
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to PostgreSQL at {self.describe}: "
                             f"{_reason(exc)}") from None
        self._pool = psycopg_pool.ConnectionPool(
            url, kwargs=kwargs, min_size=1, max_size=pool_size, open=False,
            timeout=connect_timeout_s + 20, name="bbprobe",
            # A connection the server dropped (a restart, a failover) is replaced before
            # it is handed out, not failed at the next request.
            check=psycopg_pool.ConnectionPool.check_connection)
        try:
            self._pool.open(wait=True, timeout=connect_timeout_s + 5)
        except (psycopg_pool.PoolTimeout, psycopg.Error) as exc:
            self._pool.close()
            raise StoreError(f"cannot connect to PostgreSQL at {self.describe}: "
                             f"{_reason(exc)}") from None
        try:
            self._migrate()
        except psycopg.Error as exc:
            self._pool.close()
            raise StoreError(f"cannot use PostgreSQL at {self.describe}: {_reason(exc)}"
                             ) from None
        except BaseException:
            self._pool.close()
            raise

    def close(self) -> None:
        self._pool.close()

    @property
    def latest_version(self) -> int:
        return len(MIGRATIONS)

    @property
    def schema_version(self) -> int:
        with self._pool.connection() as conn:
            row = conn.execute(
                "SELECT version FROM bbprobe_schema").fetchone() if self._has_schema(
                conn) else None
        return int(row[0]) if row else 0

    @staticmethod
    def _has_schema(conn: psycopg.Connection[Any]) -> bool:
        row = conn.execute("SELECT to_regclass('bbprobe_schema')").fetchone()
        return row is not None and row[0] is not None

    def _migrate(self) -> None:
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS bbprobe_schema (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM bbprobe_schema").fetchone()
            if row is None:
                conn.execute("INSERT INTO bbprobe_schema VALUES (0)")
            current = int(row[0]) if row else 0
            if current > len(MIGRATIONS):
                raise StoreError(
                    f"database {self.describe} has schema version {current}, newer than "
                    f"this collector ({len(MIGRATIONS)}); upgrade bbprobe")
            for version in range(current, len(MIGRATIONS)):
                step = MIGRATIONS[version]
                if callable(step):
                    step(Tx(conn, DIALECT))
                else:
                    for statement in _ddl(step).split(";"):
                        if statement.strip():
                            conn.execute(statement.encode())
                conn.execute("UPDATE bbprobe_schema SET version = %s", (version + 1,))

    @contextmanager
    def _reading(self) -> Iterator[Tx]:
        try:
            with self._pool.connection() as conn, conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                yield Tx(conn, DIALECT)
        except psycopg_pool.PoolTimeout as exc:
            raise StoreError(f"PostgreSQL at {self.describe}: {exc}") from None

    def _transaction(self, fn: Callable[[Tx], T]) -> T:
        for attempt in range(ATTEMPTS):
            try:
                with self._pool.connection() as conn, conn.transaction():
                    # What the insert and the row locks assume, whatever the database's
                    # default_transaction_isolation says.
                    conn.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
                    return fn(Tx(conn, DIALECT))
            except RETRIED:
                if attempt == ATTEMPTS - 1:
                    raise
                # The other transaction goes on; ours starts again a moment later.
                time.sleep(random.uniform(0.005, 0.05) * (attempt + 1))
            except psycopg_pool.PoolTimeout as exc:
                raise StoreError(f"PostgreSQL at {self.describe}: {exc}") from None
        raise AssertionError("unreachable")

    def after_load(self, table: str) -> None:
        """After copying rows with their generated keys: move the key's sequence past
        them, so the next insert does not collide."""
        column = {"browser_results": "id", "influx_outbox": "seq",
                  "suppressions": "id", "alerts": "id", "result_deletions": "id",
                  "refusal_reclassifications": "id"}.get(table)
        if column is not None:
            self._transaction(lambda tx: tx.run(
                f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'), "
                f"GREATEST(COALESCE(MAX({column}), 0), 1)) FROM {table}"))

    def vacuum(self) -> None:
        raise Unacceptable("--vacuum is for SQLite; PostgreSQL reuses the freed space for "
                           "new rows (VACUUM FULL results returns it)")

    def size_bytes(self) -> int:
        return self._count("SELECT pg_database_size(current_database())")


def _reason(exc: BaseException) -> str:
    """libpq's message, first line (it names host and user, never the password)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
