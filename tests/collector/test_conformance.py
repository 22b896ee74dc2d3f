"""The storage conformance suite: the same behaviour from SQLite and from a real
PostgreSQL. Each test named ``test_store_*`` or ``test_api_*`` runs once per
backend (the ``storage`` fixture); the ``test_same_*`` tests load the same data into
both and compare what they give back, byte for byte.

PostgreSQL is started by the tests (tests/pg.py); under CI=true it must run.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import threading
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent.schema import SessionResult, to_dict
from collector.compliance import targets
from collector.compliance.completeness import completeness
from collector.compliance.evaluate import evaluate, observe
from collector.config import CollectorConfig, StorageConfig
from collector.errors import AlreadyExists
from collector.fleet.probes import add_token, register_probe
from collector.intake import ingest
from collector.lines import LineMetadata
from collector.reports import html as html_report
from collector.reports import service
from collector.reports.text import (
    REPORT_COLUMNS,
    certificate_dict,
    format_csv,
    report_dict,
    report_rows,
)
from collector.scope import resolve_scope
from collector.server.testing import running_collector
from collector.storage.model import NewResult, Quota
from collector.storage.sql.backends import open_store
from collector.storage.sql.migrate import Checkpoint, copy_store
from collector.storage.store import Store
from tests.factories import (
    attempt,
    canonical_json,
    day_rollups,
    insert_result,
    session,
    store_result,
)
from tests.httpclient import post_json, request

TABLE = targets.load("")
PROBES = ("alpha", "beta-2", "Gamma_3")
LINE = LineMetadata(operator="BT Italia", offer="FTTH 1000", region="Lazio",
                    technology="FTTH", download_min_kbps=30_000.0, upload_min_kbps=3_000.0)


def dataset(seed: int = 13) -> list[SessionResult]:
    """Three probes over three UTC days (partial days at both ends of the report scope),
    with awkward speeds (thirds, sevenths), failed attempts, lost pings, invalid sessions
    and a session without pings, in a fixed shuffled arrival order."""
    rng = random.Random(seed)
    out = []
    for probe in PROBES:
        for day in ("01", "02", "03"):
            for hour in range(0, 24, 3):
                started = f"2026-05-{day}T{hour:02d}:{rng.randrange(60):02d}:00.000000Z"
                rtts = [rng.uniform(8, 40) / 3 if rng.random() > 0.1 else None
                        for _ in range(6)]
                transfers = [attempt("download", 0, n, bps=rng.uniform(20e6, 90e6) / 7)
                             for n in (1, 2)]
                if rng.random() < 0.15:
                    transfers.append(attempt("download", 1, 1, ok=False))
                transfers.append(attempt("upload", bps=rng.uniform(2e6, 9e6) / 3))
                invalid = ["wifi"] if rng.random() < 0.08 else []
                out.append(session(probe, started_at=started, rtts=rtts if hour else [],
                                   transfers=transfers, invalid=invalid,
                                   result_id=str(uuid.UUID(int=rng.getrandbits(128)))))
    rng.shuffle(out)
    return out


def fill(store: Store, results: list[SessionResult]) -> None:
    for probe in PROBES:
        store.add_probe(probe, f"digest-{probe}", "2026-04-30T00:00:00.000000Z", LINE)
    for result in results:
        store_result(store, result)


# --- store level, once per backend ------------------------------------------------------


def test_store_probes_and_tokens(store: Store) -> None:
    """Probes and tokens on each backend: names are unique, a token maps to its role and name, a
    revoked token or probe no longer authenticates, and revoking twice reports nothing to
    revoke."""
    token = register_probe(store, "p1", LINE)
    assert [p.name for p in store.probes()] == ["p1"]
    assert store.probe("p1") is not None and store.probe("p1").line == LINE  # type: ignore[union-attr]
    with pytest.raises(AlreadyExists, match="a probe named 'p1' already exists"):
        register_probe(store, "p1", LineMetadata())
    from collector import auth

    assert store.role_for_token(auth.hash_token(token)) == ("probe", "p1")
    admin = add_token(store, "root", "admin")
    assert store.role_for_token(auth.hash_token(admin)) == ("admin", "root")
    with pytest.raises(AlreadyExists):
        add_token(store, "root", "analyst")
    assert store.revoke_token("root", "2026-05-01T00:00:00.000000Z")
    assert not store.revoke_token("root", "2026-05-01T00:00:00.000000Z")
    assert store.role_for_token(auth.hash_token(admin)) is None
    assert store.revoke_probe("p1", "2026-05-01T00:00:00.000000Z")
    assert store.probe_for_token(auth.hash_token(token)) is None
    assert [t["name"] for t in store.tokens()] == ["root"]


def test_store_ingest_is_idempotent(store: Store) -> None:
    """Same id and content: duplicate, nothing written; same id, other content: conflict."""
    store.add_probe("p1", "d", "2026-04-30T00:00:00.000000Z", LineMetadata())
    result = session("p1")
    accepted = ingest.parse_body(canonical_json(result).encode())
    other = ingest.parse_body(canonical_json(
        replace(result, agent_version="other")).encode())
    item = dict(result_id=result.result_id, probe_name="p1", schema_version=4,
                started_at=accepted.started_at, ended_at=accepted.ended_at,
                received_at="2026-05-01T00:00:00.000000Z", body=accepted.body,
                body_sha256=accepted.body_sha256, facts=accepted.facts)
    assert insert_result(store, **item) == "stored"
    assert insert_result(store, **item) == "duplicate"
    assert insert_result(store, **{**item, "body": other.body,
                                   "body_sha256": other.body_sha256}) == "conflict"
    assert store.count_results() == 1 and len(store.facts()) == 1
    stored = store.result(result.result_id)
    assert stored is not None and stored.body == accepted.body


def test_store_packed_and_old_text_bodies(store: Store) -> None:
    """Packed bodies on both engines: a packed body reads back as its canonical JSON; a row
    an older release stored as text (other canonical bytes and hash) reads back as it
    was, and the same result delivered again is a duplicate; pack_text_bodies then packs
    it, in steps, and it reads back in today's canonical form."""
    store.add_probe("p1", "d", "2026-04-30T00:00:00.000000Z", LineMetadata())
    results = [session("p1", started_at=f"2026-05-01T1{i}:00:00.000000Z") for i in range(3)]
    accepted = [ingest.parse_body(canonical_json(r).encode()) for r in results]

    def item(a: ingest.Accepted, **changes: Any) -> NewResult:
        r = a.result
        return replace(NewResult(
            result_id=r.result_id, probe_name="p1", schema_version=r.schema_version,
            started_at=a.started_at, ended_at=a.ended_at,
            received_at="2026-05-02T00:00:00.000000Z", body=a.body,
            body_sha256=a.body_sha256, facts=a.facts, packed=a.packed), **changes)

    old = [json.dumps(to_dict(r), sort_keys=True, separators=(",", ":")) for r in results]
    assert store.insert_results([item(accepted[0])] + [
        item(a, body=text, packed=None, body_sha256=hashlib.sha256(text.encode()).hexdigest())
        for a, text in zip(accepted[1:], old[1:], strict=True)]) == ["stored"] * 3
    assert store.result(results[0].result_id).body == accepted[0].body  # type: ignore[union-attr]
    assert store.result(results[1].result_id).body == old[1]  # type: ignore[union-attr]
    assert store.insert_results([item(a) for a in accepted]) == ["duplicate"] * 3
    first = store.pack_text_bodies("", 1)
    assert first[:2] == (1, 0) and first[2] is not None
    rest = store.pack_text_bodies(first[2], 10)
    assert rest[:2] == (1, 0)
    assert store.pack_text_bodies(rest[2] or "", 10) == (0, 0, None)
    for a in accepted:
        assert store.result(a.result.result_id).body == a.body  # type: ignore[union-attr]
    assert store.insert_results([item(a) for a in accepted]) == ["duplicate"] * 3


def test_store_report_equals_the_bodies(store: Store) -> None:
    """Facts and day rollups give the report the decoded bodies give, whole and partial
    days, valid only and with invalid sessions; percentiles (type 7) exactly."""
    results = dataset()
    fill(store, results)
    since, until = "2026-05-01T07:30:00.000000Z", "2026-05-03T16:00:00.000000Z"
    chosen = [r for r in results if since <= r.started_at < until]
    for include_invalid in (False, True):
        got = evaluate(store.observations(None, since, until, include_invalid), TABLE)
        want = evaluate(observe(chosen, include_invalid=include_invalid), TABLE)
        assert got.sessions == want.sessions
        assert got.invalid_sessions == want.invalid_sessions
        for g, w in zip(got.indicators, want.indicators, strict=True):
            assert (g.id, g.samples, g.passed) == (w.id, w.samples, w.passed)
            if "_p" in g.id:  # percentiles of the same values: to the last digit
                assert g.observed == w.observed, g.id
            elif g.observed is not None:
                assert g.observed == pytest.approx(w.observed, rel=1e-12), g.id
        # Jitter (delibera 156/23/CONS), informational with this table: the day rollups' sums and
        # the sessions' give the bodies' figure.
        (gj,), (wj,) = got.informational, want.informational
        assert (gj.id, gj.samples) == (wj.id, wj.samples) and gj.samples > 0
        assert gj.observed == wj.observed  # integer nanosecond sums: exact


def test_store_gaps_and_completeness(store: Store) -> None:
    """Gap records on each backend: stored, then duplicate, then conflict for other content; a
    count of 2**53 round-trips; sequence ranges plus delivered sessions make a day complete
    (4 delivered, 3 documented, none missing)."""
    store.add_probe("p1", "d", "2026-04-30T00:00:00.000000Z", LineMetadata())
    args = ("g1", "p1", "2026-05-02T00:00:00.000000Z", "spool_full", 3,
            "2026-05-01T01:00:00.000000Z", "2026-05-01T02:00:00.000000Z", "sha")
    assert store.insert_gap(*args, seq_ranges=[(4, 6)]) == "stored"
    assert store.insert_gap(*args, seq_ranges=[(4, 6)]) == "duplicate"
    assert store.insert_gap(*args[:-1], "other") == "conflict"
    # As large as the schema allows (2**53), on both engines.
    assert store.insert_gap("g2", *args[1:4], 2**53, *args[5:]) == "stored"
    assert [g["gap_id"] for g in store.gaps(["p1"], "2026-05-01", None)] == ["g1", "g2"]
    assert store.gap_seq_ranges(["p1"]) == {"p1": [(4, 6)]}
    assert store.gaps(["p1"])[1]["dropped"] == 2**53
    for seq in (1, 2, 3, 7):
        result = replace(session("p1", started_at=f"2026-05-01T0{seq}:00:00.000000Z"),
                         session_seq=seq)
        accepted = ingest.parse_body(canonical_json(result).encode())
        insert_result(store, result_id=result.result_id, probe_name="p1", schema_version=4,
                      started_at=accepted.started_at, ended_at=accepted.ended_at,
                      received_at="2026-05-02T00:00:00.000000Z", body=accepted.body,
                      body_sha256=accepted.body_sha256, facts=accepted.facts,
                      session_seq=seq)
    where = resolve_scope(["p1"], "2026-05-01", "2026-05-02")
    (day,) = completeness(*service.completeness_inputs(store, where))
    assert (day.delivered, day.documented, day.missing) == (4, 3, 0)


def test_store_anonymous_tables_and_quotas(store: Store) -> None:
    """Browser results and ndt7 tests on each backend: the row cap and retention prune the
    oldest, ndt7 archives are stored once per UUID, their measurements on request, customer
    speeds filter by network, and an explicit prune applies both quotas."""
    from collector.storage.sql.anonymous import PRUNE_EVERY

    quota = Quota(keep_after="2026-01-01T00:00:00.000000Z", max_rows=50)
    first = store.add_browser_result("2025-06-01T00:00:00.000000Z", "203.0.113.1", "{}", quota)
    for n in range(2, PRUNE_EVERY + 1):
        store.add_browser_result(f"2026-02-01T00:00:{n:02d}.000000Z", "203.0.113.1",
                                 json.dumps({"n": n, "download_bps": 5e7}), quota)
    rows = store.browser_results()
    assert len(rows) == 50 and rows[0]["id"] > first
    assert max(r["n"] for r in rows) == PRUNE_EVERY
    archive = {"UUID": "u1", "Test": "download", "Client": "[2001:db8::1]:5",
               "EndReason": "done", "Summary": {"throughput_bps": 9e7, "min_rtt_ms": 3.0},
               "ServerMeasurements": [{"x": 1}]}
    store.add_ndt7_test(archive, "2026-02-01T00:00:00.000000Z", "2026-02-01T00:00:10.000000Z")
    store.add_ndt7_test(archive, "2026-02-01T00:00:00.000000Z", "2026-02-01T00:00:10.000000Z")
    assert [t["UUID"] for t in store.ndt7_tests()] == ["u1"]
    assert "ServerMeasurements" in store.ndt7_tests(measurements=True)[0]
    speeds = store.customer_speeds(network="2001:db8::/32")
    assert speeds == [("ndt7", "download", 90000.0)]
    store.prune_anonymous(Quota("2026-02-01T00:00:30.000000Z", 10), Quota("2027-01-01", 5))
    assert len(store.browser_results()) == 10 and store.ndt7_tests() == []


def test_store_influx_outbox(storage: StorageConfig) -> None:
    """Queued at ingest; leased, written, dead-lettered, queued again; a lease left by
    a process that died expires."""
    store = open_store(storage, outbox=True)
    try:
        fill(store, dataset()[:6])
        assert store.outbox_size() == 6
        first = store.outbox_lease("a", 4, "2026-05-01T00:00:00Z", "2026-05-01T00:05:00Z")
        assert len(first) == 4 and first[0][2] == LINE
        # Another process sees only what is not leased; the owner gets its own back.
        other = store.outbox_lease("b", 10, "2026-05-01T00:01:00Z", "2026-05-01T00:06:00Z")
        assert {r[0] for r in other}.isdisjoint(r[0] for r in first) and len(other) == 2
        again = store.outbox_lease("a", 4, "2026-05-01T00:01:00Z", "2026-05-01T00:06:00Z")
        assert [r[0] for r in again] == [r[0] for r in first]
        store.outbox_done([r[0] for r in first[:3]])
        store.outbox_dead_letter(first[3][0], "refused", "2026-05-01T00:02:00Z")
        assert (store.outbox_size(), store.outbox_dead_count()) == (2, 1)
        # "b" died: its lease expires and "c" takes the rows.
        taken = store.outbox_lease("c", 10, "2026-05-01T00:07:00Z", "2026-05-01T00:12:00Z")
        assert {r[0] for r in taken} == {r[0] for r in other}
        assert store.outbox_retry_dead("2026-05-01T00:08:00Z") == 1
        assert store.outbox_dead_letters() == [] and store.outbox_size() == 3
        assert store.outbox_enqueue(None, None, None, "2026-05-01T00:09:00Z") == 3
    finally:
        store.close()


def test_store_certificate(store: Store) -> None:
    """A certificate through the store on each backend names the probe and its line and counts
    sessions in the hourly bands."""
    fill(store, dataset())
    cert = service.certificate(store, "alpha", "2026-05-01", "2026-05-04", "96in24h",
                               "Europe/Rome")
    assert cert.probe_id == "alpha" and cert.line == LINE and sum(cert.band_counts) > 0


# --- both backends at once: the same data gives the same answers, byte for byte ---------


def _everything(store: Store) -> dict[str, Any]:
    """What a store gives back for the dataset, in the forms analysts get."""
    scope = resolve_scope(None, "2026-05-01T05:00:00Z", "2026-05-03T20:00:00Z")
    report = service.compliance(store, scope, TABLE)
    view = service.report_view(store, scope, TABLE)
    page = html_report.render_view(view, "Europe/Rome", "2026-06-01T00:00:00.000000Z")
    return {
        "report": json.dumps(report_dict(report, scope), sort_keys=True),
        "report_invalid": json.dumps(report_dict(
            service.compliance(store, scope, TABLE, include_invalid=True), scope)),
        "csv": format_csv(report_rows(report, scope), REPORT_COLUMNS),
        "listing": service.listing(store, scope),
        "samples": [to_dict_facts(f) for f in service.samples(store, scope, True)],
        "hourly": store.hourly(None, scope.since, scope.until),
        "days": day_rollups(store),
        "certificates": [json.dumps(certificate_dict(service.certificate(
            store, p, "2026-05-01", "2026-05-04", "96in24h", "Europe/Rome")))
            for p in PROBES],
        "html": re.sub(r"\s+", " ", page),
        "probes": [p.to_dict() for p in store.probes()],
    }


def to_dict_facts(facts: Any) -> tuple[Any, ...]:
    return (facts.result_id, facts.probe_id, facts.started_at, facts.pings_sent,
            facts.pings_lost, facts.rtt, facts.rtts_ms, facts.transfers, facts.valid)


def test_store_fleet_control(store: Store) -> None:
    """The fleet-control tables through the Store seam: instruction rules (created, merged,
    emptied), suppression windows (bounded, forgotten, current ones only), health
    reports (the latest kept) and each probe's recent activity; and the fleet rows and
    effective instructions built on them."""
    from collector.fleet import control
    from collector.fleet.rules import Selector

    fill(store, dataset())
    lazio = Selector(region="Lazio").key()
    assert store.update_instruction_rule(lazio, lambda cur: {**cur, "ping.count": 20},
                                         "2026-05-04T00:00:00Z") == {"ping.count": 20}
    merged = store.update_instruction_rule(lazio, lambda cur: {**cur, "profile": "rmbt"},
                                           "2026-05-04T01:00:00Z")
    assert merged == {"ping.count": 20, "profile": "rmbt"}
    assert store.instruction_rules() == [(lazio, merged, "2026-05-04T01:00:00Z")]
    control.set_instruction(store, Selector(probe="alpha"), {"ping.count": 30})
    shown = control.show(store, "alpha")
    assert shown["settings"] == {"ping.count": 30, "profile": "rmbt"}
    assert shown["sources"] == {"ping.count": "--probe alpha", "profile": "--region Lazio"}
    assert store.update_instruction_rule(lazio, lambda cur: {}, "x") == {}
    assert [key for key, _, _ in store.instruction_rules()] == [
        Selector(probe="alpha").key()]

    everyone = Selector().key()
    old = store.add_suppression(everyone, "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z",
                                "long ago", "2026-01-01T00:00:00Z")
    first = store.add_suppression(everyone, "2026-05-05T00:00:00Z",
                                  "2026-05-05T02:00:00Z", "works", "2026-05-04T00:00:00Z",
                                  max_open=2)
    second = store.add_suppression(lazio, "2026-05-06T00:00:00Z", "2026-05-06T02:00:00Z",
                                   "more works", "2026-05-04T00:00:00Z", max_open=2,
                                   forget_before="2026-03-01T00:00:00Z")
    assert old is not None and first is not None and second is not None
    assert len({old, first, second}) == 3
    assert store.add_suppression(everyone, "2026-05-07T00:00:00Z", "2026-05-07T01:00:00Z",
                                 "one too many", "2026-05-04T00:00:00Z", max_open=2) is None
    listed = store.suppressions()
    assert [w["reason"] for w in listed] == ["works", "more works"]  # the old one forgotten
    assert [w["id"] for w in store.suppressions("2026-05-05T12:00:00Z")] == [second]
    assert store.delete_suppression(first) and not store.delete_suppression(first)

    store.put_health("alpha", "2026-05-04T00:00:00Z", 0.5, json.dumps({"spool_results": 1}))
    store.put_health("alpha", "2026-05-04T01:00:00Z", None, json.dumps({"spool_results": 2}))
    assert store.health() == {"alpha": ("2026-05-04T01:00:00Z", None, {"spool_results": 2})}
    activity = store.activity("2026-05-02T00:00:00Z")
    assert set(activity) == set(PROBES)
    facts = [f for f in store.facts(["alpha"]) if f.started_at >= "2026-05-02T00:00:00Z"]
    assert activity["alpha"]["sessions"] == len(facts)
    assert activity["alpha"]["valid_sessions"] == sum(f.valid for f in facts)
    assert activity["alpha"]["last_started_at"] == max(
        r.started_at for r in store.results(["alpha"]))
    rows = control.fleet_rows(store, 3600, 7)
    assert [r["probe_id"] for r in rows] == sorted(PROBES)
    assert all(r["silent"] for r in rows)  # May's results, seen long ago


def test_store_latest_sessions_and_metrics(store: Store) -> None:
    """Per-probe metrics through the Store seam: each probe's newest session facts (what the
    per-probe metrics show) equal the newest of its full facts, transfers included; and
    the metrics snapshot reads on this backend."""
    from collector.config import CollectorConfig
    from collector.web.metrics_routes import read_snapshot

    fill(store, dataset())
    assert store.latest_sessions([]) == []
    latest = store.latest_sessions(["alpha", "nobody", "Gamma_3"])
    assert [f.probe_id for f in latest] == ["alpha", "Gamma_3"]
    for facts in latest:
        everything = store.facts([facts.probe_id])
        newest = max(everything, key=lambda f: (f.started_at, f.result_id))
        assert to_dict_facts(facts) == to_dict_facts(newest)
    snap = read_snapshot(store, CollectorConfig(), outbox=False)
    assert (snap.probes, snap.silent, snap.healthy) == (3, 3, 0)
    assert [p.probe.name for p in snap.per_probe] == sorted(PROBES)
    assert snap.database_size_bytes > 0 and snap.outbox_results is None


def test_store_alerts(store: Store) -> None:
    """Alerts through the Store seam: an alert is recorded once per key with a pending
    delivery per notifier; a lease goes to one owner, and only the lease holder records
    the outcome; listing and pruning."""
    fill(store, dataset())
    first = store.add_alert("k1", "probe_silent", "alpha", "warning",
                            "2026-05-04T00:00:00.000000Z", "alpha silent", '{"a": 1}',
                            ["ops", "chat"])
    assert first is not None
    assert store.add_alert("k1", "probe_silent", "alpha", "warning",
                           "2026-05-04T00:01:00.000000Z", "again", "{}", ["ops"]) is None
    second = store.add_alert("k2", "test", None, "info", "2026-05-05T00:00:00.000000Z",
                             "test", "{}", ["ops"])
    assert store.alert_keys(["k1", "k2", "k3"]) == {"k1", "k2"}
    now, until = "2026-05-05T00:00:00.000000Z", "2026-05-05T00:02:00.000000Z"
    # Only the notifiers a process knows, only one alert's when asked.
    assert [(d.alert_id, d.notifier) for d in store.lease_deliveries(
        "owner-x", now, until, 10, ["chat"], alert_id=second)] == []
    assert store.lease_deliveries("owner-x", now, until, 10, []) == []
    leased = store.lease_deliveries("owner-a", now, until, 10, ["ops", "chat"])
    assert [(d.alert_id, d.notifier) for d in leased] == [
        (first, "chat"), (first, "ops"), (second, "ops")]
    assert leased[0].subject == "alpha silent" and leased[0].details == '{"a": 1}'
    assert store.lease_deliveries("owner-b", now, until, 10, ["ops", "chat"]) == []
    assert not store.finish_delivery(first, "ops", "owner-b", "delivered", 1, now, None, now)
    assert store.finish_delivery(first, "ops", "owner-a", "delivered", 1, now, None, now)
    assert store.finish_delivery(first, "chat", "owner-a", "pending", 1,
                                 "2026-05-05T00:10:00.000000Z", "HTTP 503", None)
    # The lease expired: another owner takes what is due (the retry is not yet).
    later = "2026-05-05T00:05:00.000000Z"
    assert [(d.alert_id, d.notifier) for d in store.lease_deliveries(
        "owner-b", later, "2026-05-05T00:07:00.000000Z", 10, ["ops", "chat"])] == [
        (second, "ops")]
    assert store.release_deliveries("owner-b") == 1
    assert [d.notifier for d in store.lease_deliveries(
        "owner-c", later, "2026-05-05T00:07:00.000000Z", 10, ["ops"])] == ["ops"]
    rows = store.alerts(10)
    assert [r["id"] for r in rows] == [second, first]
    states = {d["notifier"]: (d["state"], d["attempts"], d["last_error"])
              for d in rows[1]["deliveries"]}
    assert states == {"chat": ("pending", 1, "HTTP 503"), "ops": ("delivered", 1, None)}
    assert [r["id"] for r in store.alerts(10, since="2026-05-04T12:00:00.000000Z")] == [second]
    assert [r["id"] for r in store.alerts(1, ident=first)] == [first]
    assert store.prune_alerts("2026-05-04T12:00:00.000000Z") == 1
    assert [r["id"] for r in store.alerts(10)] == [second]


def test_same_answers_from_both_backends(tmp_path: Path, pg_url: str) -> None:
    """The same data loaded into SQLite and PostgreSQL gives the same answers to every query,
    byte for byte; the hourly plot sums agree to 12 digits (the engines add in different
    orders)."""
    results = dataset()
    answers = []
    for cfg in (StorageConfig(path=str(tmp_path / "s.sqlite3")),
                StorageConfig(backend="postgresql", url=pg_url)):
        store = open_store(cfg)
        try:
            fill(store, results)
            answers.append(_everything(store))
        finally:
            store.close()
    lite, pg = answers
    # The hourly plot series are sums the database computes (over millions of rows for a
    # fleet's page): equal to 12 digits, not to the last bit, as the engines add in
    # different orders. Everything a verdict rests on is exact.
    for a, b in zip(lite.pop("hourly"), pg.pop("hourly"), strict=True):
        assert (a.hour, a.sessions, a.pings_sent, a.pings_lost, a.rtt_n, a.download_n,
                a.upload_n) == (b.hour, b.sessions, b.pings_sent, b.pings_lost, b.rtt_n,
                                b.download_n, b.upload_n)
        for x, y in ((a.rtt_sum_ms, b.rtt_sum_ms), (a.download_kbps_sum, b.download_kbps_sum),
                     (a.upload_kbps_sum, b.upload_kbps_sum)):
            assert x == pytest.approx(y, rel=1e-12)
    for key in lite:
        assert lite[key] == pg[key], key


def test_migrate_copies_everything_and_resumes(tmp_path: Path, pg_url: str) -> None:
    """SQLite -> PostgreSQL: every table, counted; the same answers; a second run copies
    nothing new; an interrupted copy (here: a partial one) completes on the next run."""
    source = open_store(StorageConfig(path=str(tmp_path / "s.sqlite3")), outbox=True)
    target = open_store(StorageConfig(backend="postgresql", url=pg_url))
    try:
        fill(source, dataset())
        add_token(source, "analyst1", "analyst")
        source.insert_gap("g1", "alpha", "2026-05-04T00:00:00Z", "spool_full", 2,
                          "2026-05-02T00:00:00Z", "2026-05-02T01:00:00Z", "s", [(9, 10)])
        source.add_browser_result("2026-05-02T00:00:00.000000Z", "198.51.100.1",
                                  json.dumps({"download_bps": 1e8, "upload_bps": 1e7}))
        first_queued = source.dump("influx_outbox", None, 1)[0][1]  # (seq, result_id, ...)
        source.outbox_dead_letter(first_queued, "refused", "2026-05-04")
        # Fleet control: a rule, a window, a health report.
        source.update_instruction_rule('{"region": "Lazio"}', lambda _: {"ping.count": 20},
                                       "2026-05-04T00:00:00Z")
        source.add_suppression("{}", "2026-05-05T00:00:00Z", "2026-05-05T02:00:00Z",
                               "works", "2026-05-04T00:00:00Z")
        source.put_health("alpha", "2026-05-04T00:00:00Z", 0.1, '{"spool_results": 0}')
        # Interrupted after two pages of results; the checkpoint file says where.
        mark = Checkpoint(target.describe, tmp_path / "copy.json")
        pages = {"results": 0}

        def cut(table: str, copied: int) -> None:
            if table == "results":
                pages["results"] += 1
                if pages["results"] == 2:
                    raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            copy_store(source, target, page=25, checkpoint=mark, progress=cut)
        assert target.count("results") == 50
        again = Checkpoint.load(tmp_path / "copy.json", target.describe)
        assert len(again.keys["results"]) == 1 and "probes" in again.keys
        copies = copy_store(source, target, page=25, checkpoint=again)
        assert all(c.complete for c in copies), copies
        assert {c.table: c.target_rows for c in copies} == {
            c.table: source.count(c.table) for c in copies}
        by_table = {c.table: c.copied for c in copies}
        assert by_table["results"] == source.count("results") - 50
        assert by_table["probes"] == 0  # resumed after the checkpoint
        mine, theirs = _everything(source), _everything(target)
        assert mine.pop("hourly") and theirs.pop("hourly")
        assert mine == theirs
        assert all(c.copied == 0 for c in copy_store(source, target, page=25))
        # The copied sequences go on: new rows get new keys.
        assert target.add_browser_result("2026-05-05T00:00:00.000000Z", "x", "{}") > 1
        assert target.outbox_retry_dead("2026-05-05T00:00:00Z") == 1
        assert target.instruction_rules() == source.instruction_rules()
        assert target.health() == source.health()
        assert (target.add_suppression("{}", "2026-05-06T00:00:00Z", "2026-05-06T01:00:00Z",
                                       "next", "2026-05-05T00:00:00Z") or 0) > 1
    finally:
        source.close()
        target.close()


# --- API level, once per backend ---------------------------------------------------------


def _config(storage: StorageConfig) -> CollectorConfig:
    base = CollectorConfig()
    return replace(base, server=replace(base.server, query_auth=False,
                                        probe_requests_per_min=0), storage=storage)


def test_api_ingest_and_report(storage: StorageConfig, tmp_path: Path) -> None:
    """Over HTTP: stored 201, duplicate 200, conflict 409, a batch, a gap; the report,
    CSV and page answer."""
    with running_collector(tmp_path, _config(storage)) as c:
        token = c.add_probe("p1", LINE)
        url = c.url + "/api/v1/results"
        doc = json.loads(canonical_json(session("p1")))
        assert post_json(url, doc, token)[0] == 201
        assert post_json(url, doc, token)[0] == 200
        assert post_json(url, {**doc, "agent_version": "x"}, token)[0] == 409
        batch = [json.loads(canonical_json(session(
            "p1", started_at=f"2026-11-21T1{h}:00:00.000000Z"))) for h in range(3)]
        status, data = post_json(url + "/batch", {"results": [*batch, doc]}, token)
        assert status == 200
        assert [i["status"] for i in data["items"]] == [201, 201, 201, 200]
        assert c.count_results() == 4
        status, report, _ = request("GET", c.url + "/api/v1/report?probe=p1")
        assert status == 200 and report["sessions"] == 4
        status, body, _ = request("GET", c.url + "/api/v1/report?format=csv")
        assert status == 200 and b"download_p5_kbps" in body
        status, body, _ = request("GET", c.url + "/report?probe=p1")
        assert status == 200 and b"<svg" in body
        status, data, _ = request("GET", c.url + "/api/v1/completeness?probe=p1")
        assert status == 200


def test_same_api_answers_from_both_backends(tmp_path: Path, pg_url: str) -> None:
    """Two collectors, one per backend, fed the same documents in the same order: every
    query answers the same bytes."""
    docs = [json.loads(canonical_json(r)) for r in dataset()[:60]]
    answers = []
    for name, storage in (("lite", StorageConfig()),
                          ("pg", StorageConfig(backend="postgresql", url=pg_url))):
        with running_collector(tmp_path / name, _config(storage)) as c:
            tokens = {p: c.add_probe(p, LINE) for p in PROBES}
            for doc in docs:
                assert post_json(c.url + "/api/v1/results", doc, tokens[doc["probe_id"]])[0] \
                    == 201
            got = {}
            for query in ("/api/v1/report?since=2026-05-01T05:00:00Z",
                          "/api/v1/report?format=csv&operator=BT+Italia",
                          "/api/v1/samples?format=csv&include_invalid=true",
                          "/api/v1/results?probe=alpha",
                          "/api/v1/certificate?probe=beta-2&since=2026-05-01"):
                status, body, _ = request("GET", c.url + query)
                assert status == 200, (query, body)
                if isinstance(body, dict) and "results" in body:
                    for row in body["results"]:
                        row.pop("received_at")  # when this run posted it
                for version in body.get("contracts", []) if isinstance(body, dict) else []:
                    del version["valid_from"], version["changed_at"]  # registered by this run
                got[query] = body
            answers.append(got)
    assert answers[0] == answers[1]


# --- many collectors over one PostgreSQL database --------------------------------------


def test_two_stores_lease_every_outbox_row_once(pg_url: str) -> None:
    """Two processes' sinks (two stores, two pools) leasing at once: every row goes to
    exactly one of them (FOR UPDATE SKIP LOCKED)."""
    cfg = StorageConfig(backend="postgresql", url=pg_url)
    seed = open_store(cfg, outbox=True)
    fill(seed, dataset())
    total = seed.outbox_size()
    seed.close()
    taken: dict[str, list[str]] = {"a": [], "b": []}

    def drain(owner: str) -> None:
        store = open_store(cfg)
        try:
            while True:
                rows = store.outbox_lease(owner, 7, "2026-05-01T00:00:00Z",
                                          "2999-01-01T00:00:00Z")
                if not rows:
                    return
                taken[owner] += [r[0] for r in rows]
                store.outbox_done([r[0] for r in rows])
        finally:
            store.close()

    threads = [threading.Thread(target=drain, args=(o,)) for o in taken]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    both = taken["a"] + taken["b"]
    assert len(both) == len(set(both)) == total
    assert taken["a"] and taken["b"]


def test_password_from_a_credential_and_never_shown(tmp_path: Path, pg_url: str) -> None:
    """The password from a systemd credential (URI without it); a wrong one is refused
    with libpq's message, which never holds the password; URIs are shown masked."""
    from urllib.parse import unquote, urlsplit

    from collector.errors import StoreError
    from collector.storage.uri import masked

    quoted = urlsplit(pg_url).password or ""
    secret, bare_url = unquote(quoted), pg_url.replace(f":{quoted}@", "@")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "pg-password").write_text(secret + "\n")
    cfg = StorageConfig(backend="postgresql", url=bare_url,
                        password_credential="pg-password")
    store = open_store(cfg, environ={"CREDENTIALS_DIRECTORY": str(creds)})
    try:
        assert store.count_results() == 0
        assert secret not in store.describe
    finally:
        store.close()
    (creds / "pg-password").write_text("not-the-password\n")
    with pytest.raises(StoreError) as refused:
        open_store(cfg, environ={"CREDENTIALS_DIRECTORY": str(creds)})
    assert "password authentication failed" in str(refused.value)
    assert "not-the-password" not in str(refused.value)
    assert masked(pg_url) == bare_url.replace("bbprobe@", "bbprobe:***@")
    assert secret not in masked(pg_url)


def test_cli_on_postgresql_and_migrate(tmp_path: Path, pg_url: str,
                                       pg_cluster: Any) -> None:
    """Every command that opens the store takes a postgresql:// URI in --db; `migrate
    --to` copies an SQLite collector, checks counts and the report, and a second run
    copies nothing."""
    from click.testing import CliRunner

    from collector.cli.main import main

    def run(*args: str) -> tuple[int, str, str]:
        done = CliRunner().invoke(main, list(args), catch_exceptions=False)
        return done.exit_code, done.stdout, done.stderr

    code, out, err = run("--db", pg_url, "init")
    assert code == 0 and len(out.strip()) > 20, err
    assert "***@" in err + out and urlsplit_password(pg_url) not in err + out
    code, out, _ = run("--db", pg_url, "probe", "add", "px", "--operator", "Op")
    assert code == 0
    code, out, _ = run("--db", pg_url, "probe", "list", "--format", "json")
    assert code == 0 and json.loads(out)["probes"][0]["probe_id"] == "px"
    assert run("--db", pg_url, "report", "--format", "json")[0] == 0
    assert run("--db", pg_url, "token", "list")[0] == 0
    assert run("--db", pg_url, "influx", "status")[0] == 0

    lite = tmp_path / "old.sqlite3"
    store = open_store(StorageConfig(path=str(lite)))
    try:
        fill(store, dataset()[:40])
    finally:
        store.close()
    target = pg_cluster.url(pg_cluster.create_database())
    code, out, err = run("--db", str(lite), "migrate", "--to", target, "--page", "7")
    assert code == 0, err
    assert "results: 40 of 40 row(s) (40 copied now)" in out
    assert "report: identical from both stores" in out
    code, out, err = run("--db", str(lite), "migrate", "--to", target)
    assert code == 0 and "results: 40 of 40 row(s) (0 copied now)" in out, err
    code, _, err = run("--db", str(lite), "migrate", "--to", str(lite))
    assert code == 2 and "names the store being copied" in err


def urlsplit_password(url: str) -> str:
    from urllib.parse import unquote, urlsplit

    return unquote(urlsplit(url).password or "")


def test_collector_survives_its_connections_being_cut(tmp_path: Path, pg_url: str,
                                                      pg_cluster: Any) -> None:
    """A PostgreSQL restart or failover drops every connection: the pool replaces a dead
    one before handing it out, so the next requests simply work."""
    storage = StorageConfig(backend="postgresql", url=pg_url, pool_size=2)
    with running_collector(tmp_path, _config(storage)) as c:
        token = c.add_probe("p1", LINE)
        url = c.url + "/api/v1/results"
        doc = json.loads(canonical_json(session("p1")))
        assert post_json(url, doc, token)[0] == 201
        cut = pg_cluster.psql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                              "WHERE application_name = 'bbprobe-collector'")
        assert int(cut.strip()) >= 1
        for hour in range(3):
            doc = json.loads(canonical_json(session(
                "p1", started_at=f"2026-11-21T1{hour}:00:00.000000Z")))
            assert post_json(url, doc, token)[0] == 201
        assert request("GET", c.url + "/api/v1/report")[1]["sessions"] == 4
