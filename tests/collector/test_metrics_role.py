"""A metrics token: what a Prometheus server holds. `token add --role metrics` makes one;
it reads GET /metrics and gets 403 on everything else (a report, a result, a page, an
admin change), so a leaked scrape credential exposes no report. Real collector on
127.0.0.1 with tokens required; the role on both backends, and a database made before the
role existed upgraded with its tokens kept."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from collector import auth
from collector.cli.main import main
from collector.config import CollectorConfig, ServerConfig, StorageConfig
from collector.errors import Unacceptable
from collector.fleet import probes as admin
from collector.server.testing import RunningCollector, running_collector
from collector.storage.sql.backends import open_store
from collector.storage.store import Store
from tests.factories import session_dict
from tests.httpclient import post_json, request

GUARDED = replace(CollectorConfig(), server=replace(ServerConfig(), query_auth=True))
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[RunningCollector]:
    with running_collector(tmp_path, GUARDED) as running:
        yield running


def _cli(c: RunningCollector, *args: str) -> tuple[int, str, str]:
    done = CliRunner().invoke(main, ["--db", str(c.db_path), *args], catch_exceptions=False)
    return done.exit_code, done.stdout, done.stderr


def _get(url: str, token: str) -> tuple[int, object]:
    status, body, _ = request("GET", url, headers={"Authorization": f"Bearer {token}"})
    return status, body


def test_a_metrics_token_reads_metrics_and_nothing_else(collector: RunningCollector) -> None:
    """The token `token add --role metrics` prints reads /metrics (the fleet series
    too); a report, a certificate, results, the pages and an admin change are 403,
    saying what the token is for; an analyst still reads /metrics; revoked, it is 401."""
    probe = collector.add_probe("p1")
    assert post_json(collector.url + "/api/v1/results", session_dict(probe_id="p1"),
                     probe)[0] == 201
    code, out, err = _cli(collector, "token", "add", "--role", "metrics", "prometheus")
    assert code == 0, err
    scrape = out.strip()
    assert scrape.startswith(auth.TOKEN_PREFIX) and out == scrape + "\n"
    assert "metrics token 'prometheus' created" in err and "credentials_file" in err
    status, body, _ = request("GET", collector.url + "/metrics")
    assert status == 401 and "token add --role metrics NAME" in body["error"]
    status, body = _get(collector.url + "/metrics", scrape)
    assert status == 200 and isinstance(body, bytes)
    assert b"bbprobe_fleet_probes 1" in body
    for path in ("/api/v1/report?probe=p1", "/api/v1/certificate?probe=p1",
                 "/api/v1/results", "/api/v1/fleet", "/report?probe=p1", "/fleet", "/"):
        status, reply = _get(collector.url + path, scrape)
        assert status == 403, path
        assert isinstance(reply, dict) and "metrics token reads GET /metrics only" in \
            reply["error"], (path, reply)
    status, reply = post_json(collector.url + "/api/v1/probes", {"probe_id": "p2"}, scrape)
    assert status == 403 and "metrics token" in reply["error"]
    analyst = collector.add_token("ana")
    assert _get(collector.url + "/metrics", analyst)[0] == 200
    assert _get(collector.url + "/api/v1/report?probe=p1", analyst)[0] == 200
    # A probe's token is no scrape credential either.
    assert _get(collector.url + "/metrics", probe)[0] == 403
    code, out, _ = _cli(collector, "token", "list")
    assert code == 0 and "prometheus  metrics  (active;" in out
    assert _cli(collector, "token", "revoke", "prometheus")[0] == 0
    assert _get(collector.url + "/metrics", scrape)[0] == 401


def test_the_role_in_the_store(store: Store) -> None:
    """SQLite and PostgreSQL both keep a metrics token (the role is allowed by the
    tokens table) and name its role; an unknown role is refused before the store."""
    secret = admin.add_token(store, "prom", "metrics")
    assert store.role_for_token(auth.hash_token(secret)) == ("metrics", "prom")
    assert [(t["name"], t["role"]) for t in store.tokens()] == [("prom", "metrics")]
    with pytest.raises(Unacceptable, match="role must be one of analyst, admin, metrics"):
        admin.add_token(store, "x", "reader")


def test_a_database_from_before_the_role_keeps_its_tokens(tmp_path: Path) -> None:
    """A SQLite file at the schema before metrics tokens, holding an analyst token: it is
    upgraded on open, the analyst token still works, and a metrics token can be added."""
    from collector.storage.sql.base import Tx
    from collector.storage.sql.sqlite import DIALECT
    from collector.storage.sql.sqlite_migrations import MIGRATIONS

    path = tmp_path / "old.sqlite3"
    before = len(MIGRATIONS) - 1
    db = sqlite3.connect(path)
    try:
        for step in MIGRATIONS[:before]:
            if callable(step):
                step(Tx(db, DIALECT))
            else:
                db.executescript(step)
        db.execute("INSERT INTO tokens VALUES ('ana', 'analyst', ?, '2026-01-01', NULL)",
                   (auth.hash_token("bbp_old"),))
        db.execute(f"PRAGMA user_version = {before}")
        db.commit()
    finally:
        db.close()
    store = open_store(StorageConfig(path=str(path)))
    try:
        assert store.schema_version == len(MIGRATIONS)
        assert store.role_for_token(auth.hash_token("bbp_old")) == ("analyst", "ana")
        secret = admin.add_token(store, "prom", "metrics")
        assert store.role_for_token(auth.hash_token(secret)) == ("metrics", "prom")
    finally:
        store.close()


def test_the_shipped_scrape_config_uses_a_metrics_token() -> None:
    """configs/prometheus/prometheus.yml tells how to make the token it reads: a metrics
    one, not an analyst token that could read every report."""
    text = (ROOT / "configs" / "prometheus" / "prometheus.yml").read_text()
    assert "token add --role metrics" in text
    assert "credentials_file: /etc/prometheus/bbprobe-collector.token" in text
