"""The store's edge: what crosses it is the domain's, never the driver's. A driver error
leaves a backend as one of collector/errors.py's store errors; an SQLite process never
loads psycopg; a PostgreSQL URI is shown masked without the driver."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from collector.config import StorageConfig
from collector.errors import StoreError, StoreFault, StoreUnavailable, Unstorable
from collector.lines import LineMetadata
from collector.storage.codec import CodecError
from collector.storage.model import NewResult
from collector.storage.sql.backends import open_store
from collector.storage.sql.sqlite import SqliteStore
from collector.storage.store import Store
from collector.storage.uri import UNPARSED, masked
from tests.factories import canonical_json, session

ROOT = Path(__file__).resolve().parents[2]


def test_an_sqlite_process_never_imports_psycopg(tmp_path: Path) -> None:
    """The whole collector (CLI, web app) imported and an SQLite store opened, used and
    closed: psycopg and its pool are never loaded (open_store imports the backend it
    opens, and masking a URI needs no driver)."""
    code = (
        "import sys\n"
        "import collector.cli.main, collector.server.app\n"
        "from collector.config import StorageConfig\n"
        "from collector.storage.sql.backends import open_store\n"
        "from collector.storage.uri import masked\n"
        f"store = open_store(StorageConfig(path={str(tmp_path / 'c.sqlite3')!r}))\n"
        "store.probes(); store.close()\n"
        "masked('postgresql://u:p@h/db')\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0].startswith('psycopg'))\n"
        "print(loaded)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_locked_database_is_unavailable_not_a_driver_error(tmp_path: Path) -> None:
    """SQLite's "database is locked" (another writer past the busy timeout) leaves the
    store as StoreUnavailable, said as the CLI prints it; the web edge answers it 503."""
    store = SqliteStore(tmp_path / "c.sqlite3")
    holder = sqlite3.connect(tmp_path / "c.sqlite3", isolation_level=None)
    try:
        store._db.execute("PRAGMA busy_timeout = 50")  # the wait, shortened for the test
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreUnavailable, match=r"^database error: database is locked$"):
            store.revoke_probe("p1", "2026-11-21T10:00:00.000000Z")
    finally:
        holder.close()
        store.close()


def test_a_refused_statement_is_a_store_fault(store: Store) -> None:
    """A statement the engine refuses (a result of a probe that does not exist: its
    foreign key) is a StoreFault on either backend, said as the CLI prints it, with the
    driver's error as its cause (the traceback of a 500 shows both); nothing is kept."""
    from collector.intake import ingest

    accepted = ingest.parse_body(canonical_json(session("ghost")).encode())
    item = NewResult(result_id=accepted.result.result_id, probe_name="ghost",
                     schema_version=accepted.result.schema_version,
                     started_at=accepted.started_at, ended_at=accepted.ended_at,
                     received_at="2026-11-21T10:00:00.000000Z", body=accepted.body,
                     body_sha256=accepted.body_sha256, facts=accepted.facts,
                     packed=accepted.packed)
    with pytest.raises(StoreFault, match=r"(?i)^database error: .*foreign key") as fault:
        store.insert_results([item])
    assert not isinstance(fault.value, Unstorable)
    assert type(fault.value.__cause__).__module__.split(".")[0] in ("sqlite3", "psycopg")
    assert store.count_results() == 0


def test_a_value_postgresql_cannot_hold_is_unstorable(tmp_path: Path, pg_url: str) -> None:
    """A NUL in text, which PostgreSQL cannot store (SQLite can): Unstorable, which the
    web edge answers 422 as the caller's input; the store goes on working."""
    postgres = open_store(StorageConfig(backend="postgresql", url=pg_url))
    try:
        postgres.add_probe("p1", "a" * 64, "2026-11-21T10:00:00.000000Z", LineMetadata())
        with pytest.raises(Unstorable, match=r"^database error: .*NUL"):
            postgres.put_health("p1", "2026-11-21T10:00:00.000000Z", None, '{"a": "\x00"}')
        assert postgres.health() == {}
    finally:
        postgres.close()


def test_a_corrupt_packed_body_is_a_store_error() -> None:
    """A packed body that cannot be read back is a StoreError (the web edge: 503, never a
    wrong document) and, to bulk decoders, a ValueError like any malformed input."""
    assert issubclass(CodecError, StoreError)
    assert issubclass(CodecError, ValueError)


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://bbprobe:s3cr%40t@127.0.0.1:5432/bbprobe",
     "postgresql://bbprobe:***@127.0.0.1:5432/bbprobe"),
    ("postgres://u@[::1]:5,h2/db?sslmode=require&application_name=x&connect_timeout=3",
     "postgresql://u@::1:5,h2:/db?connect_timeout=3&application_name=x&sslmode=require"),
    ("postgresql://h/db?password=s3cret&", "postgresql://:***@h/db"),
    ("postgresql:///db?host=%2Fvar%2Frun%2Fpostgresql",
     "postgresql://%2Fvar%2Frun%2Fpostgresql/db"),
    ("postgresql://h/db?ssl=true", "postgresql://h/db?sslmode=require"),
    ("postgresql://u:pass%zz@h/db", UNPARSED),
    ("postgresql://u:pa ss@h/db", UNPARSED),
    ("postgresql://u:p@h/db?not_a_keyword=1", UNPARSED),
])
def test_uris_are_shown_masked_as_libpq_reads_them(url: str, shown: str) -> None:
    """Read as libpq reads a URI (percent-decoding, IPv6 hosts, its keywords in its
    order, ssl=true); the password never shown; a URI libpq would refuse not shown."""
    assert masked(url) == shown
