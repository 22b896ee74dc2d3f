"""SQLite store: migrations, durability settings, exactly-once results, probes."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from collector import auth
from collector.compliance.facts import SessionFacts, of_result
from collector.errors import StoreError, Unacceptable
from collector.reports import service
from collector.storage.model import LineMetadata
from collector.storage.sqlite import MIGRATIONS, SqliteStore
from tests.factories import session


def _facts(result_id: str, started_at: str) -> SessionFacts:
    return of_result(session("p1", result_id=result_id, started_at=started_at), started_at)


def _insert(store: SqliteStore, result_id: str = "r1", body: str = "{}") -> str:
    return store.insert_result(
        result_id=result_id, probe_name="p1", schema_version=1,
        started_at="2026-11-21T10:00:00.000000Z", ended_at="2026-11-21T10:00:30.000000Z",
        received_at="2026-11-21T10:00:31.000000Z", body=body, body_sha256=str(hash(body)),
        facts=_facts(result_id, "2026-11-21T10:00:00.000000Z"),
    )


@pytest.fixture
def store(tmp_path: Path) -> SqliteStore:
    s = SqliteStore(tmp_path / "c.sqlite3")
    service.register_probe(s, "p1", LineMetadata(operator="BT Italia", download_min_kbps=2200))
    return s


def test_new_database_is_migrated_with_durable_settings(store: SqliteStore) -> None:
    """WAL + synchronous=FULL, and user_version at the latest migration."""
    db = sqlite3.connect(store.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.schema_version == len(MIGRATIONS)
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_exactly_once(store: SqliteStore) -> None:
    """Same id and body: duplicate, no new row; same id, other body: conflict."""
    assert _insert(store) == "stored"
    assert _insert(store) == "duplicate"
    assert _insert(store, body='{"other":1}') == "conflict"
    assert store.count_results() == 1


def test_results_survive_reopen(store: SqliteStore) -> None:
    """A stored result is there after close and reopen."""
    _insert(store)
    store.close()
    again = SqliteStore(store.path)
    assert [r.result_id for r in again.results()] == ["r1"]


def test_tokens_are_stored_hashed(store: SqliteStore) -> None:
    """The clear token is never in the database; its digest finds the probe."""
    token = service.register_probe(store, "p2", LineMetadata())
    raw = store.path.read_bytes() + Path(str(store.path) + "-wal").read_bytes()
    assert token.encode() not in raw
    probe = store.probe_for_token(auth.hash_token(token))
    assert probe is not None
    assert probe.name == "p2"


def test_revoked_token_finds_nothing(store: SqliteStore) -> None:
    """After revocation the token no longer authenticates."""
    token = service.register_probe(store, "p3", LineMetadata())
    assert store.revoke_probe("p3", "2026-11-21T00:00:00Z")
    assert store.probe_for_token(auth.hash_token(token)) is None
    assert not store.revoke_probe("p3", "2026-11-21T00:00:00Z")


def test_duplicate_probe_and_bad_name(store: SqliteStore) -> None:
    """Probe names are unique and follow the probe id rule."""
    with pytest.raises(StoreError, match="a probe named 'p1' already exists"):
        service.register_probe(store, "p1", LineMetadata())
    with pytest.raises(Unacceptable, match="must be 1-64 characters"):
        service.register_probe(store, "no spaces", LineMetadata())


def test_time_range_query(store: SqliteStore) -> None:
    """since is inclusive, until exclusive, ordered by start time."""
    for n, hour in enumerate(("09", "10", "11")):
        store.insert_result(
            result_id=f"r{n}", probe_name="p1", schema_version=1,
            started_at=f"2026-11-21T{hour}:00:00.000000Z",
            ended_at=f"2026-11-21T{hour}:00:30.000000Z", received_at="x", body="{}",
            body_sha256="h", facts=_facts(f"r{n}", f"2026-11-21T{hour}:00:00.000000Z"),
        )
    got = store.results(["p1"], "2026-11-21T10:00:00.000000Z", "2026-11-21T11:00:00.000000Z")
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
