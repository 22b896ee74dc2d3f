"""The plumbing every SQL aggregate module stands on: the dialect (what differs between
SQLite and PostgreSQL in the queries written here), a connection inside a transaction
(``Tx``), the driver's message as the store says it, and ``SqlBase``: the two kinds of
transaction a backend gives and the WHERE clause of a scope (probes, time window, family).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol, TypeVar

from collector import unreadable

T = TypeVar("T")


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
    """What differs between the engines, in the queries storage/sql/ writes."""

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


def first_line(exc: BaseException) -> str:
    """A driver's message, first line (libpq's names host and user, never the password;
    SQLite's names the fault), or the exception's type when it says nothing."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def database_error(exc: BaseException) -> str:
    """A driver error as the store's own errors say it (the CLI prints it as it is)."""
    return f"database error: {first_line(exc)}"


class Tx:
    """One connection inside a transaction (or autocommit reads), with the dialect's
    placeholders; rows come back as plain tuples."""

    __slots__ = ("_conn", "_dialect")

    def __init__(self, conn: Any, dialect: Dialect) -> None:
        self._conn = conn
        self._dialect = dialect

    @property
    def dialect(self) -> Dialect:
        return self._dialect

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
# over, and the newest readable one is the probe's latest.
LOOK_PAST = 8


def readable(result_id: str, *times: object) -> bool:
    """True if every stored time of a result row is in the collector's own form; else
    the row is counted and named as unreadable (collector/unreadable.py)."""
    bad = [t for t in times if not unreadable.canonical_time(t)]
    if not bad:
        return True
    unreadable.skipped("results", result_id, f"stored time {bad[0]!r} is not ISO 8601 UTC")
    return False


class SqlBase:
    """What every aggregate's queries stand on: the dialect, a read and a write
    transaction, and the WHERE clause of a scope.

    A backend gives ``dialect``, ``_reading()`` and ``_transaction(fn)``, and both raise
    only the store's own errors (collector/errors.py), never the driver's; every public
    method is synchronous (the web app runs them on database threads)."""

    dialect: Dialect
    outbox: bool
    # How many threads may call this store at once (1: SQLite's single connection).
    concurrency: int = 1
    describe: str = "database"

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

    def vacuum(self) -> None:
        """Give the space freed by ``pack_text_bodies`` back to the disk (SQLite), or
        refuse (PostgreSQL reuses it; Unacceptable says how to return it)."""
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

    def _scope(self, probes: Sequence[str] | None, since: str | None, until: str | None,
               column: str = "started_at", named_only: bool = False,
               family: str | None = None, table: str = "session_facts"
               ) -> tuple[str, list[Any]]:
        """The WHERE clause (never empty: "1 = 1" selects all) of a scope over a table:
        its probes, its time window [since, until) on ``column``, its address family.
        Every since/until a query takes is written here. Probes go as one parameter (a
        JSON array or an array), so a scope of thousands of probes stays one statement;
        with none named, a clause that still names every probe where the dialect plans
        better with one, unless ``named_only`` (a table without probes, or one the
        planner reads better without it). ``family`` ("ipv4"/"ipv6") keeps the sessions
        measured over it, by their session_facts row (a session of unknown family,
        schema < 6, matches neither)."""
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
