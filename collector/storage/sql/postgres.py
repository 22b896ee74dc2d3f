"""PostgreSQL backend: one database behind many collector processes.

Driver: psycopg 3 (PyPI ``psycopg[binary,pool]``), not asyncpg. The store is synchronous
(the CLI and migrations call it directly; the web app runs it on database threads), and
psycopg has a synchronous API of the same DB-API shape as sqlite3, so both backends share
storage/sql/. It parses libpq connection URIs with libpq itself (sslmode, service
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
- ``results``, ``session_facts`` and ``transfer_facts`` are partitioned by month
  (storage/sql/partitions.py); each process that opens the database creates the
  partitions of the coming months it finds missing, and a serving collector does it
  again daily (``maintain_partitions``, from collector/server/app.py).
- ``read_only``: a streaming replica (storage.read_url) for analysts' reads. It is never
  migrated (a standby follows its primary's schema, and accepts no writes): opening it
  checks that its schema is this collector's; a write through it is a StoreFault.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime
from functools import partial
from typing import Any, TypeVar

import psycopg
import psycopg_pool
from psycopg import errors as pg_errors

from collector.errors import StoreError, StoreFault, StoreUnavailable, Unacceptable, Unstorable
from collector.storage.sql import SqlStore, partitions
from collector.storage.sql import partition_migration as migration
from collector.storage.sql.base import Dialect, Tx, database_error, first_line
from collector.storage.sql.postgres_migrations import MIGRATIONS, ddl
from collector.storage.uri import masked

T = TypeVar("T")
log = logging.getLogger("bbprobe.collector")


def _in_array(column: str, values: Sequence[Any]) -> tuple[str, Any]:
    return f"{column} = ANY(?)", list(values)


DIALECT = Dialect(
    name="postgresql", placeholder="%s", no_limit="", for_update="FOR UPDATE",
    skip_locked="FOR UPDATE SKIP LOCKED", integrity_errors=(pg_errors.UniqueViolation,),
    in_list=_in_array, every_probe="", binary_results=True,
)

RETRIED = (pg_errors.DeadlockDetected, pg_errors.SerializationFailure)
ATTEMPTS = 6
# pg_advisory_xact_lock key for migrations: "bbpr"; for partition maintenance: "bbpm".
MIGRATION_LOCK = 0x62627072
PARTITION_LOCK = 0x6262706D
# The migration's switch and cleanup: tries, each waiting at most its lock_timeout.
SWITCH_ATTEMPTS = 30
# How long opening a replica waits for it to replay its primary's last migration.
REPLICA_CATCH_UP_S = 30.0
# Creating partitions ahead, by a collector (at start, then daily): each statement's
# limit, so a default partition larger than expected cannot hold ingest up for long.
MAINTENANCE_STATEMENT_TIMEOUT = "60s"
# More results than this in the default partitions (rows of months with no partition of
# their own: a collector that could not create them, or an old database not migrated)
# is logged as a warning by the daily pass: reads of them are not pruned by month, and
# past partitions.DEFAULT_SMALL only `partitions migrate` moves them.
DEFAULT_WARN_ROWS = 5_000
# A hot standby cancels a query whose snapshot holds back WAL replay for longer than
# max_standby_streaming_delay (default 30 s), SQLSTATE 40001 "canceling statement due to
# conflict with recovery" (PostgreSQL manual, Hot Standby, "Handling Query Conflicts");
# a report's passes share one snapshot, so a long one meets it unless the replica has
# hot_standby_feedback on. (The text, not the code: 40001 is any serialization failure,
# and an idle session's is "terminating connection due to conflict with recovery".)
RECOVERY_CONFLICT = "conflict with recovery"


@contextmanager
def _translated(describe: str) -> Iterator[None]:
    """psycopg's errors as the store's own (collector/errors.py), at the store's edge:
    nothing above it knows the driver. No pooled connection free in time, a connection
    lost (a restart, a failover) or a statement cancelled is the database unavailable for
    now (an InterfaceError, the driver used wrongly, is a fault: a bug, not an outage);
    a DataError a value PostgreSQL cannot hold (a NUL in text, a number out of its
    type's range); any other a statement it refused."""
    try:
        yield
    except psycopg_pool.PoolTimeout as exc:
        raise StoreUnavailable(f"PostgreSQL at {describe}: {exc}") from None
    except psycopg.OperationalError as exc:
        if RECOVERY_CONFLICT in str(exc):
            raise StoreUnavailable(
                f"PostgreSQL at {describe}: the replica cancelled the read (conflict with "
                "recovery); set hot_standby_feedback = on on the replica, or a longer "
                "max_standby_streaming_delay (storage.read_url)") from exc
        raise StoreUnavailable(database_error(exc)) from exc
    except psycopg.DataError as exc:
        raise Unstorable(database_error(exc)) from exc
    except psycopg.Error as exc:
        raise StoreFault(database_error(exc)) from exc


class PostgresStore(SqlStore):
    dialect = DIALECT

    def __init__(self, url: str, *, outbox: bool = False, password: str | None = None,
                 pool_size: int = 8, connect_timeout_s: float = 10.0,
                 read_only: bool = False) -> None:
        super().__init__()
        self.url = url
        self.describe = masked(url)
        self.outbox = outbox
        self.read_only = read_only
        key = "storage.read_url" if read_only else "storage.url"
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
            raise StoreError(f"{key}: not a PostgreSQL connection URI libpq can parse "
                             "(check its percent-encoding)") from None
        try:
            # One connection first: a wrong password or host fails now, with libpq's own
            # reason (the pool would only retry until its timeout).
            psycopg.connect(url, **kwargs).close()
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to PostgreSQL at {self.describe}: "
                             f"{first_line(exc)}") from None
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
                             f"{first_line(exc)}") from None
        try:
            if read_only:
                self._check_replica()
            else:
                self._migrate()
                self._create_ahead()
        except psycopg.Error as exc:
            self._pool.close()
            raise StoreError(f"cannot use PostgreSQL at {self.describe}: {first_line(exc)}"
                             ) from None
        except BaseException:
            self._pool.close()
            raise

    def close(self) -> None:
        self._pool.close()

    @property
    def schema_version(self) -> int:
        with _translated(self.describe), self._pool.connection() as conn:
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
                    for statement in ddl(step).split(";"):
                        if statement.strip():
                            conn.execute(statement.encode())
                conn.execute("UPDATE bbprobe_schema SET version = %s", (version + 1,))

    def _check_replica(self) -> None:
        """A replica's schema is its primary's: this collector's, or opening it fails (a
        replica a little behind its primary's migration is waited for)."""
        deadline = time.monotonic() + REPLICA_CATCH_UP_S
        while True:
            with self._pool.connection() as conn:
                row = conn.execute("SELECT version FROM bbprobe_schema").fetchone() \
                    if self._has_schema(conn) else None
            current = int(row[0]) if row else 0
            if current == len(MIGRATIONS):
                return
            if current > len(MIGRATIONS) or time.monotonic() > deadline:
                raise StoreError(
                    f"storage.read_url: database {self.describe} has schema version "
                    f"{current}, this collector's is {len(MIGRATIONS)}; it must be a "
                    "replica of storage.url, once the collector has migrated that")
            time.sleep(0.5)

    def _create_ahead(self, today: date | None = None, warn: bool = False) -> list[str]:
        """This month's and the next months' partitions, if missing (the months made).
        Skipped, not waited for, when another process does it or a long transaction
        holds the tables; and while the default partitions hold many rows (``partitions
        migrate`` moves them): each month attached would scan them under a lock that
        holds up ingest. ``warn``: say so when they hold more than DEFAULT_WARN_ROWS."""
        try:
            with self._pool.connection() as conn, conn.transaction():
                tx = Tx(conn, DIALECT)
                got = tx.one("SELECT pg_try_advisory_xact_lock(?), "
                             "to_regclass('results_default') IS NOT NULL", (PARTITION_LOCK,))
                # (Not partitioned: a schema before 14, only in tests of the migration.)
                if not (got and got[0] and got[1]):
                    return []
                tx.run("SELECT set_config('statement_timeout', ?, true)",
                       (MAINTENANCE_STATEMENT_TIMEOUT,))
                held = partitions.default_rows(tx, max(partitions.DEFAULT_SMALL,
                                                       DEFAULT_WARN_ROWS))
                if warn and held > DEFAULT_WARN_ROWS and not partitions.migrating(tx):
                    log.warning("the default partitions hold more than %d results (months "
                                "with no partition of their own): reads of them are not "
                                "pruned by month; run `bbprobe-collector partitions "
                                "migrate`", DEFAULT_WARN_ROWS)
                if held > partitions.DEFAULT_SMALL:
                    return []
                made = partitions.create_ahead(tx, today or datetime.now(UTC).date())
                if made:
                    log.info("created the partitions of %s", ", ".join(made))
                return made
        except (pg_errors.LockNotAvailable, pg_errors.QueryCanceled):
            log.warning("partitions not created ahead: the tables are busy (tried again "
                        "tomorrow, or `bbprobe-collector partitions create-ahead`)")
            return []

    def maintain_partitions(self, today: date | None = None) -> list[str]:
        """The daily pass of a serving collector (collector/server/app.py): the coming
        months' partitions, as at start, so one that runs for months never routes new
        sessions to the default partition; a warning when the default holds many rows."""
        with _translated(self.describe):
            return self._create_ahead(today, warn=True)

    # --- partitions (storage/sql/partitions.py) ----------------------------------------------

    def partition_months(self) -> list[partitions.Month]:
        with self._reading() as tx:
            return partitions.months(tx)

    def partitions_create_ahead(self, today: datetime, ahead: int) -> list[str]:
        """``partitions create-ahead``: as a collector does at start, but refusing, not
        skipping: one at a time (the lock ``partitions migrate`` takes: two making the
        same month's tables would fail one of them), and not over large default
        partitions (review 2, finding 2: each month made would hold ingest and reads
        up for a scan of them)."""
        def work(tx: Tx) -> list[str]:
            got = tx.one("SELECT pg_try_advisory_xact_lock(?)", (PARTITION_LOCK,))
            if not (got and got[0]):
                raise StoreFault("partitions create-ahead: another `partitions migrate` or "
                                 "create-ahead is running; try again when it is done")
            if partitions.migrating(tx):
                return []  # the migration's switch attaches them, with no scan
            if not partitions.default_is_small(tx):
                raise Unacceptable(
                    f"partitions create-ahead: the default partitions hold more than "
                    f"{partitions.DEFAULT_SMALL:,} results, and each month made would stop "
                    "ingest for a scan of them: run `bbprobe-collector partitions migrate` "
                    "first")
            return partitions.create_ahead(tx, today.date(), ahead)

        return self._transaction(work)

    def partitions_migrate_step(self) -> migration.Step | None:
        """One step of the online migration (storage/sql/partition_migration.py): the
        oldest month not copied yet copied, in transactions of ``migration.BATCH``
        results; once all are, the switch, then the old tables dropped. None when the
        default partitions hold no rows of a month to make. One ``partitions migrate`` at
        a time (an advisory lock)."""
        with _translated(self.describe), self._pool.connection() as conn:
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (PARTITION_LOCK,)).fetchone()
            if not (row and row[0]):
                raise StoreFault("another `partitions migrate` or create-ahead is running")
            try:
                return _MigrateStep(conn).run()
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (PARTITION_LOCK,))

    def partitions_detach(self, month: str) -> bool:
        return self._transaction(lambda tx: partitions.detach_month(tx, month))

    @contextmanager
    def _reading(self) -> Iterator[Tx]:
        with (_translated(self.describe), self._pool.connection() as conn,
              conn.transaction()):
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield Tx(conn, DIALECT)

    def _transaction(self, fn: Callable[[Tx], T]) -> T:
        if self.read_only:
            raise StoreFault(f"{self.describe} is storage.read_url, a replica for reads: "
                             "this command writes, and must use storage.url")
        with _translated(self.describe):
            for attempt in range(ATTEMPTS):
                try:
                    with self._pool.connection() as conn, conn.transaction():
                        # What the insert and the row locks assume, whatever the
                        # database's default_transaction_isolation says.
                        conn.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
                        return fn(Tx(conn, DIALECT))
                except RETRIED:
                    if attempt == ATTEMPTS - 1:
                        raise
                    # The other transaction goes on; ours starts again a moment later.
                    time.sleep(random.uniform(0.005, 0.05) * (attempt + 1))
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


class _MigrateStep:
    """``PostgresStore.partitions_migrate_step`` on one connection: each piece of work in
    a READ COMMITTED transaction of its own, so no lock outlives its piece."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def _tx(self, fn: Callable[[Tx], T]) -> T:
        with self.conn.transaction():
            self.conn.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            return fn(Tx(self.conn, DIALECT))

    def _patient(self, fn: Callable[[Tx], T]) -> T:
        """``fn`` in a transaction, tried again when its lock_timeout expires: waiting in
        a lock's queue holds up whoever comes after, so each wait is short."""
        for attempt in range(SWITCH_ATTEMPTS):
            try:
                return self._tx(fn)
            except pg_errors.LockNotAvailable:
                if attempt == SWITCH_ATTEMPTS - 1:
                    raise StoreFault("partitions migrate: the tables stayed busy (long "
                                     "transactions); nothing changed, run it again") from None
                time.sleep(random.uniform(0.5, 2.0))
        raise AssertionError("unreachable")

    def run(self) -> migration.Step | None:
        cleanup = self._tx(migration.after_switch)
        if cleanup and not self._tx(partitions.migrating):
            return self._cleanup(cleanup)
        today = datetime.now(UTC).date()

        def start(tx: Tx) -> None:
            migration.start_migration(tx)
            migration.plan_migration(tx, today)

        if not self._tx(partitions.migrating):
            if not self._tx(migration.movable_months):
                return None
            # Start and plan in one transaction: stopped or failed between them, a
            # migration would go on with no plan (review 2, finding 1).
            self._patient(start)
        elif not self._tx(migration.planned_fully):
            # Started by an older release that planned in a transaction of its own.
            self._patient(lambda tx: migration.plan_migration(tx, today))
        month = self._tx(migration.next_to_copy)
        if month is not None:
            return migration.Step(month, self._copy(month))
        return self._switch()

    def _copy(self, month: str) -> int:
        copied, after = 0, ("", "")
        while True:
            count, after = self._tx(partial(migration.copy_batch, month=month, after=after))
            if count == 0:
                return copied
            copied += count
            # Changes are applied as they come, so the switch finds few left.
            self._tx(migration.apply_changes)

    def _switch(self) -> migration.Step:
        verified: list[str] = []

        def note(diag: Any) -> None:
            text = diag.message_primary or ""
            if text.startswith("verifying table "):
                verified.append(text.split('"')[1])

        def attempt(tx: Tx) -> list[str]:
            verified.clear()
            # PostgreSQL says, at DEBUG1, which tables an attach scans.
            tx.run("SET LOCAL client_min_messages = debug1")
            return migration.switch(tx)

        while self._tx(migration.apply_changes) >= migration.BATCH:
            pass
        self.conn.add_notice_handler(note)
        try:
            for _ in range(SWITCH_ATTEMPTS):
                try:
                    attached = self._patient(attempt)
                    break
                except migration.Behind:
                    while self._tx(migration.apply_changes) >= migration.BATCH:
                        pass
            else:
                raise StoreFault("partitions migrate: changes keep coming faster than they "
                                 "are applied; run it again")
        finally:
            self.conn.remove_notice_handler(note)
        self._cleanup(self._tx(migration.after_switch))
        return migration.Step("switch", len(attached), tuple(verified))

    def _cleanup(self, statements: list[str]) -> migration.Step:
        for statement in statements:
            def run(tx: Tx, sql: str = statement) -> None:
                tx.run("SELECT set_config('lock_timeout', ?, true)",
                       (migration.SWITCH_LOCK_TIMEOUT,))
                tx.run(sql)
            self._patient(run)
        return migration.Step("cleanup", len(statements))
