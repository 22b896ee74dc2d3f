"""SQLite backend: the collector's embedded default, one file.

Durability (shared/reference/reliability.md §6): WAL journal, ``synchronous=FULL`` so an
acknowledged result survives power loss, writes in ``BEGIN IMMEDIATE`` transactions (no
deferred-upgrade SQLITE_BUSY), ``busy_timeout`` for concurrent CLI use, ``quick_check`` at
open (by a writer: an analyst's read-only open skips it, ``integrity_check``). Schema
changes are numbered migrations (storage/sqlite_migrations.py) tracked in ``PRAGMA
user_version``.

The queries are in storage/sql/. One connection, not thread-safe: the web app runs the
store on one dedicated thread (``concurrency = 1``; SQLite has one writer anyway).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

from collector.errors import StoreError, StoreFault, StoreUnavailable, Unstorable
from collector.storage.sql import SqlStore
from collector.storage.sql.base import Dialect, Tx, database_error
from collector.storage.sql.sqlite_migrations import MIGRATIONS

T = TypeVar("T")


def _in_json_list(column: str, values: Sequence[Any]) -> tuple[str, Any]:
    return f"{column} IN (SELECT value FROM json_each(?))", json.dumps(list(values))


DIALECT = Dialect(
    name="sqlite", placeholder="?", no_limit="LIMIT -1", for_update="", skip_locked="",
    integrity_errors=(sqlite3.IntegrityError,), in_list=_in_json_list,
    # Every probe, named: the planner then reads each probe's time range from the
    # clustered key instead of probing the whole table through the time index.
    every_probe="probe_name IN (SELECT name FROM probes)",
)


@contextmanager
def _translated() -> Iterator[None]:
    """sqlite3's errors as the store's own (collector/errors.py), at the store's edge:
    nothing above it knows the driver. An OperationalError is the file unavailable for
    now (locked past busy_timeout, a disk I/O error, a file gone); a DataError a value
    SQLite cannot hold; any other a statement it refused or a damaged file."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        raise StoreUnavailable(database_error(exc)) from exc
    except sqlite3.DataError as exc:
        raise Unstorable(database_error(exc)) from exc
    except sqlite3.Error as exc:
        raise StoreFault(database_error(exc)) from exc


class SqliteStore(SqlStore):
    dialect = DIALECT
    concurrency = 1

    def __init__(self, path: str | Path, *, outbox: bool = False,
                 integrity_check: bool = True) -> None:
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
            # quick_check reads every page: seconds for a line's database, 15 minutes for
            # a 10,000-probe semester of facts (20 GB, benchmarks/analytics.py). A writer
            # pays it once, at open, before it adds to a damaged file; an analyst's read
            # (reports, exports) does not, and SQLite still refuses a damaged page it
            # reads (SQLITE_CORRUPT, a one-line store error).
            check = (self._db.execute("PRAGMA quick_check").fetchone()[0]
                     if integrity_check else "ok")
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
        with _translated():
            return self._user_version()

    def _user_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        current = self._user_version()
        if current > len(MIGRATIONS):
            raise StoreError(
                f"database {self.path} has schema version {current}, newer than this "
                f"collector ({len(MIGRATIONS)}); upgrade bbprobe"
            )
        for version in range(current, len(MIGRATIONS)):
            step = MIGRATIONS[version]

            def apply(tx: Tx, step: str | Callable[[Tx], object] = step,
                      version: int = version) -> None:
                if callable(step):
                    step(tx)
                else:
                    for statement in step.split(";"):
                        if statement.strip():
                            self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {version + 1}")

            self._atomic(apply)

    @contextmanager
    def _reading(self) -> Iterator[Tx]:
        # Autocommit reads on the one connection: WAL gives each statement a snapshot.
        with _translated():
            yield Tx(self._db, DIALECT)

    def _transaction(self, fn: Callable[[Tx], T]) -> T:
        with _translated():
            return self._atomic(fn)

    def _atomic(self, fn: Callable[[Tx], T]) -> T:
        """``fn`` in one write transaction, sqlite3's errors as they are (the opening
        migration says them in its own words)."""
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
