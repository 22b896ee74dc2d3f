"""A report's coverage from the day rollup's sessions per UTC hour (day_facts.session_hours,
``ReportStore.coverage_hours``): the same counts as ``hourly`` (every session row) for
whole days, partial days, days whose hours are not known (NULL: rows from before the
column), invalid sessions included and one IP family; kept right by ingest, by a deleted
result's rebuilt day and by the refusal migration's rebuilt days; and the compliance
report identical to the one computed from ``hourly``, on both backends, before and after
an older database is migrated."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from contextlib import closing
from dataclasses import replace
from typing import Any

import psycopg
import pytest

from agent.schema import SessionResult, utc_now
from collector.compliance import rollup, targets
from collector.compliance.evaluate import coverage_of, evaluate
from collector.compliance.facts import of_result
from collector.config import StorageConfig
from collector.fleet.probes import register_probe
from collector.lines import LineMetadata
from collector.reports import service
from collector.reports.text import report_dict
from collector.scope import Scope
from collector.storage.sql import refusals
from collector.storage.sql.backends import open_store
from collector.storage.store import Store
from tests.collector.test_refused import _campaign as refusal_campaign
from tests.collector.test_refused import as_old_agent, store_as_older_collector
from tests.factories import attempt, day_rollups, session, store_result

TABLE = targets.load("")
PROBES = ("p1", "p2", "p3")


def _campaign() -> list[SessionResult]:
    """Three probes over three UTC days: several sessions in some hours, none in others,
    invalid ones, both IP families."""
    out = []
    for p, probe in enumerate(PROBES):
        for day in ("01", "02", "03"):
            for hour in range(p, 24, 2 + p):
                for minute in (("05", "35") if hour % 5 == 0 else ("20",)):
                    k = len(out)
                    result = session(
                        probe, started_at=f"2026-03-{day}T{hour:02d}:{minute}:00.000000Z",
                        rtts=[10.0 + k % 7, 12.5],
                        transfers=[attempt("download", bps=(30 + k % 11) * 1e6),
                                   attempt("upload", bps=(3 + k % 4) * 1e6)],
                        invalid=["wifi"] if k % 7 == 3 else [])
                    out.append(replace(result,
                                       address_family="ipv6" if k % 4 == 0 else "ipv4",
                                       address_family_requested="both"))
    return out


@pytest.fixture
def filled(store: Store) -> Store:
    for name in PROBES:
        register_probe(store, name, LineMetadata())
    for result in _campaign():
        store_result(store, result)
    return store


def _from_hourly(store: Store, probes: Sequence[str] | None, since: str | None,
                 until: str | None, include_invalid: bool = False,
                 family: str | None = None) -> list[tuple[str, int]]:
    """The coverage's counts as service.compliance read them before: every session row."""
    return [(h.hour, h.sessions) for h in store.hourly(
        probes, since, until, include_invalid, family=family) if h.sessions]


SCOPES = [
    (None, None, None),                                                    # open
    (None, "2026-03-02T00:00:00.000000Z", "2026-03-04T00:00:00.000000Z"),  # whole days
    (None, "2026-03-01T13:30:00.000000Z", "2026-03-03T07:00:00.000000Z"),  # partial ends
    (("p2", "p3"), "2026-03-02T04:00:00.000000Z", None),                   # named, partial
    (None, "2026-03-02T03:00:00.000000Z", "2026-03-02T17:00:00.000000Z"),  # inside a day
    (("p1",), None, "2026-03-02T12:00:00.000000Z"),                        # open start
]


def _assert_same_counts(store: Store) -> None:
    for probes, since, until in SCOPES:
        names = list(probes) if probes is not None else None
        for include_invalid in (False, True):
            assert store.coverage_hours(names, since, until, include_invalid) == \
                _from_hourly(store, names, since, until, include_invalid), (
                    probes, since, until, include_invalid)
        for family in ("ipv4", "ipv6"):
            assert store.coverage_hours(names, since, until, family=family) == \
                _from_hourly(store, names, since, until, family=family), (
                    probes, since, until, family)


def _run(store: Store, sql: str, params: Sequence[Any] = ()) -> None:
    store._transaction(lambda tx: tx.run(sql, params))  # type: ignore[attr-defined]


def test_coverage_hours_equal_the_session_rows_counts(filled: Store) -> None:
    """Every scope, with and without invalid sessions, each family: hourly's counts."""
    _assert_same_counts(filled)
    # Not vacuous: hours with two sessions, hours with none, invalid ones left out.
    counts = dict(filled.coverage_hours())
    assert counts["2026-03-01T00"] == 2 and "2026-03-01T03" not in counts
    assert sum(counts.values()) == sum(r.valid for r in _campaign())


def test_whole_days_are_read_from_the_day_rollup(filled: Store) -> None:
    """Each day row holds its valid sessions per hour, and a whole day's coverage is read
    from it: a day row altered on purpose shows through (its session rows are not read),
    while a partial day at the scope's end is read from its session rows."""
    p1 = {d.day: rollup.hour_counts(d.session_hours) for d in day_rollups(filled, ["p1"])}
    want = [0] * 24
    for r in _campaign():
        if r.probe_id == "p1" and r.valid and r.started_at.startswith("2026-03-02"):
            want[int(r.started_at[11:13])] += 1
    assert p1["2026-03-02"] == want
    _run(filled, "UPDATE day_facts SET session_hours = ? WHERE probe_name = 'p1' "
         "AND day = '2026-03-02'", (",".join(["0"] * 23 + ["7"]),))
    got = dict(filled.coverage_hours(["p1"], "2026-03-02T00:00:00.000000Z",
                                     "2026-03-03T00:00:00.000000Z"))
    assert got == {"2026-03-02T23": 7}
    partial = filled.coverage_hours(["p1"], "2026-03-02T00:00:00.000000Z",
                                    "2026-03-02T23:00:00.000000Z")
    assert partial == _from_hourly(filled, ["p1"], "2026-03-02T00:00:00.000000Z",
                                   "2026-03-02T23:00:00.000000Z")


def test_days_not_known_are_read_from_their_session_rows(filled: Store) -> None:
    """Rows from before the column (NULL), or holding what is not 24 counts, runs of them
    and single ones: their days' session rows are read, and every count is hourly's; a
    session ingested into such a day leaves it not known (its earlier hours are not in
    the row); a new day's row knows its hours."""
    _run(filled, "UPDATE day_facts SET session_hours = NULL WHERE probe_name = 'p2' "
         "OR (probe_name = 'p1' AND day = '2026-03-02')")
    _run(filled, "UPDATE day_facts SET session_hours = '1,2' WHERE probe_name = 'p3' "
         "AND day = '2026-03-01'")
    _assert_same_counts(filled)
    store_result(filled, session("p2", started_at="2026-03-02T05:50:00.000000Z"))
    store_result(filled, session("p2", started_at="2026-03-05T05:50:00.000000Z"))
    hours = {d.day: d.session_hours for d in day_rollups(filled, ["p2"])}
    assert hours["2026-03-02"] is None
    assert rollup.hour_counts(hours["2026-03-05"]) == [0] * 5 + [1] + [0] * 18
    _assert_same_counts(filled)


def test_a_deleted_result_rebuilds_its_days_hours(filled: Store) -> None:
    """A result deleted from a day not known (NULL) and from a known one: each day is
    rebuilt from the sessions left, its hours known again, the counts hourly's."""
    _run(filled, "UPDATE day_facts SET session_hours = NULL WHERE probe_name = 'p1'")
    p1 = [r for r in _campaign() if r.probe_id == "p1" and r.valid]
    stored = {(f.probe_id, f.started_at): f.result_id for f in filled.facts()}
    for gone in (p1[0], next(r for r in _campaign() if r.probe_id == "p2" and r.valid)):
        assert filled.delete_result(stored[gone.probe_id, gone.started_at], "test",
                                    utc_now(), "tester")
        day = next(d for d in day_rollups(filled, [gone.probe_id])
                   if d.day == gone.started_at[:10])
        assert rollup.hour_counts(day.session_hours) is not None
        assert sum(rollup.hour_counts(day.session_hours) or ()) == day.sessions
    assert [d.session_hours is None for d in day_rollups(filled, ["p1"])] == [
        False, True, True]
    _assert_same_counts(filled)


def _old_report(store: Store, where: Scope, include_invalid: bool = False) -> str:
    """The compliance report as computed before coverage_hours: the coverage from
    ``hourly`` (every session row), as JSON."""
    report = evaluate(service.observations(store, where, include_invalid), TABLE)
    hours = store.hourly(list(where.probes) if where.probes is not None else None,
                         where.since, where.until, include_invalid, family=where.family)
    report = replace(report, coverage=coverage_of([(h.hour, h.sessions) for h in hours],
                                                  service.COVERAGE_TIMEZONE))
    return json.dumps(report_dict(report, where), sort_keys=True)


def _report(store: Store, where: Scope, include_invalid: bool = False) -> str:
    return json.dumps(report_dict(service.compliance(store, where, TABLE, include_invalid),
                                  where), sort_keys=True)


WHERES = [Scope(None, None, None),
          Scope(None, "2026-03-01T13:30:00.000000Z", "2026-03-03T07:00:00.000000Z"),
          Scope(("p1", "p3"), "2026-03-02T00:00:00.000000Z", "2026-03-04T00:00:00.000000Z"),
          Scope(None, None, None, "ipv6")]


def test_compliance_report_is_the_one_from_hourly(filled: Store) -> None:
    """report_dict's JSON, coverage included, identical to the old computation's, with
    rows known and not known."""
    for where in WHERES:
        for include_invalid in (False, True):
            assert _report(filled, where, include_invalid) == _old_report(
                filled, where, include_invalid)
    assert json.loads(_report(filled, WHERES[0]))["coverage"]["sessions"] == sum(
        r.valid for r in _campaign())
    _run(filled, "UPDATE day_facts SET session_hours = NULL WHERE day = '2026-03-02'")
    for where in WHERES:
        assert _report(filled, where) == _old_report(filled, where)
    # The report's coverage is the rollup's: a day row altered on purpose shows.
    _run(filled, "UPDATE day_facts SET session_hours = ? WHERE day = '2026-03-03'",
         (",".join(["0"] * 24),))
    assert json.loads(_report(filled, WHERES[0]))["coverage"]["sessions"] < json.loads(
        _old_report(filled, WHERES[0]))["coverage"]["sessions"]


def _to_schema_before_hours(storage: StorageConfig, version: int | None = None) -> None:
    """The database as a collector before session_hours left it: the column gone and
    the schema version the one before it (or ``version``: earlier, to run the later
    migrations again)."""
    if storage.backend == "sqlite":
        from collector.storage.sql.sqlite_migrations import MIGRATIONS as LITE

        with closing(sqlite3.connect(storage.path)) as db:
            db.execute("ALTER TABLE day_facts DROP COLUMN session_hours")
            db.execute(f"PRAGMA user_version = {len(LITE) - 1 if version is None else version}")
            db.commit()
        return
    from collector.storage.sql.postgres_migrations import MIGRATIONS as PG

    with psycopg.connect(storage.url, autocommit=True) as conn:
        conn.execute("ALTER TABLE day_facts DROP COLUMN session_hours")
        conn.execute("UPDATE bbprobe_schema SET version = %s",
                     (len(PG) - 1 if version is None else version,))


def test_an_older_database_migrates_and_reports_the_same(storage: StorageConfig) -> None:
    """A database from before the column: migrated on open, its day rows not known
    (NULL), its reports the same to the last character; ingest after the migration
    keeps them so."""
    store = open_store(storage)
    try:
        for name in PROBES:
            register_probe(store, name, LineMetadata())
        for result in _campaign():
            store_result(store, result)
        before = [_report(store, where) for where in WHERES]
        assert before == [_old_report(store, where) for where in WHERES]
    finally:
        store.close()
    _to_schema_before_hours(storage)
    store = open_store(storage)
    try:
        assert {d.session_hours for d in day_rollups(store)} == {None}
        assert [_report(store, where) for where in WHERES] == before
        _assert_same_counts(store)
        store_result(store, session("p3", started_at="2026-03-04T09:00:00.000000Z"))
        assert [d.session_hours is None for d in day_rollups(store, ["p3"])] == [
            True, True, True, False]
        _assert_same_counts(store)
    finally:
        store.close()


def test_the_refusal_migration_before_the_column_rebuilds_days_all_the_same(
        storage: StorageConfig) -> None:
    """Sessions stored by a collector before refusals were told apart, in a database
    from before the column too: the refusal migration rebuilds their days without the
    column (it does not exist yet), the next migration adds it not known, and the
    coverage is hourly's; a result deleted afterwards makes its day known again."""
    results = [as_old_agent(r) for r in refusal_campaign()]
    store = open_store(storage)
    try:
        for name in ("p1", "p2"):
            register_probe(store, name, LineMetadata())
        for r in results:
            store_as_older_collector(store, r)
    finally:
        store.close()
    if storage.backend == "sqlite":
        from collector.storage.sql.sqlite_migrations import MIGRATIONS as LITE

        rewound = LITE.index(refusals.reclassify)
    else:
        from collector.storage.sql.postgres_migrations import MIGRATIONS as PG

        rewound = PG.index(refusals.reclassify)
    _to_schema_before_hours(storage, rewound)
    store = open_store(storage)
    try:
        reclassified = store.dump("refusal_reclassifications", None, 10_000)
        assert reclassified  # days were rebuilt by the migration
        assert {d.session_hours for d in day_rollups(store)} == {None}
        _assert_same_counts(store)
        gone = next(r for r in results if of_result(r, r.started_at).refused_attempts)
        assert store.delete_result(gone.result_id, "test", utc_now(), "tester")
        day = next(d for d in day_rollups(store, [gone.probe_id])
                   if d.day == gone.started_at[:10])
        assert sum(rollup.hour_counts(day.session_hours) or [-1]) == day.sessions
        _assert_same_counts(store)
    finally:
        store.close()


def test_add_session_counts_valid_sessions_by_hour() -> None:
    """The rollup's arithmetic: a valid session adds one to its UTC hour; an invalid one
    nothing; a day not known stays not known, and a start naming no hour makes it so."""
    day = rollup.DayRollup("p1", "2026-03-01")
    for started, invalid in (("2026-03-01T23:59:59.000000Z", []),
                             ("2026-03-01T00:00:00.000000Z", []),
                             ("2026-03-01T23:10:00.000000Z", []),
                             ("2026-03-01T05:00:00.000000Z", ["wifi"])):
        day = rollup.add_session(day, of_result(session(started_at=started, invalid=invalid),
                                                started))
    assert rollup.hour_counts(day.session_hours) == [1] + [0] * 22 + [2]
    unknown = rollup.add_session(replace(day, session_hours=None),
                                 of_result(session(), "2026-03-01T10:00:00.000000Z"))
    assert unknown.session_hours is None and unknown.sessions == day.sessions + 1
    odd = rollup.add_session(day, of_result(session(), "2026-03-01 10:00:00"))
    assert odd.session_hours is None
    assert rollup.hour_counts("1,2") is None and rollup.hour_counts(None) is None
