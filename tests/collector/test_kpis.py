"""The KPIs of delibera 156/23/CONS: jitter from the same ping train (its
definition, the report judged or informational, the migration that backfills it on both
backends), the offer's three declared speeds on the line and in the certificate, FWA and
the other access technologies, and reports broken down by region, offer and semester."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from agent.spec import CAMPAIGN_RULES as RULES
from collector.cli.main import main
from collector.compliance import targets as targets_mod
from collector.compliance.certify import certify
from collector.compliance.evaluate import evaluate, observe
from collector.compliance.facts import jitter_terms, of_result
from collector.config import StorageConfig
from collector.errors import Unacceptable
from collector.fleet.probes import line_metadata, register_probe
from collector.lines import LineMetadata
from collector.server.testing import running_collector
from collector.storage.sql.backends import open_store
from collector.storage.store import Store
from tests.factories import attempt, session, store_result
from tests.httpclient import post_json, request

TABLE = targets_mod.load("")


def test_jitter_definition_and_scope_mean() -> None:
    """Mean |difference| of consecutive answered RTTs of one train; a scope's jitter is
    the sum over all pairs / the pairs, never a pair across two sessions."""
    # |14-10| + |12-14| ms, in whole nanoseconds (exact sums in any order)
    assert jitter_terms([10.0, 14.0, None, 12.0]) == (6_000_000, 2)
    assert jitter_terms([10.001, 10.0015]) == (500, 1)
    assert jitter_terms([10.0, None]) == (0, 0)
    assert jitter_terms([]) == (0, 0)
    a = session("p1", rtts=[10.0, 14.0, None, 12.0])   # 6 over 2 pairs
    b = session("p1", rtts=[100.0, 101.0])             # 1 over 1 pair; 88 apart from a
    report = evaluate(observe([a, b]), TABLE)
    (jitter,) = report.informational
    assert (jitter.id, jitter.samples, jitter.target, jitter.passed) == (
        "jitter_mean_ms", 3, None, None)
    assert jitter.observed == pytest.approx(7 / 3)
    assert "consecutive answered echoes" in report.method["jitter"]
    assert all(i.id != "jitter_mean_ms" for i in report.indicators)  # never judged here


def test_a_table_may_judge_jitter() -> None:
    """A targets table that gives jitter a target judges it (mean jitter 3 ms against 2 ms:
    fail) instead of listing it as information."""
    data = {"name": "t", "source": "s", "year": 2026, "regulation": ["156/23/CONS"],
            "indicator": [{"id": "jitter_mean_ms", "name": "Jitter", "measurable": True,
                           "comparison": "<=", "target": 2.0, "unit": "ms"}]}
    table = targets_mod.parse(data)
    report = evaluate(observe([session("p1", rtts=[10.0, 14.0, 12.0])]), table)
    (judged,) = report.indicators
    assert (judged.observed, judged.passed, report.verdict) == (3.0, False, "fail")
    assert report.informational == ()


def _campaign(bps: float, rtts: list[float | None]) -> list[Any]:
    from datetime import UTC, datetime, timedelta

    from agent.schema import format_utc

    start = datetime(2026, 3, 2, 0, 1, tzinfo=UTC)
    return [session("p1", started_at=format_utc(start + timedelta(minutes=15 * i)),
                    rtts=rtts, transfers=[attempt("download", bps=bps),
                                          attempt("upload", bps=bps / 10)])
            for i in range(96)]


def test_certificate_shows_jitter_and_the_declared_speeds_without_judging_them() -> None:
    """The certificate shows mean jitter, the share of sessions at the declared normal speed and
    p95 as information (no breach either way); the verdict rests on the contractual minimum
    alone, and undeclared speeds are not shown."""
    line = LineMetadata(download_min_kbps=20_000.0, download_normal_kbps=60_000.0,
                        download_nominal_kbps=100_000.0)
    facts = [of_result(r, r.started_at) for r in _campaign(50e6, [10.0, 12.0, 11.0])]
    cert = certify("p1", line, facts, RULES["96in24h"], "UTC")
    checks = {c.id: c for c in cert.checks}
    assert checks["jitter_mean_ms"].observed == pytest.approx(1.5)
    assert checks["download_normal_share"].observed == 0.0  # 50 < 60 Mbit/s every time
    assert checks["download_p95_kbps"].observed == pytest.approx(50_000.0)
    for key in ("jitter_mean_ms", "download_normal_share", "download_p95_kbps"):
        assert checks[key].informational and checks[key].breach is None
    # The minimum is met: the verdict rests on it alone (no documented rule for the rest).
    assert cert.verdict == "no_breach"
    assert "upload_normal_share" not in checks  # not declared, not shown


def test_line_metadata_is_checked() -> None:
    """Line metadata is normalised (technology in capitals, speeds as floats) and each bad field
    is refused naming it: an unknown technology, a nominal speed below the normal one,
    negative, non-finite, boolean or huge numbers, text with control characters, an unknown
    field; a blank region is none."""
    line = line_metadata({"technology": "fwa", "download_min_kbps": 10_000,
                                  "download_normal_kbps": 30_000})
    assert line.technology == "FWA" and line.download_normal_kbps == 30_000.0
    with pytest.raises(Unacceptable, match="technology: expected one of ADSL, VDSL"):
        line_metadata({"technology": "carrier pigeon"})
    with pytest.raises(Unacceptable, match="download_nominal_kbps: 50000 is below "
                                           "download_normal_kbps"):
        line_metadata({"download_normal_kbps": 60_000,
                               "download_nominal_kbps": 50_000})
    with pytest.raises(Unacceptable, match="upload_min_kbps: expected a number"):
        line_metadata({"upload_min_kbps": -1})
    with pytest.raises(Unacceptable, match="colour: unknown field"):
        line_metadata({"colour": "red"})
    for bad in (float("nan"), float("inf"), True, 10**400):
        with pytest.raises(Unacceptable, match="download_min_kbps: expected a number"):
            line_metadata({"download_min_kbps": bad})
    with pytest.raises(Unacceptable, match="region: expected text of at most 200 printable"):
        line_metadata({"region": "Lazio\n=cmd"})
    assert line_metadata({"region": "  "}).region is None
    # A fleet selector finds the lines as they are stored.
    from collector.fleet.rules import selector

    assert selector({"technology": "fwa"}).technology == "FWA"


def test_probe_set_and_fwa_filter(tmp_path: Path) -> None:
    """`probe add` and `probe set` check the line (technology, speeds in order) on the SQLite
    file `--db` names; a line stored before those checks can still have another field
    changed; any spelling of FWA selects the FWA lines in a report."""
    db = str(tmp_path / "c.sqlite3")
    run = CliRunner().invoke
    assert run(main, ["--db", db, "probe", "add", "p1", "--technology", "fwa",
                      "--region", "Lazio"]).exit_code == 0
    assert run(main, ["--db", db, "probe", "add", "p2", "--technology", "FTTH"]).exit_code == 0
    bad = run(main, ["--db", db, "probe", "add", "p3", "--technology", "5G"])
    assert bad.exit_code == 1 and "expected one of" in bad.output  # Unacceptable
    done = run(main, ["--db", db, "probe", "set", "p1", "--download-normal-kbps", "30000",
                      "--download-min-kbps", "10000"])
    assert done.exit_code == 0, done.output
    worse = run(main, ["--db", db, "probe", "set", "p1", "--download-min-kbps", "40000"])
    assert worse.exit_code == 1 and "below download_min_kbps" in worse.output
    assert run(main, ["--db", db, "probe", "set", "nobody", "--region", "X"]).exit_code == 2
    # A line stored before the checks (a technology outside the list, speeds out of
    # order) can still have another field changed.
    import sqlite3

    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE probes SET technology = 'Fibra', upload_min_kbps = 9000, "
                     "upload_nominal_kbps = 1000 WHERE name = 'p2'")
    legacy = run(main, ["--db", db, "probe", "set", "p2", "--region", "Sicilia"])
    assert legacy.exit_code == 0, legacy.output
    listed = json.loads(run(main, ["--db", db, "probe", "list", "--format",
                                   "json"]).output)["probes"]
    p1 = next(p for p in listed if p["probe_id"] == "p1")
    assert (p1["technology"], p1["download_normal_kbps"], p1["download_min_kbps"],
            p1["region"]) == ("FWA", 30_000.0, 10_000.0, "Lazio")
    store = open_store(StorageConfig(path=db))
    try:
        for probe in ("p1", "p2"):
            store_result(store, session(probe))
    finally:
        store.close()
    # Any spelling finds the FWA lines.
    report = json.loads(run(main, ["--db", db, "report", "--technology", "Fwa",
                                   "--format", "json"]).output)
    assert report["scope"]["probes"] == ["p1"] and report["sessions"] == 1


def _two_regions(store: Store) -> None:
    for name, region, offer in (("rm-1", "Lazio", "Fibra"), ("rm-2", "Lazio", "Rame"),
                                ("mi-1", "Lombardia", "Fibra")):
        register_probe(store, name, LineMetadata(region=region, offer=offer))
    for name, day, bps in (("rm-1", "2026-03-02", 80e6), ("rm-2", "2026-03-02", 20e6),
                           ("rm-1", "2026-09-01", 70e6), ("mi-1", "2026-09-01", 90e6)):
        store_result(store, session(name, started_at=f"{day}T10:00:00.000000Z",
                                    transfers=[attempt("download", bps=bps),
                                               attempt("upload", bps=bps / 10)]))


def test_reports_by_region_and_semester(tmp_path: Path) -> None:
    """--by region --by semester: one report per region and calendar semester, each the
    report of that group's probes over that half year (MisuraInternet's publication)."""
    db = tmp_path / "c.sqlite3"
    store = open_store(StorageConfig(path=str(db)))
    try:
        _two_regions(store)
    finally:
        store.close()
    run = CliRunner().invoke
    out = run(main, ["--db", str(db), "report", "--period", "2026", "--by", "region",
                     "--by", "semester", "--format", "json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    got = {(g["group"]["region"], g["group"]["semester"]): g["report"]
           for g in doc["groups"]}
    # Each group's report carries its own scope: its probes, its half year.
    assert got[("Lazio", "2026-H2")]["scope"] == {
        "probes": ["rm-1", "rm-2"], "since": "2026-07-01T00:00:00.000000Z",
        "until": "2027-01-01T00:00:00.000000Z", **(
            {"family": None} if "family" in got[("Lazio", "2026-H2")]["scope"] else {})}
    assert set(got) == {("Lazio", "2026-H1"), ("Lazio", "2026-H2"),
                        ("Lombardia", "2026-H1"), ("Lombardia", "2026-H2")}
    assert got[("Lazio", "2026-H1")]["sessions"] == 2
    assert got[("Lombardia", "2026-H1")]["sessions"] == 0
    p95 = {i["id"]: i["observed"] for i in got[("Lazio", "2026-H2")]["indicators"]}
    assert p95["download_p95_kbps"] == pytest.approx(70_000.0)
    text = run(main, ["--db", str(db), "report", "--period", "2026-H1", "--by", "offer"])
    assert text.exit_code == 0 and "Breakdown by offer" in text.output
    assert "Fibra" in text.output and "Rame" in text.output and "jitter" in text.output
    csv = run(main, ["--db", str(db), "report", "--period", "2026", "--by", "offer",
                     "--format", "csv"]).output.splitlines()
    assert csv[0].startswith("offer,id,name,") and all(
        line.startswith(("Fibra,", "Rame,")) for line in csv[1:])
    open_ended = run(main, ["--db", str(db), "report", "--by", "semester"])
    assert open_ended.exit_code == 2 and "give a period" in open_ended.output
    customers = run(main, ["--db", str(db), "report", "--period", "2026", "--by", "region",
                           "--include-customer"])
    assert customers.exit_code == 2 and "customer tests have no line" in customers.output


def test_breakdown_over_the_api(tmp_path: Path) -> None:
    """report?by=region gives one group per region in JSON and CSV; an unknown or unsupported
    grouping, or by with HTML, is a 400; a probe added over the API with speeds out of order
    is a 422 naming the field."""
    with running_collector(tmp_path) as c:
        store = c.open_store()
        try:
            _two_regions(store)
        finally:
            store.close()
        status, doc, _ = request("GET", c.url + "/api/v1/report?period=2026&by=region")
        assert status == 200 and [g["group"] for g in doc["groups"]] == [
            {"region": "Lazio"}, {"region": "Lombardia"}]
        status, body, _ = request("GET", c.url + "/api/v1/report?period=2026&by=region"
                                  "&format=csv", raw=True)
        assert status == 200 and body.decode().startswith("region,id,")
        assert request("GET", c.url + "/api/v1/report?by=colour")[0] == 400
        assert request("GET", c.url + "/api/v1/report?by=semester")[0] == 400
        assert request("GET", c.url + "/api/v1/report?by=region&format=html")[0] == 400
        admin = c.add_token("admin", "admin")
        status, reply = post_json(c.url + "/api/v1/probes", {
            "probe_id": "fwa-1", "technology": "fwa", "download_min_kbps": 10000,
            "download_normal_kbps": 5000}, admin)
        assert status == 422 and reply["field"] == "download_normal_kbps"


def test_jitter_backfill_migration(storage: StorageConfig) -> None:
    """Sessions stored before the jitter columns existed get their terms from the raw
    RTTs kept in the facts, and their days' sums, on either backend: the report after
    the migration equals the one computed from the bodies."""
    from collector.compliance.evaluate import Observations

    results = [session("p1", started_at=f"2026-05-0{d}T{h:02d}:00:00.000000Z",
                       rtts=[10.0 + h, 12.0, None if h % 3 else 9.0, 11.0 + d],
                       result_id=f"00000000-0000-4000-8000-0000000{d}{h:04d}")
               for d in (1, 2) for h in range(0, 24, 4)]
    store = open_store(storage)
    try:
        register_probe(store, "p1", LineMetadata())
        for r in results:
            store_result(store, r)
        want: Observations = store.observations(["p1"], None, None)
        assert want.jitter_pairs > 0
    finally:
        store.close()
    _migrate_jitter_again(storage)
    store = open_store(storage)
    try:
        got = store.observations(["p1"], None, None)
        partial = store.observations(["p1"], "2026-05-01T06:00:00.000000Z", None)
    finally:
        store.close()
    # Integers: the same to the last nanosecond, whichever backend summed them.
    assert (got.jitter_pairs, got.jitter_sum_ns) == (want.jitter_pairs, want.jitter_sum_ns)
    by_bodies = observe([r for r in results if r.started_at >= "2026-05-01T06"])
    assert (partial.jitter_pairs, partial.jitter_sum_ns) == (
        by_bodies.jitter_pairs, by_bodies.jitter_sum_ns)


def _migrate_jitter_again(storage: StorageConfig) -> None:
    """Take the database back to before the jitter migration (terms zeroed, or on
    PostgreSQL the columns dropped) and run that migration's step again."""
    if storage.backend == "sqlite":
        import sqlite3

        from collector.storage.sql.base import Tx
        from collector.storage.sql.sqlite import DIALECT
        from collector.storage.sql.sqlite_backfill import jitter_from_rtts

        with sqlite3.connect(storage.path) as db:
            db.execute("UPDATE session_facts SET jitter_sum_ns = 0, jitter_pairs = 0")
            db.execute("UPDATE day_facts SET jitter_sum_ns = 0, jitter_pairs = 0")
            jitter_from_rtts(Tx(db, DIALECT))
        return
    import psycopg

    from collector.storage.sql.postgres_migrations import MIGRATIONS, ddl

    step = next(m for m in MIGRATIONS if isinstance(m, str) and "jitter_sum_ns" in m)
    with psycopg.connect(storage.url, autocommit=True) as conn, conn.transaction():
        for table in ("session_facts", "day_facts"):
            conn.execute(f"ALTER TABLE {table} DROP COLUMN jitter_sum_ns, "
                         "DROP COLUMN jitter_pairs")
        conn.execute("ALTER TABLE probes DROP COLUMN download_normal_kbps, "
                     "DROP COLUMN upload_normal_kbps")
        for statement in ddl(step).split(";"):
            if statement.strip():
                conn.execute(statement.encode())
