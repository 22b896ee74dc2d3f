"""SQLite store: the collector's master copy of every probe and result.

Durability (shared/reference/reliability.md §6): WAL journal, ``synchronous=FULL`` so an
acknowledged result survives power loss, writes in ``BEGIN IMMEDIATE`` transactions (no
deferred-upgrade SQLITE_BUSY), ``busy_timeout`` for concurrent CLI use, ``quick_check`` at
open. Schema changes are numbered migrations tracked in ``PRAGMA user_version``.

The class is synchronous and not thread-safe: the web app runs it on one dedicated thread.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from collector.errors import StoreError

# Each entry upgrades the schema from version i to i + 1. Never edit a shipped migration.
MIGRATIONS: tuple[str, ...] = (
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
)


@dataclass(frozen=True, slots=True)
class LineMetadata:
    """What an analyst knows about the line a probe sits on (the contract's figures)."""

    operator: str | None = None
    offer: str | None = None
    region: str | None = None
    technology: str | None = None
    download_nominal_kbps: float | None = None
    download_min_kbps: float | None = None
    upload_nominal_kbps: float | None = None
    upload_min_kbps: float | None = None
    max_delay_ms: float | None = None
    max_loss_ratio: float | None = None


@dataclass(frozen=True, slots=True)
class Probe:
    name: str
    created_at: str
    revoked_at: str | None
    line: LineMetadata

    def to_dict(self) -> dict[str, Any]:
        line = {f.name: getattr(self.line, f.name) for f in fields(LineMetadata)}
        return {"probe_id": self.name, "created_at": self.created_at,
                "revoked_at": self.revoked_at, **line}


@dataclass(frozen=True, slots=True)
class StoredResult:
    result_id: str
    probe_name: str
    started_at: str
    ended_at: str
    received_at: str
    body: str


InsertOutcome = Literal["stored", "duplicate", "conflict"]
_LINE_COLUMNS = tuple(f.name for f in fields(LineMetadata))


class SqliteStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
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
            with self._write():
                for statement in MIGRATIONS[version].split(";"):
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

    def insert_result(
        self,
        *,
        result_id: str,
        probe_name: str,
        schema_version: int,
        started_at: str,
        ended_at: str,
        received_at: str,
        body: str,
        body_sha256: str,
    ) -> InsertOutcome:
        """Store a result once. Same id and content again: "duplicate" (nothing written);
        same id with other content: "conflict"."""
        with self._write():
            row = self._db.execute(
                "SELECT body_sha256 FROM results WHERE result_id = ?", (result_id,)
            ).fetchone()
            if row is not None:
                return "duplicate" if row[0] == body_sha256 else "conflict"
            self._db.execute(
                "INSERT INTO results (result_id, probe_name, schema_version, started_at, "
                "ended_at, received_at, body_sha256, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (result_id, probe_name, schema_version, started_at, ended_at, received_at,
                 body_sha256, body),
            )
        return "stored"

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
            "SELECT result_id, probe_name, started_at, ended_at, received_at, body "
            f"FROM results {where} ORDER BY started_at, result_id{tail}",
            params,
        )
        return [StoredResult(*row) for row in rows]

    def result(self, result_id: str) -> StoredResult | None:
        row = self._db.execute(
            "SELECT result_id, probe_name, started_at, ended_at, received_at, body "
            "FROM results WHERE result_id = ?",
            (result_id,),
        ).fetchone()
        return StoredResult(*row) if row else None

    def count_results(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0])


def _probe(row: sqlite3.Row) -> Probe:
    return Probe(
        name=row["name"],
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
        line=LineMetadata(**{c: row[c] for c in _LINE_COLUMNS}),
    )
