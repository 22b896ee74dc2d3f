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
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
import psycopg_pool
from psycopg import errors as pg_errors

from collector.errors import StoreError, StoreFault, StoreUnavailable, Unacceptable, Unstorable
from collector.storage.sql import SqlStore
from collector.storage.sql.base import Dialect, Tx, database_error, first_line
from collector.storage.sql.postgres_migrations import MIGRATIONS, ddl
from collector.storage.uri import masked

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
        raise StoreUnavailable(database_error(exc)) from exc
    except psycopg.DataError as exc:
        raise Unstorable(database_error(exc)) from exc
    except psycopg.Error as exc:
        raise StoreFault(database_error(exc)) from exc


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
            self._migrate()
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

    @contextmanager
    def _reading(self) -> Iterator[Tx]:
        with (_translated(self.describe), self._pool.connection() as conn,
              conn.transaction()):
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield Tx(conn, DIALECT)

    def _transaction(self, fn: Callable[[Tx], T]) -> T:
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
