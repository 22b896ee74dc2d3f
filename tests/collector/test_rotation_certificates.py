"""Rotating a probe's credentials replaces its client certificate too: after `probe
rotate`, a client certificate issued before the rotation is refused (the lost SD card or
the leaked device holds it), one issued after it is taken. Real collector over TLS on
127.0.0.1 with client certificates made with openssl, real SQLite file."""

from __future__ import annotations

import http.client
import json
import sqlite3
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

from click.testing import CliRunner

from agent.schema import format_utc
from collector import auth
from collector.cli.main import main
from collector.config import CollectorConfig, ServerConfig, StorageConfig
from collector.fleet import probes as admin
from collector.lines import LineMetadata
from collector.server.testing import RunningCollector, running_collector
from collector.storage.sql.backends import open_store
from collector.storage.store import Store
from tests.factories import session_dict

REPLACED = "client certificate issued before the probe's credentials were replaced"


@contextmanager
def _tls_collector(tmp_path: Path, pki: Path) -> Iterator[RunningCollector]:
    cfg = replace(CollectorConfig(), server=replace(
        ServerConfig(), query_auth=True, tls_cert=str(pki / "server.pem"),
        tls_key=str(pki / "server.key"), client_cert="optional",
        client_ca=str(pki / "ca.pem")))
    with running_collector(tmp_path / "c", cfg) as collector:
        yield collector


def _post(url: str, pki: Path, cert: str | None, token: str | None = None,
          day: int = 20) -> tuple[int, dict[str, object]]:
    """A result for p1 over TLS, shown with client certificate ``cert`` (pki/CERT.pem)."""
    doc = session_dict(probe_id="p1", started_at=f"2026-11-{day:02d}T10:00:00.000000Z")
    return _https(url, "/api/v1/results", pki, doc, cert, token)


def _https(url: str, path: str, pki: Path, doc: object, cert: str | None,
           token: str | None) -> tuple[int, dict[str, object]]:
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if cert is not None:
        context.load_cert_chain(str(pki / f"{cert}.pem"), str(pki / f"{cert}.key"))
    parts = urlsplit(url)
    conn = http.client.HTTPSConnection(parts.hostname or "", parts.port, context=context,
                                       timeout=30)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request("POST", path, json.dumps(doc).encode(), headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _issue(pki: Path, name: str, cn: str) -> None:
    """A client certificate for ``cn`` signed by the test CA, issued now."""
    for args in (["req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                  f"{name}.csr", "-subj", f"/CN={cn}"],
                 ["x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                  "-CAcreateserial", "-out", f"{name}.pem", "-days", "2"]):
        subprocess.run(["openssl", *args], cwd=pki, check=True, capture_output=True,
                       timeout=60)


def _not_before(pem: Path) -> int:
    """A certificate's notBefore, in seconds since the epoch."""
    out = subprocess.run(["openssl", "x509", "-noout", "-startdate", "-in", str(pem)],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    return ssl.cert_time_to_seconds(out.strip().removeprefix("notBefore="))


def _at(seconds: float) -> str:
    return format_utc(datetime.fromtimestamp(seconds, UTC))


def test_revoke_and_rotate_refuses_the_lost_devices_certificate(tmp_path: Path,
                                                                 pki: Path) -> None:
    """The documented lost-SD-card flow: `probe revoke p1`, `probe rotate p1`. The old
    card's certificate is refused with a 401 that says why, alone or beside the new
    token; the new token and a certificate issued after the rotation are taken; `probe
    rotate` says so, and `probe list` shows when the token was replaced."""
    with _tls_collector(tmp_path, pki) as collector:
        collector.add_probe("p1")
        assert _post(collector.url, pki, "p1")[0] == 201
        # The rotation falls in a later second than the old certificate's notBefore.
        while int(time.time()) <= _not_before(pki / "p1.pem"):
            time.sleep(0.05)
        runner = CliRunner()
        db = ["--db", str(collector.db_path)]
        assert runner.invoke(main, [*db, "probe", "revoke", "p1"]).exit_code == 0
        done = runner.invoke(main, [*db, "probe", "rotate", "p1"], catch_exceptions=False)
        assert done.exit_code == 0, done.stderr
        new = done.stdout.strip()
        said = " ".join(done.stderr.split())
        assert "re-enabled" in said
        assert "A client certificate issued before now (" in said
        assert "is refused from now on: give the device one issued after it" in said
        assert "client certificate issued before now is refused from now on" in " ".join(
            runner.invoke(main, ["probe", "rotate", "--help"]).output.split())

        status, reply = _post(collector.url, pki, "p1", day=21)
        assert status == 401 and str(reply["error"]).startswith(REPLACED), reply
        assert "'p1' rotated 20" in str(reply["error"])
        status, reply = _post(collector.url, pki, "p1", token=new, day=21)
        assert status == 401 and str(reply["error"]).startswith(REPLACED), reply
        assert _post(collector.url, pki, None, token=new, day=22)[0] == 201

        _issue(pki, "p1-new", "p1")
        assert _post(collector.url, pki, "p1-new", day=23)[0] == 201
        assert _post(collector.url, pki, "p1-new", token=new, day=24)[0] == 201
        assert _post(collector.url, pki, "p1", day=25)[0] == 401

        listing = runner.invoke(main, [*db, "probe", "list"]).output
        assert "p1  (active, token replaced 20" in listing


def test_a_certificate_counts_from_its_issue_second(tmp_path: Path, pki: Path) -> None:
    """Rotating a live probe after a leak, at times set through the store: a certificate
    issued after the rotation (or in its very second: X.509 times are whole seconds) is
    taken, one issued a second before it is refused; a probe never rotated takes any
    certificate its CA signed. The admin API's rotation answers its time."""
    issued = _not_before(pki / "p1.pem")
    with _tls_collector(tmp_path, pki) as collector:
        collector.add_probe("p1")
        with closing(collector.open_store()) as store:
            fresh = store.probe("p1")
            assert fresh is not None and fresh.rotated_at is None
            admin.rotate_probe(store, "p1", _at(issued - 3600))
        assert _post(collector.url, pki, "p1")[0] == 201
        with closing(collector.open_store()) as store:
            admin.rotate_probe(store, "p1", _at(issued + 0.9))
            probe = store.probe("p1")
            assert probe is not None and probe.rotated_at == _at(issued + 0.9)
        assert _post(collector.url, pki, "p1", day=21)[0] == 201
        with closing(collector.open_store()) as store:
            admin.rotate_probe(store, "p1", _at(issued + 1))
        status, reply = _post(collector.url, pki, "p1", day=22)
        assert status == 401 and str(reply["error"]).startswith(REPLACED), reply

        ops = collector.add_token("ops", "admin")
        before = format_utc(datetime.now(UTC) - timedelta(seconds=1))
        status, reply = _https(collector.url, "/api/v1/probes/p1/rotate", pki, {}, None, ops)
        assert status == 200 and str(reply["rotated_at"]) > before, reply


def test_a_database_from_before_rotation_times_reads_its_probes(tmp_path: Path) -> None:
    """A SQLite file at the schema before the rotation time, holding a probe: upgraded
    on open, the probe reads back never rotated, and rotating it records the time."""
    from collector.storage.sql.base import Tx
    from collector.storage.sql.sqlite import DIALECT
    from collector.storage.sql.sqlite_migrations import MIGRATIONS

    path = tmp_path / "old.sqlite3"
    before = len(MIGRATIONS) - 1
    with closing(sqlite3.connect(path)) as db:
        for step in MIGRATIONS[:before]:
            if callable(step):
                step(Tx(db, DIALECT))
            else:
                db.executescript(step)
        db.execute("INSERT INTO probes (name, token_sha256, created_at) "
                   "VALUES ('p1', ?, '2026-01-01T00:00:00.000000Z')",
                   (auth.hash_token("bbp_old"),))
        db.execute(f"PRAGMA user_version = {before}")
        db.commit()
    with closing(open_store(StorageConfig(path=str(path)))) as store:
        assert store.schema_version == len(MIGRATIONS)
        probe = store.probe_for_token(auth.hash_token("bbp_old"))
        assert probe is not None and probe.rotated_at is None
        admin.rotate_probe(store, "p1", "2026-12-01T00:00:00.000000Z")
        probe = store.probe("p1")
        assert probe is not None and probe.rotated_at == "2026-12-01T00:00:00.000000Z"


def test_the_rotation_time_in_the_store(store: Store) -> None:
    """On SQLite and PostgreSQL: a probe reads back never rotated, then with the time
    of its last rotation, through every way of reading a probe."""
    token = admin.register_probe(store, "p1", LineMetadata())
    assert all(p.rotated_at is None for p in store.probes())
    token, _ = admin.rotate_probe(store, "p1", "2026-12-01T10:00:00.000000Z")
    token, _ = admin.rotate_probe(store, "p1", "2026-12-02T10:00:00.000000Z")
    found = store.probe_for_token(auth.hash_token(token))
    assert found is not None and found.rotated_at == "2026-12-02T10:00:00.000000Z"
    assert [p.rotated_at for p in store.probes()] == ["2026-12-02T10:00:00.000000Z"]
    assert store.dump("probes", None, 10)[0][4] == "2026-12-02T10:00:00.000000Z"
