"""Per-session facts in the store (each backend): the scope evaluated from them equals the
evaluation of the decoded bodies; and an older SQLite file gets them by migration (that
test builds the file by hand, so it is about SQLite)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.schema import SessionResult
from collector.compliance import targets
from collector.compliance.evaluate import evaluate, observe
from collector.fleet.probes import register_probe
from collector.lines import LineMetadata
from collector.storage.sql.sqlite import SqliteStore
from collector.storage.sql.sqlite_migrations import MIGRATIONS
from collector.storage.store import Store
from tests.factories import attempt, session, store_result, version_1_database

ROOT = Path(__file__).resolve().parents[2]
TABLE = targets.load("")


def _mixed() -> list[SessionResult]:
    """Two probes, three hours; failed attempts, a lost ping, a session without pings."""
    out = []
    for i, hour in enumerate(("08", "09", "10")):
        for probe in ("p1", "p2"):
            out.append(session(
                probe, started_at=f"2026-03-02T{hour}:00:00.000000Z",
                rtts=[20.0 + i, None if probe == "p2" else 21.5, 19.0 + 2 * i],
                transfers=[attempt("download", ok=i != 1),
                           attempt("download", 0, 2, bps=(30 + 7 * i) * 1e6),
                           attempt("upload", bps=(3 + i) * 1e6)]))
    out.append(session("p1", started_at="2026-03-02T11:00:00.000000Z", rtts=[],
                       transfers=[attempt("upload", ok=False)]))
    # Flagged invalid by the agent: out of every figure unless asked for.
    out.append(session("p1", started_at="2026-03-02T12:00:00.000000Z", rtts=[500.0],
                       transfers=[attempt("download", bps=1e3)], invalid=["wifi"]))
    out.append(session("p2", started_at="2026-03-02T12:30:00.000000Z", rtts=[None],
                       invalid=["cpu_busy", "wifi"]))
    return out


@pytest.fixture
def store(store: Store) -> Store:
    """The shared fresh store (each backend) with probes p1 and p2 registered."""
    for name in ("p1", "p2"):
        register_probe(store, name, LineMetadata())
    return store


def _same_report(a, b) -> None:  # type: ignore[no-untyped-def]
    assert a.sessions == b.sessions
    assert (a.invalid_sessions, a.invalid_reasons, a.invalid_included) == (
        b.invalid_sessions, b.invalid_reasons, b.invalid_included)
    for x, y in zip(a.indicators, b.indicators, strict=True):
        assert (x.id, x.samples, x.passed) == (y.id, y.samples, y.passed)
        if y.observed is None:
            assert x.observed is None
        else:
            assert x.observed == pytest.approx(y.observed, rel=1e-12)


@pytest.mark.parametrize(("probes", "since", "until"), [
    (None, None, None),
    (["p2"], None, None),
    (["p1"], "2026-03-02T09:00:00.000000Z", "2026-03-02T11:00:00.000000Z"),
    (["nobody"], None, None),
])
def test_scope_from_facts_equals_scope_from_bodies(
        store: Store, probes: list[str] | None, since: str | None,
        until: str | None) -> None:
    """For any probes and time bounds, the report from the stored facts equals the one from the
    decoded bodies, without and with invalid sessions."""
    results = _mixed()
    for r in results:
        store_result(store, r)
    chosen = [r for r in results if (probes is None or r.probe_id in probes)
              and (since is None or r.started_at >= since)
              and (until is None or r.started_at < until)]
    expected = evaluate(observe(chosen), TABLE)
    got = evaluate(store.observations(probes, since, until), TABLE)
    _same_report(got, expected)
    assert got.sessions == sum(r.valid for r in chosen)
    everything = evaluate(store.observations(probes, since, until, include_invalid=True),
                          TABLE)
    _same_report(everything, evaluate(observe(chosen, include_invalid=True), TABLE))
    assert everything.sessions == len(chosen)


def test_invalid_sessions_are_counted_apart(store: Store) -> None:
    """By default the invalid sessions change no indicator and are reported with their
    reasons; included, their pings and downloads (one at 1 kbit/s) count."""
    for r in _mixed():
        store_result(store, r)
    report = evaluate(store.observations(), TABLE)
    assert (report.invalid_sessions, report.invalid_reasons) == (
        2, (("cpu_busy", 1), ("wifi", 2)))
    included = evaluate(store.observations(include_invalid=True), TABLE)
    by_id = {r.id: r for r in report.indicators}
    more = {r.id: r for r in included.indicators}
    assert more["download_p5_kbps"].samples == by_id["download_p5_kbps"].samples + 2
    assert more["download_p5_kbps"].observed < by_id["download_p5_kbps"].observed
    assert more["loss_ratio"].samples == by_id["loss_ratio"].samples + 2


def test_facts_round_trip_for_a_line(store: Store) -> None:
    """The facts read back for one probe carry every RTT (lost as None) and every
    attempt's speed in order, as the certificate lists them."""
    for r in _mixed():
        store_result(store, r)
    facts = store.facts(["p2"])
    assert [f.started_at[11:13] for f in facts] == ["08", "09", "10", "12"]
    assert (facts[-1].valid, facts[-1].invalid_codes) == (False, ("cpu_busy", "wifi"))
    assert facts[0].valid and facts[0].invalid_codes == ()
    assert facts[1].rtts_ms == (21.0, None, 21.0)
    assert facts[1].speeds("download") == (None, 37000.0)
    assert (facts[1].pings_sent, facts[1].pings_lost, facts[1].completed) == (3, 1, True)


def test_hourly_aggregates(store: Store) -> None:
    """Per-hour sums: sessions, pings, RTTs and successful speeds per direction."""
    for r in _mixed():
        store_result(store, r)
    rows = {row.hour: row for row in store.hourly()}
    nine = rows["2026-03-02T09"]
    assert (nine.sessions, nine.pings_sent, nine.pings_lost, nine.rtt_n) == (2, 6, 1, 5)
    assert nine.rtt_sum_ms == pytest.approx(21 + 21.5 + 21 + 21 + 21)
    assert (nine.download_n, nine.download_kbps_sum) == (2, 74000.0)
    assert rows["2026-03-02T11"].upload_n == 0
    assert "2026-03-02T12" not in rows  # only invalid sessions then
    assert store.hourly(include_invalid=True)[-1].sessions == 2


def test_version_1_database_gets_facts_by_migration(tmp_path: Path) -> None:
    """A database written before the facts tables existed is backfilled from the
    bodies at open, and evaluates as before."""
    path = tmp_path / "old.sqlite3"
    results = [r for r in _mixed() if r.probe_id == "p1" and r.valid]
    version_1_database(path, results)
    store = SqliteStore(path)
    assert store.schema_version == len(MIGRATIONS)
    _same_report(evaluate(store.observations(), TABLE), evaluate(observe(results), TABLE))
    assert json.loads(store._db.execute("SELECT rtts_ms FROM session_facts LIMIT 1")
                      .fetchone()[0])


@pytest.mark.parametrize(("since", "until"), [
    (None, None),
    ("2026-03-02T00:00:00.000000Z", "2026-03-05T00:00:00.000000Z"),  # whole days only
    ("2026-03-01T13:30:00.000000Z", "2026-03-05T07:00:00.000000Z"),  # partial at both ends
    ("2026-03-03T02:00:00.000000Z", None),
    (None, "2026-03-02T18:00:00.000000Z"),
    ("2026-03-04T01:00:00.000000Z", "2026-03-04T23:00:00.000000Z"),  # inside one day
])
def test_day_rollup_and_session_rows_agree(store: Store, since: str | None,
                                           until: str | None) -> None:
    """Whole days read from the day rollup, partial days from session rows: the report is
    the one computed from the decoded bodies, for any bounds."""
    from datetime import UTC, datetime, timedelta

    from agent.schema import format_utc

    results = []
    start = datetime(2026, 3, 1, 1, 0, tzinfo=UTC)
    for i in range(30):
        moment = format_utc(start + timedelta(hours=5 * i))
        results.append(session(
            "p1" if i % 3 else "p2", started_at=moment,
            rtts=[15.0 + i % 7, None if i % 4 == 0 else 16.5 + i % 3],
            transfers=[attempt("download", ok=i % 5 != 0),
                       attempt("download", 0, 2, bps=(20 + i) * 1e6),
                       attempt("upload", bps=(2 + i % 4) * 1e6)],
            invalid=["wifi"] if i % 9 == 4 else ()))
    for r in results:
        store_result(store, r)
    chosen = [r for r in results if (since is None or r.started_at >= since)
              and (until is None or r.started_at < until)]
    _same_report(evaluate(store.observations(None, since, until), TABLE),
                 evaluate(observe(chosen), TABLE))
