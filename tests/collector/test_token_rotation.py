"""A probe's token is replaced, not its name: `probe rotate` (and the admin API's
rotate) gives a new token, the old one is refused from the next request, and the probe
keeps its line metadata and every result it delivered, so a lost SD card or a leaked
token does not split a line's history. A revoked probe is re-enabled by rotating it.
Real collector on 127.0.0.1, real SQLite file; the store's side on both backends."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from collector import auth
from collector.cli.main import main
from collector.config import CollectorConfig, ServerConfig
from collector.errors import NotFound
from collector.fleet import probes as admin
from collector.lines import LineMetadata
from collector.server.testing import RunningCollector, running_collector
from collector.storage.store import Store
from tests.factories import session_dict
from tests.httpclient import post_json, request

LINE = LineMetadata(operator="OpX", region="Lazio", technology="FTTH",
                    download_min_kbps=30_000.0)
GUARDED = replace(CollectorConfig(), server=replace(ServerConfig(), query_auth=True))


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[RunningCollector]:
    with running_collector(tmp_path, GUARDED) as running:
        yield running


def _cli(c: RunningCollector, *args: str) -> tuple[int, str, str]:
    done = CliRunner().invoke(main, ["--db", str(c.db_path), *args], catch_exceptions=False)
    return done.exit_code, done.stdout, done.stderr


def _deliver(c: RunningCollector, token: str, day: int) -> int:
    doc = session_dict(probe_id="p1", started_at=f"2026-11-{day:02d}T10:00:00.000000Z")
    return post_json(c.url + "/api/v1/results", doc, token)[0]


def _results(c: RunningCollector, analyst: str) -> list[str]:
    status, doc, _ = request("GET", c.url + "/api/v1/results?probe=p1",
                             headers={"Authorization": f"Bearer {analyst}"})
    assert status == 200, doc
    return sorted(r["started_at"] for r in doc["results"])


def test_rotate_refuses_the_old_token_at_once_and_keeps_the_history(
        collector: RunningCollector) -> None:
    """`probe rotate p1` prints the new token alone on stdout; the running collector
    answers the old token 401 at its next request, takes results from the new one,
    and p1's earlier result, line metadata and name are still p1's."""
    old = collector.add_probe("p1", LINE)
    analyst = collector.add_token("ana")
    assert _deliver(collector, old, 20) == 201
    code, out, err = _cli(collector, "probe", "rotate", "p1")
    assert code == 0, err
    new = out.strip()
    assert new.startswith(auth.TOKEN_PREFIX) and new != old and out == new + "\n"
    assert "the old one no longer works" in err and "shown once" in err
    assert "re-enabled" not in err  # it was live
    status, reply = post_json(collector.url + "/api/v1/results",
                              session_dict(probe_id="p1",
                                           started_at="2026-11-21T10:00:00.000000Z"), old)
    assert (status, reply["error"]) == (401, "unknown or revoked token")
    assert _deliver(collector, new, 22) == 201
    status, who, _ = request("GET", collector.url + "/api/v1/whoami",
                             headers={"Authorization": f"Bearer {new}"})
    assert status == 200 and who["probe_id"] == "p1"
    assert _results(collector, analyst) == ["2026-11-20T10:00:00.000000Z",
                                            "2026-11-22T10:00:00.000000Z"]
    store = collector.open_store()
    try:
        probe = store.probe("p1")
    finally:
        store.close()
    assert probe is not None and probe.revoked_at is None and probe.line == LINE
    code, _out, err = _cli(collector, "probe", "rotate", "p9")
    assert code != 0 and "no probe named 'p9'" in err


def test_a_revoked_probe_comes_back_under_its_name_through_the_admin_api(
        collector: RunningCollector) -> None:
    """After a revoke, `probe add p1` is refused and points at rotate; the admin API's
    rotate answers the new token and says it re-enabled the probe; the new token
    ingests, the revoked one stays refused; only an admin may rotate."""
    old = collector.add_probe("p1", LINE)
    admin_token = collector.add_token("ops", "admin")
    analyst = collector.add_token("ana")
    assert _deliver(collector, old, 20) == 201
    base = collector.url + "/api/v1/probes/p1"
    assert post_json(base + "/revoke", {}, admin_token)[0] == 200
    assert _deliver(collector, old, 21) == 401
    code, _out, err = _cli(collector, "probe", "add", "p1")
    assert code == 1 and "already exists" in err and "probe rotate p1" in err
    status, reply = post_json(collector.url + "/api/v1/probes", {"probe_id": "p1"},
                              admin_token)
    assert status == 409 and "probe rotate p1" in reply["error"]
    assert post_json(base + "/rotate", {}, analyst)[0] == 403
    assert post_json(base + "/rotate", {}, old)[0] in (401, 403)
    status, reply = post_json(base + "/rotate", {}, admin_token)
    assert status == 200, reply
    assert reply["probe_id"] == "p1" and reply["reenabled"] is True
    assert reply["was_revoked_at"]
    new = reply["token"]
    assert _deliver(collector, new, 22) == 201
    assert _deliver(collector, old, 23) == 401
    assert _results(collector, analyst) == ["2026-11-20T10:00:00.000000Z",
                                            "2026-11-22T10:00:00.000000Z"]
    status, reply = post_json(collector.url + "/api/v1/probes/nope/rotate", {}, admin_token)
    assert status == 404 and reply["field"] == "probe_id"


def test_rotation_in_the_store(store: Store) -> None:
    """On SQLite and PostgreSQL: the new digest finds the probe, the old one nothing;
    a revoked probe is live again; an unknown name is NotFound."""
    first = admin.register_probe(store, "p1", LINE)
    second, revoked = admin.rotate_probe(store, "p1")
    assert revoked is None
    assert store.probe_for_token(auth.hash_token(first)) is None
    assert store.role_for_token(auth.hash_token(first)) is None
    found = store.probe_for_token(auth.hash_token(second))
    assert found is not None and found.name == "p1" and found.line == LINE
    assert admin.revoke(store, "probe", "p1")
    assert store.probe_for_token(auth.hash_token(second)) is None
    third, revoked = admin.rotate_probe(store, "p1")
    assert revoked is not None
    assert store.role_for_token(auth.hash_token(third)) == ("probe", "p1")
    assert store.probe_for_token(auth.hash_token(second)) is None
    probe = store.probe("p1")
    assert probe is not None and probe.revoked_at is None
    assert [p.name for p in store.probes()] == ["p1"]
    with pytest.raises(NotFound, match="no probe named 'p2'"):
        admin.rotate_probe(store, "p2")
