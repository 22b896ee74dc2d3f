"""The store: exactly-once results, probes and tokens, time ranges (on each backend, through
`open_store`); and the SQLite file itself: migrations, durability settings, what the file
holds, and files it must refuse (these build `SqliteStore`, since they are about SQLite)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from collector import auth
from collector.compliance.facts import SessionFacts, of_result
from collector.config import StorageConfig
from collector.errors import StoreError, Unacceptable
from collector.fleet.probes import register_probe
from collector.lines import LineMetadata
from collector.storage.sql.backends import open_store
from collector.storage.sql.sqlite import SqliteStore
from collector.storage.sql.sqlite_migrations import MIGRATIONS
from collector.storage.store import Store
from tests.factories import insert_result, session


def _facts(result_id: str, started_at: str) -> SessionFacts:
    return of_result(session("p1", result_id=result_id, started_at=started_at), started_at)


def _insert(store: Store, result_id: str = "r1", body: str = "{}") -> str:
    return insert_result(
        store, result_id=result_id, probe_name="p1", schema_version=1,
        started_at="2026-11-21T10:00:00.000000Z", ended_at="2026-11-21T10:00:30.000000Z",
        received_at="2026-11-21T10:00:31.000000Z", body=body, body_sha256=str(hash(body)),
        facts=_facts(result_id, "2026-11-21T10:00:00.000000Z"),
    )


P1 = LineMetadata(operator="BT Italia", download_min_kbps=2200)


@pytest.fixture
def probed(store: Store) -> Store:
    """A fresh store on each backend with probe p1 registered."""
    register_probe(store, "p1", P1)
    return store


@pytest.fixture
def lite(tmp_path: Path) -> SqliteStore:
    """An SQLite file with probe p1, for the tests about the file itself."""
    s = SqliteStore(tmp_path / "c.sqlite3")
    register_probe(s, "p1", P1)
    return s


def test_new_database_is_migrated_with_durable_settings(lite: SqliteStore) -> None:
    """WAL + synchronous=FULL, and user_version at the latest migration."""
    db = sqlite3.connect(lite.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert lite.schema_version == len(MIGRATIONS)
    assert lite._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_exactly_once(probed: Store) -> None:
    """Same id and body: duplicate, no new row; same id, other body: conflict."""
    assert _insert(probed) == "stored"
    assert _insert(probed) == "duplicate"
    assert _insert(probed, body='{"other":1}') == "conflict"
    assert probed.count_results() == 1


def test_results_survive_reopen(probed: Store, storage: StorageConfig) -> None:
    """A stored result is there after close and reopen."""
    _insert(probed)
    probed.close()
    again = open_store(storage)
    try:
        assert [r.result_id for r in again.results()] == ["r1"]
    finally:
        again.close()


def test_tokens_are_stored_hashed(lite: SqliteStore) -> None:
    """The clear token is never in the database file or its WAL; its digest finds the
    probe."""
    token = register_probe(lite, "p2", LineMetadata())
    raw = lite.path.read_bytes() + Path(str(lite.path) + "-wal").read_bytes()
    assert token.encode() not in raw
    probe = lite.probe_for_token(auth.hash_token(token))
    assert probe is not None
    assert probe.name == "p2"


def test_revoked_token_finds_nothing(store: Store) -> None:
    """After revocation the token no longer authenticates."""
    token = register_probe(store, "p3", LineMetadata())
    assert store.revoke_probe("p3", "2026-11-21T00:00:00Z")
    assert store.probe_for_token(auth.hash_token(token)) is None
    assert not store.revoke_probe("p3", "2026-11-21T00:00:00Z")


def test_duplicate_probe_and_bad_name(probed: Store) -> None:
    """Probe names are unique and follow the probe id rule."""
    with pytest.raises(StoreError, match="a probe named 'p1' already exists"):
        register_probe(probed, "p1", LineMetadata())
    with pytest.raises(Unacceptable, match="must be 1-64 characters"):
        register_probe(probed, "no spaces", LineMetadata())


def test_time_range_query(probed: Store) -> None:
    """since is inclusive, until exclusive, ordered by start time."""
    for n, hour in enumerate(("09", "10", "11")):
        insert_result(
            probed, result_id=f"r{n}", probe_name="p1", schema_version=1,
            started_at=f"2026-11-21T{hour}:00:00.000000Z",
            ended_at=f"2026-11-21T{hour}:00:30.000000Z", received_at="x", body="{}",
            body_sha256="h", facts=_facts(f"r{n}", f"2026-11-21T{hour}:00:00.000000Z"),
        )
    got = probed.results(["p1"], "2026-11-21T10:00:00.000000Z", "2026-11-21T11:00:00.000000Z")
    assert [r.result_id for r in got] == ["r1"]


def test_newer_database_is_refused(tmp_path: Path) -> None:
    """A database from a newer collector is not touched."""
    path = tmp_path / "c.sqlite3"
    sqlite3.connect(path).execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="schema version 99, newer than this collector"):
        SqliteStore(path)


def test_not_a_database(tmp_path: Path) -> None:
    """A file that is not SQLite is refused with a message, not a traceback."""
    path = tmp_path / "c.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="cannot use database"):
        SqliteStore(path)


def test_a_read_only_sqlite_open_skips_the_full_file_check(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """A writer checks the whole file at open (PRAGMA quick_check); an analyst's read
    does not (15 minutes on a 20 GB file), and a damaged page it reads is still refused
    by SQLite itself."""
    from collector.storage.sql import sqlite as sqlite_mod

    seen: list[str] = []

    class Traced(sqlite3.Connection):
        def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:  # type: ignore[override]
            seen.append(sql)
            return super().execute(sql, *args)

    real = sqlite3.connect
    monkeypatch.setattr(sqlite_mod.sqlite3, "connect",
                        lambda *a, **kw: real(*a, factory=Traced, **kw))
    cfg = StorageConfig(backend="sqlite", path=str(tmp_path / "c.sqlite3"))
    open_store(cfg).close()
    assert "PRAGMA quick_check" in seen
    seen.clear()
    open_store(cfg, read_only=True).close()
    assert seen and "PRAGMA quick_check" not in seen
