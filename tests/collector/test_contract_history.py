"""Each line's contract history: `probe set` appends a version valid from when it applies,
and certificates and alerts judge every session by the version in force when it was
measured (collector/lines.py ``contract_at``), never by the figures of today."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from click.testing import CliRunner

from collector import auth
from collector.alerts import worker
from collector.cli.main import main
from collector.config import StorageConfig
from collector.errors import Unacceptable
from collector.fleet import probes as admin
from collector.lines import ContractVersion, LineMetadata, contract_at, contract_for
from collector.reports import service
from collector.reports.text import format_certificate
from collector.storage.sql.backends import open_store
from collector.storage.store import Store
from tests.factories import session, store_result

CREATED = "2026-11-01T00:00:00.000000Z"
BEFORE = "2026-11-21T10:00:00.000000Z"  # a session measured before the change
AFTER = "2026-11-28T10:00:00.000000Z"


def _cli(db: Path, *args: str) -> tuple[int, str, str]:
    done = CliRunner().invoke(main, ["--db", str(db), *args], catch_exceptions=False)
    return done.exit_code, done.stdout, done.stderr


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Path]:
    """A real SQLite store with probe p1 registered on CREATED (minimum 30 Mbit/s down)
    and one session of 50 Mbit/s measured on BEFORE."""
    path = tmp_path / "collector.sqlite3"
    store = open_store(StorageConfig(path=str(path)))
    try:
        store.add_probe("p1", auth.hash_token("bbp_x"), CREATED,
                        LineMetadata(download_min_kbps=30_000, max_delay_ms=100),
                        "installer")
        store_result(store, session("p1", started_at=BEFORE))
    finally:
        store.close()
    yield path


def _store(db: Path) -> Store:
    return open_store(StorageConfig(path=str(db)))


def test_contract_at_picks_the_version_in_force() -> None:
    v1 = ContractVersion(1, None, CREATED, "a", LineMetadata(download_min_kbps=1))
    v2 = ContractVersion(2, "2026-11-25T00:00:00Z", "2026-11-25T00:00:00Z", "a",
                         LineMetadata(download_min_kbps=2))
    # A correction from the same instant replaces version 2.
    v3 = ContractVersion(3, "2026-11-25T00:00:00+00:00", "2026-12-01T00:00:00Z", "b",
                         LineMetadata(download_min_kbps=3), retroactive=True)
    assert contract_at([v1, v2], BEFORE) == (1, v1.line)
    assert contract_at([v1, v2], AFTER) == (2, v2.line)
    assert contract_at([v1, v2, v3], AFTER) == (3, v3.line)
    assert contract_at([v2], BEFORE) is None
    assert contract_at([], BEFORE) is None


def test_certificate_of_a_past_period_uses_the_old_figures(db: Path) -> None:
    """Scenario 1: sessions measured, then the minimum raised; the certificate of the
    period before uses the old figures and names version 1."""
    code, out, _err = _cli(db, "probe", "set", "p1", "--download-min-kbps", "60000")
    assert code == 0, out
    assert "contract version 2" in out
    store = _store(db)
    try:
        assert store.probe("p1").line.download_min_kbps == 60_000  # type: ignore[union-attr]
        history = store.line_contracts("p1")
        assert [(v.version, v.line.download_min_kbps) for v in history] == \
            [(1, 30_000), (2, 60_000)]
        assert history[0].valid_from == CREATED and history[0].changed_by == "installer"
        assert history[1].changed_by != "unknown" and not history[1].retroactive
        cert = service.certificate(store, "p1", "2026-11-21T00:00:00Z",
                                   "2026-11-22T00:00:00Z", "96in24h", "Europe/Rome")
    finally:
        store.close()
    p5 = next(c for c in cert.checks if c.id == "download_p5_kbps")
    assert p5.threshold == 30_000 and p5.breach is False
    assert cert.contract_version == 1 and not cert.contract_changed
    assert [s.contract_version for s in cert.sessions] == [1]
    text = format_certificate(cert)
    assert "Version:  each session judged by contract version 1" in text
    code, out, _err = _cli(db, "certify", "--probe", "p1", "--format", "json")
    assert code == 0, out
    doc = json.loads(out)
    assert doc["contract_version"] == 1
    assert [v["version"] for v in doc["contracts"]] == [1]
    code, out, _err = _cli(db, "certify", "--probe", "p1", "--format", "csv")
    assert code == 0 and "contract_versions" in out.splitlines()[0]
    code, out, _err = _cli(db, "certify", "--probe", "p1", "--format", "html", "-o", "-")
    assert code == 0 and "Contract version:" in out


def test_no_below_minimum_alert_for_a_session_before_the_raise(db: Path) -> None:
    """Scenario 2: the alert worker over a result whose start precedes the change judges
    it by the minimum of then (30 Mbit/s: 50 is above), not by today's 60."""
    assert _cli(db, "probe", "set", "p1", "--download-min-kbps", "60000")[0] == 0
    store = _store(db)
    try:
        probe = store.probe("p1")
        assert probe is not None
        [last] = store.latest_sessions(["p1"])
        assert last.started_at.startswith("2026-11-21")
        assert worker.below_minimum(store, probe, last, 3600) == []
        # Judged by today's figures it would have fired: the history is what prevents it.
        from collector.alerts import rules
        assert [a.kind for a in rules.below_minimum(probe, last, 3600)] == ["below_minimum"]
    finally:
        store.close()


def test_a_correction_from_the_past_is_explicit_and_splits_the_campaign(db: Path) -> None:
    store = _store(db)
    try:
        store_result(store, session("p1", started_at=AFTER))
    finally:
        store.close()
    code, out, _ = _cli(db, "probe", "set", "p1", "--download-min-kbps", "60000",
                        "--from", "2026-11-25T00:00:00Z")
    assert code == 0 and "retroactive" in out
    store = _store(db)
    try:
        [_v1, v2] = store.line_contracts("p1")
        assert v2.retroactive and v2.valid_from == "2026-11-25T00:00:00.000000Z"
        cert = service.certificate(store, "p1", None, None, "96in24h", "Europe/Rome")
        # Before the line was registered, before the version in force, in the future:
        # refused, naming the option.
        for when in ("2026-10-01T00:00:00Z", "2026-11-24T00:00:00Z", "2999-01-01T00:00:00Z",
                     "yesterday"):
            with pytest.raises(Unacceptable) as err:
                admin.set_line(store, "p1", {"upload_min_kbps": 1.0}, "t", when)
            assert err.value.field == "from"
        assert len(store.line_contracts("p1")) == 2
    finally:
        store.close()
    assert [s.contract_version for s in cert.sessions] == [1, 2]
    assert cert.contract_changed and cert.verdict == "incomplete"
    assert all(c.threshold is None for c in cert.checks if not c.informational)
    text = format_certificate(cert)
    assert "contract changed during the campaign" in text and "NO VERDICT" in text
    code, out, _ = _cli(db, "probe", "contract", "history", "p1")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("version 1  from 2026-11-01") and "until 2026-11-25" in lines[0]
    assert "(retroactive)" in lines[1] and "download_min_kbps=60000" in lines[1]
    code, out, _ = _cli(db, "probe", "contract", "history", "p1", "--format", "json")
    assert [v["retroactive"] for v in json.loads(out)["versions"]] == [False, True]


def test_store_keeps_the_history(store: Store) -> None:
    """Both backends: version 1 at registration, appended versions, the copy's table."""
    admin.register_probe(store, "p1", LineMetadata(download_min_kbps=10_000), "token:ops")
    [v1] = store.line_contracts("p1")
    assert (v1.version, v1.changed_by, v1.line.download_min_kbps) == (1, "token:ops", 10_000)
    assert v1.valid_from == v1.changed_at and not v1.retroactive
    v2 = admin.set_line(store, "p1", {"download_min_kbps": 20_000.0}, "ana")
    assert (v2.version, v2.line.download_min_kbps) == (2, 20_000)
    assert [v.version for v in store.line_contracts("p1")] == [1, 2]
    assert store.line_contracts("nobody") == []
    assert store.count("line_contracts") == 2
    assert len(store.dump("line_contracts", None, 10)) == 2


def test_migration_backfills_version_1(tmp_path: Path) -> None:
    """A database made before the history: each probe's metadata becomes version 1, valid
    from its creation."""
    from collector.storage.sql.base import Tx
    from collector.storage.sql.sqlite import DIALECT
    from collector.storage.sql.sqlite_migrations import MIGRATIONS

    path = tmp_path / "old.sqlite3"
    before = 21  # the schema before line_contracts
    with closing(sqlite3.connect(path)) as db:
        for step in MIGRATIONS[:before]:
            if callable(step):
                step(Tx(db, DIALECT))
            else:
                db.executescript(step)
        db.execute("INSERT INTO probes (name, token_sha256, created_at, download_min_kbps, "
                   "offer) VALUES ('p1', 'x', ?, 30000, 'Fibra 1000')", (CREATED,))
        db.execute(f"PRAGMA user_version = {before}")
        db.commit()
    with closing(open_store(StorageConfig(path=str(path)))) as store:
        assert store.schema_version == len(MIGRATIONS)
        [v1] = store.line_contracts("p1")
        assert (v1.version, v1.valid_from, v1.changed_by) == (1, CREATED, "schema migration")
        assert v1.line.download_min_kbps == 30_000 and v1.line.offer == "Fibra 1000"
        assert contract_at(store.line_contracts("p1"), BEFORE) == (1, v1.line)


def test_the_admin_api_records_the_tokens_name(tmp_path: Path) -> None:
    from collector.config import CollectorConfig
    from collector.server.testing import running_collector
    from tests.httpclient import post_json, request

    with running_collector(tmp_path, CollectorConfig()) as c:
        secret = c.add_token("ops", role="admin")
        status, _ = post_json(c.url + "/api/v1/probes",
                              {"probe_id": "p9", "download_min_kbps": 20000}, secret)
        assert status == 201
        status, reply = post_json(c.url + "/api/v1/probes/p9/contract",
                                  {"download_min_kbps": 40000}, secret)
        assert status == 200 and reply["version"] == 2, reply
        status, reply = post_json(c.url + "/api/v1/probes/p9/contract",
                                  {"download_min_kbps": 1, "from": "2000-01-01T00:00:00Z"},
                                  secret)
        assert status == 422 and reply["field"] == "from", reply
        ana = c.add_token("ana")
        status, doc, _ = request("GET", c.url + "/api/v1/probes/p9/contract",
                                 headers={"Authorization": f"Bearer {ana}"})
        assert status == 200
        store = c.open_store()
        try:
            [v1, v2] = store.line_contracts("p9")
        finally:
            store.close()
    assert (v1.changed_by, v1.line.download_min_kbps) == ("token:ops", 20_000)
    assert (v2.changed_by, v2.line.download_min_kbps) == ("token:ops", 40_000)
    assert [v["download_min_kbps"] for v in doc["versions"]] == [20_000, 40_000]


def test_backfill_on_both_backends(store: Store, storage: StorageConfig) -> None:
    """The migration's backfill, run again on a store whose history is dropped: each
    probe's metadata becomes version 1 valid from its registration, on either engine."""
    store.add_probe("p1", "x", CREATED, LineMetadata(upload_min_kbps=5_000, region="Lazio"))
    if storage.backend == "sqlite":
        from collector.storage.sql.sqlite_migrations import MIGRATIONS as LITE

        step = LITE[21]
        assert isinstance(step, str) and "line_contracts" in step
        with closing(sqlite3.connect(storage.path)) as db:
            db.execute("DROP TABLE line_contracts")
            db.executescript(step)
            db.commit()
    else:
        import psycopg

        from collector.storage.sql.postgres_migrations import MIGRATIONS as PG
        from collector.storage.sql.postgres_migrations import ddl

        step = PG[10]
        assert isinstance(step, str) and "line_contracts" in step
        with psycopg.connect(storage.url, autocommit=True) as conn, conn.transaction():
            conn.execute("DROP TABLE line_contracts")
            for statement in ddl(step).split(";"):
                if statement.strip():
                    conn.execute(statement.encode())
    [v1] = store.line_contracts("p1")
    assert (v1.version, v1.valid_from, v1.changed_at, v1.changed_by, v1.retroactive) == \
        (1, CREATED, CREATED, "schema migration", False)
    assert (v1.line.upload_min_kbps, v1.line.region) == (5_000, "Lazio")


def test_probe_add_records_the_os_user(tmp_path: Path) -> None:
    from collector.cli.probes import os_user

    db = tmp_path / "c.sqlite3"
    assert _cli(db, "probe", "add", "p2", "--upload-min-kbps", "5000")[0] == 0
    with closing(_store(db)) as store:
        [v1] = store.line_contracts("p2")
    assert v1.changed_by == os_user() and v1.line.upload_min_kbps == 5_000


def test_a_session_before_the_first_version_takes_the_corrected_figures() -> None:
    """Version 1 valid from registration, and a correction "from registration on"
    (version 2, the same instant): a session a few seconds before registration (a probe's
    clock) is judged by the corrected figures, not by the lowest version number, so a
    certificate does not see two contracts where the line had one."""
    start = "2026-11-20T10:00:00Z"
    v1 = ContractVersion(1, start, start, "a", LineMetadata(download_min_kbps=1))
    v2 = ContractVersion(2, start, "2026-12-01T00:00:00Z", "b",
                         LineMetadata(download_min_kbps=2), retroactive=True)
    assert contract_at([v1, v2], "2026-11-20T09:59:30Z") is None
    assert contract_for([v1, v2], "2026-11-20T09:59:30Z") == (2, v2.line)
    assert contract_for([v1, v2], "2026-11-21T00:00:00Z") == (2, v2.line)
    assert contract_for([], "2026-11-21T00:00:00Z") is None
