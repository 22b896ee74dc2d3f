"""PostgreSQL's monthly partitions (collector/storage/sql/partitions.py) and the analysts'
replica (storage.read_url), on a real PostgreSQL (tests/pg.py; skipped, saying why, where
none can run)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from agent.schema import utc_now
from collector.cli.main import main
from collector.compliance import targets
from collector.config import CollectorConfig, ConfigError, StorageConfig, parse
from collector.errors import InputError, StoreError, StoreFault, StoreUnavailable
from collector.lines import LineMetadata
from collector.reports import service
from collector.reports.text import report_dict
from collector.scope import resolve_scope
from collector.server.testing import running_collector
from collector.storage.model import NewResult
from collector.storage.sql import partition_migration as migration
from collector.storage.sql import partitions, postgres
from collector.storage.sql.backends import open_store
from collector.storage.sql.base import Tx
from collector.storage.sql.postgres import PostgresStore
from collector.storage.sql.postgres_migrations import MIGRATIONS
from tests.factories import canonical_json, session, store_result
from tests.httpclient import post_json, request

LINE = LineMetadata(operator="OpX", offer="Fibra 1G", region="Lazio", technology="FTTH",
                    download_min_kbps=60_000.0)
# Three months before the partitions a store creates ahead of today.
MONTHS = ("2026-06", "2026-07", "2026-08")
PROBES = ("p1", "p2")


def _open(url: str, outbox: bool = False) -> PostgresStore:
    store = open_store(StorageConfig(backend="postgresql", url=url, pool_size=2),
                       outbox=outbox)
    assert isinstance(store, PostgresStore)
    return store


@contextmanager
def _pg(url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(url, autocommit=True) as conn:
        yield conn


def _count(url: str, table: str) -> int:
    with _pg(url) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert row is not None
    return int(row[0])


def _open_13(url: str) -> PostgresStore:
    """A store at schema 13 (before partitioning) that today's code can fill and read:
    with the one later column it writes and reads, day_facts.session_hours (migration
    15 adds it IF NOT EXISTS, so it runs over it unchanged)."""
    store = _open(url)
    with _pg(url) as conn:
        conn.execute("ALTER TABLE day_facts ADD COLUMN session_hours TEXT")
    return store


def _fill(store: PostgresStore) -> list[str]:
    """Sessions of two probes on three days of each month; their ids."""
    ids = []
    for probe in PROBES:
        store.add_probe(probe, "0" * 63 + probe[-1], "2026-01-01T00:00:00Z", LINE)
    for month in MONTHS:
        for day in ("03", "14", "28"):
            for probe in PROBES:
                result = session(probe, started_at=f"{month}-{day}T10:00:00.000000Z")
                store_result(store, result)
                ids.append(result.result_id)
    return ids


def _migrate_all(store: PostgresStore) -> list[migration.Step]:
    steps = []
    while (step := store.partitions_migrate_step()) is not None:
        steps.append(step)
        assert len(steps) < 100
    return steps


def _report(store: PostgresStore) -> dict[str, Any]:
    where = resolve_scope(None, "2026-06-01", "2026-09-01", known=store.probes)
    table = targets.load("")
    return report_dict(service.compliance(store, where, table), where)


def _readings(store: PostgresStore) -> tuple[Any, ...]:
    """What analysts read: every result, and the report over the three months."""
    rows = store.results(since="2026-01-01", until="2027-01-01")
    return tuple((r.result_id, r.body) for r in rows), _report(store)


def test_a_new_database_is_partitioned_and_ingest_lands_in_its_month(pg_url: str) -> None:
    store = _open(pg_url)
    try:
        listed = store.partition_months()
        months = [m.month for m in listed]
        # The current month and the next three, created at the first start; the default.
        assert len(months) == 5 and months[-1] == "default"
        assert all(m.attached for m in listed)
        ids = _fill(store)
        # Months before the ones created ahead wait in the default partition...
        assert _count(pg_url, "results_default") == len(ids)
        steps = _migrate_all(store)
        assert [(s.what, s.count) for s in steps] == [
            *((month, 6) for month in MONTHS), ("default", 0), ("switch", 3)]
        assert store.partitions_migrate_step() is None
        # ...then each month's rows are in its own, facts too; none in the default.
        for month in MONTHS:
            suffix = month.replace("-", "_")
            assert _count(pg_url, f"results_p{suffix}") == 6
            assert _count(pg_url, f"session_facts_p{suffix}") == 6
            assert _count(pg_url, f"transfer_facts_p{suffix}") == 12
        assert _count(pg_url, "results_default") == 0
        done = CliRunner().invoke(main, ["--db", pg_url, "partitions", "create-ahead",
                                         "--months", "2"])
        assert done.exit_code == 0 and "there already" in done.output, done.output
        # A session of a month that has its partition goes straight there.
        late = session("p1", started_at="2026-07-30T10:00:00.000000Z")
        store_result(store, late)
        assert _count(pg_url, "results_p2026_07") == 7
        assert _count(pg_url, "result_ids") == len(ids) + 1
        assert len(store.results(since="2026-06-01", until="2026-09-01")) == len(ids) + 1
        # A result's probe must exist, in a moved month, a month made ahead, and the
        # default partition alike (the key is the parent's: LIKE copies none).
        for started in ("2026-07-30T11:00:00.000000Z", utc_now(), "2031-01-01T00:00:00Z"):
            with pytest.raises(Exception, match=r"(?i)foreign key"):
                store_result(store, session("ghost", started_at=started))
        assert _count(pg_url, "result_ids") == len(ids) + 1
    finally:
        store.close()


def _item(result: Any, **changes: Any) -> NewResult:
    from collector.intake import ingest

    accepted = ingest.parse_body(canonical_json(result).encode())
    fields: dict[str, Any] = {
        "result_id": result.result_id, "probe_name": result.probe_id,
        "schema_version": result.schema_version, "started_at": accepted.started_at,
        "ended_at": accepted.ended_at, "received_at": "2026-12-01T00:00:00.000000Z",
        "body": accepted.body, "body_sha256": accepted.body_sha256, "facts": accepted.facts}
    return NewResult(**{**fields, **changes})


def test_result_ids_stay_unique_across_months(pg_url: str) -> None:
    """Exactly once: the same result again is a duplicate; another document under its
    id is a conflict even when it is dated in another month (another partition)."""
    store = _open(pg_url)
    try:
        store.add_probe("p1", "0" * 64, "2026-01-01T00:00:00Z", LINE)
        store.partitions_create_ahead(_at("2026-06-15"), 2)
        first = session("p1", started_at="2026-06-03T10:00:00.000000Z")
        assert store.insert_results([_item(first)])[0] == "stored"
        assert store.insert_results([_item(first)])[0] == "duplicate"
        other = session("p1", started_at="2026-08-03T10:00:00.000000Z",
                        result_id=first.result_id)
        assert store.insert_results([_item(other)]) == ["conflict"]
        assert _count(pg_url, "results") == 1 and _count(pg_url, "session_facts") == 1
        # Removed (audited), the id is free again: the probe may deliver it anew.
        assert store.delete_result(first.result_id, "test", "2026-12-01T00:00:00Z", "t")
        assert _count(pg_url, "result_ids") == 0
        assert store.insert_results([_item(other)]) == ["stored"]
        assert _count(pg_url, "results_p2026_08") == 1
    finally:
        store.close()


def _at(day: str) -> Any:
    from datetime import UTC, datetime

    return datetime.fromisoformat(day).replace(tzinfo=UTC)


def test_a_detached_month_leaves_every_read(pg_url: str) -> None:
    """...and the InfluxDB outbox (review 2, finding 4); a resend of one of its results
    is a duplicate (finding 3); a new result of it stays readable in the default."""
    store = _open(pg_url, outbox=True)
    try:
        ids = _fill(store)
        _migrate_all(store)
        assert store.outbox_size() == len(ids)
        store.outbox_dead_letter(ids[7], "test", "2026-12-01T00:00:00Z")  # July's second
        done = CliRunner().invoke(main, ["--db", pg_url, "partitions", "detach", "2026-07"])
        assert done.exit_code == 0 and "results_p2026_07" in done.output, done.output
        assert not store.partitions_detach("2026-07")  # detached already
        left = store.results(since="2026-01-01", until="2027-01-01")
        assert len(left) == len(ids) - 6
        assert not [r for r in left if r.started_at.startswith("2026-07")]
        assert store.result(ids[6]) is None  # the first of July's
        listed = {m.month: m.attached for m in store.partition_months()}
        assert listed["2026-07"] is False and listed["2026-06"] is True
        # Its bodies are kept in their table, to archive; not stored again if resent.
        assert _count(pg_url, "results_p2026_07") == 6
        # Its outbox entries and dead letters left with it: the sink leases the others.
        assert store.outbox_size() == len(ids) - 6 and store.outbox_dead_count() == 0
        leased = store.outbox_lease("me", 100, "2026-12-01T00:00:00Z", "2026-12-01T00:01:00Z")
        assert sorted(r[0] for r in leased) == sorted(ids[:6] + ids[12:])
        # An entry whose result no read reaches (a month detached by hand) is dropped
        # by the lease, not leased for ever.
        with _pg(pg_url) as conn:
            conn.execute("INSERT INTO influx_outbox (result_id, queued_at) VALUES "
                         "('gone', '2026-12-01T00:00:00Z')")
        again = store.outbox_lease("me", 100, "2026-12-01T00:00:00Z", "2026-12-01T00:01:00Z")
        assert sorted(r[0] for r in again) == sorted(ids[:6] + ids[12:])
        assert store.outbox_size() == len(ids) - 6
        # Sent again, as the probe first sent it or not: a duplicate (the stored body
        # is out of reach, its hash cannot be compared), never stored again.
        first = session("p1", started_at="2026-07-03T10:00:00.000000Z", result_id=ids[6])
        assert store.result(ids[6]) is None
        assert store.insert_results([_item(first)]) == ["duplicate"]
        other = session("p1", started_at="2026-07-03T10:00:00.000000Z", result_id=ids[6],
                        rtts=(20.0, 21.0))
        assert store.insert_results([_item(other)]) == ["duplicate"]
        assert _count(pg_url, "results") == len(ids) - 6
        # A new result of the month goes to the default partition, readable...
        late = session("p1", started_at="2026-07-21T10:00:00.000000Z")
        assert store.insert_results([_item(late)]) == ["stored"]
        assert store.result(late.result_id) is not None
        assert _count(pg_url, "results_default") == 1
        # ...and stays there: a month of its own is not made over a detached one.
        assert store.partitions_migrate_step() is None
    finally:
        store.close()


def test_an_older_database_moves_online_a_month_at_a_time(
        pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A database of schema 13 (unpartitioned) with rows in three months: migration 14
    only renames and attaches; then each `partitions migrate` step copies one month, the
    last one switches, and between steps every row reads back, the report is the same to
    the last digit, re-deliveries stay duplicates, and another document under an old id a
    conflict."""
    monkeypatch.setattr(postgres, "MIGRATIONS", MIGRATIONS[:13])
    old = _open_13(pg_url)
    try:
        ids = _fill(old)
        before = _readings(old)
        assert old.schema_version == 13
    finally:
        old.close()
    with _pg(pg_url) as conn:
        kind = conn.execute("SELECT relkind FROM pg_class WHERE relname = 'results'").fetchone()
    assert kind == ("r",)
    monkeypatch.setattr(postgres, "MIGRATIONS", MIGRATIONS)
    # A reader counting all along never sees a row missing or twice (each count a
    # statement of its own, in its own snapshot).
    counts: list[int] = []
    stop = threading.Event()

    def count() -> None:
        with _pg(pg_url) as reader:
            while not stop.is_set() or not counts:
                row = reader.execute("SELECT count(*) FROM results").fetchone()
                counts.append(int(row[0]) if row else -1)

    thread = threading.Thread(target=count)
    store = _open(pg_url)
    try:
        assert store.schema_version == len(MIGRATIONS)
        assert _count(pg_url, "results_default") == len(ids)
        assert _readings(store) == before
        old_one = session("p2", started_at="2026-08-28T10:00:00.000000Z",
                          result_id=ids[-1])
        other = session("p2", started_at="2026-12-02T10:00:00.000000Z", result_id=ids[-1],
                        rtts=(20.0, 21.0))
        thread.start()
        for month in MONTHS:
            # Not moved yet, an old result sent again is a duplicate; another document
            # under its id, dated in a month with a partition of its own, a conflict.
            assert store.insert_results([_item(old_one)]) == ["duplicate"]
            assert store.insert_results([_item(other)]) == ["conflict"]
            assert store.partitions_migrate_step() == migration.Step(month, 6)
            # Copied, not moved: every row is still read where it was, the copy unread.
            assert _count(pg_url, "results_default") == len(ids)
            assert _count(pg_url, f"results_p{month.replace('-', '_')}") == 6
            assert _readings(store) == before
        assert store.partitions_migrate_step() == migration.Step("default", 0)
        switch = store.partitions_migrate_step()
        assert switch is not None and (switch.what, switch.count) == ("switch", 3)
        assert _readings(store) == before
        stop.set()
        thread.join()
        assert counts and set(counts) == {len(ids)}
        assert store.partitions_migrate_step() is None
        assert _count(pg_url, "results_default") == 0
        with _pg(pg_url) as conn:
            assert conn.execute("SELECT to_regclass('results_premigration'), "
                                "to_regclass('partition_changes')").fetchone() == (None, None)
        assert _count(pg_url, "result_ids") == len(ids)
        assert store.insert_results([_item(old_one)]) == ["duplicate"]
        # The CLI says the same.
        done = CliRunner().invoke(main, ["--db", pg_url, "partitions", "list"])
        assert done.exit_code == 0, done.output
        assert "2026-06" in done.output and "default" in done.output
        done = CliRunner().invoke(main, ["--db", pg_url, "partitions", "migrate",
                                         "--months", "3"])
        assert done.exit_code == 0 and "nothing left" in done.output
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()
        store.close()


class _Writer(threading.Thread):
    """Ingest through the store API, as collectors do, while `partitions migrate` runs:
    late sessions of the months being moved (an agent's spool emptying), each delivered
    again once (a duplicate), and a session of this month."""

    def __init__(self, store: PostgresStore) -> None:
        super().__init__()
        self.store = store
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.tried: list[str] = []  # ids sent (possibly not committed yet)
        self.acked: list[str] = []  # ids the store said it stored
        self.errors: list[str] = []

    def run(self) -> None:
        n = 0
        while not self.stop.is_set() and n < 2000:
            month = MONTHS[n % len(MONTHS)]
            late = session("p1", started_at=f"{month}-2{n % 8}T{n // 60 % 24:02d}:{n % 60:02d}"
                                            ":00.000000Z")
            now = session("p2", started_at=f"2026-12-0{n % 7 + 1}T10:{n % 60:02d}:00.000000Z")
            with self.lock:
                self.tried += [late.result_id, now.result_id]
            try:
                got = self.store.insert_results([_item(late), _item(now)])
                again = self.store.insert_results([_item(late)])
            except Exception as exc:  # reported by the test
                self.errors.append(f"{type(exc).__name__}: {exc}")
                return
            if got != ["stored", "stored"] or again != ["duplicate"]:
                self.errors.append(f"{late.started_at}: {got} {again}")
                return
            with self.lock:
                self.acked += [late.result_id, now.result_id]
            n += 1

    def wait_for(self, count: int) -> None:
        """Until ``count`` more sessions are stored (or the writer failed)."""
        with self.lock:
            target = len(self.acked) + count
        while not self.errors and self.is_alive():
            with self.lock:
                if len(self.acked) >= target:
                    return
            self.stop.wait(0.01)


def test_migrate_never_stops_ingest_nor_hides_a_row(
        pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer (late deliveries of the months being moved, duplicates, this month's
    sessions) and a reader run through every step of `partitions migrate` on a database
    made partitioned from an unpartitioned one: no write fails, none is lost or stored
    twice, and every read sees every stored row once; a result deleted while its month
    is being copied stays deleted; and attaching the months scans neither them nor the
    old default partitions (PostgreSQL says, at DEBUG1, which tables it verifies)."""
    monkeypatch.setattr(postgres, "MIGRATIONS", MIGRATIONS[:13])
    old = _open_13(pg_url)
    try:
        ids = _fill(old)
    finally:
        old.close()
    monkeypatch.setattr(postgres, "MIGRATIONS", MIGRATIONS)
    monkeypatch.setattr(migration, "BATCH", 4)  # several copy transactions a month
    store = open_store(StorageConfig(backend="postgresql", url=pg_url, pool_size=4))
    assert isinstance(store, PostgresStore)
    writer = _Writer(store)
    stop = threading.Event()
    problems: list[str] = []
    reads = [0]

    def read() -> None:
        with _pg(pg_url) as reader:
            while not stop.is_set():
                with writer.lock:
                    acked = list(writer.acked)
                # One statement, one snapshot: the rows stored before it, all of them,
                # each once; no more than were sent by its end.
                row = reader.execute(
                    "SELECT count(*), count(DISTINCT result_id), count(*) FILTER (WHERE "
                    "result_id = ANY(%s)), count(*) FILTER (WHERE result_id = ANY(%s)) "
                    "FROM results", (kept, acked)).fetchone()
                with writer.lock:
                    tried = len(writer.tried)
                assert row is not None
                total, distinct, old_seen, acked_seen = row
                if not (total == distinct and old_seen == len(kept)
                        and acked_seen == len(acked)
                        and len(kept) + len(acked) <= total <= len(kept) + tried):
                    problems.append(f"read {row} with {len(kept)} old, {len(acked)} "
                                    f"acked, {tried} sent")
                reads[0] += 1

    reader = threading.Thread(target=read)
    try:
        # The first month copied, a result of it deleted (the copy must follow).
        assert store.partitions_migrate_step() == migration.Step(MONTHS[0], 6)
        assert store.delete_result(ids[0], "test", "2026-12-01T00:00:00Z", "t")
        kept = ids[1:]
        listed = {m.month: m for m in store.partition_months()}
        assert listed[MONTHS[0]].copying and not listed[MONTHS[0]].attached
        writer.start()
        reader.start()
        steps = []
        while True:
            writer.wait_for(3)
            step = store.partitions_migrate_step()
            if step is None:
                break
            steps.append(step)
        writer.wait_for(3)
        writer.stop.set()
        writer.join()
        stop.set()
        reader.join()
        assert not writer.errors, writer.errors
        assert not problems, problems[:3]
        assert reads[0] > 0
        # (A month's count includes the late sessions that reached it before its copy.)
        assert [s.what for s in steps] == [MONTHS[1], MONTHS[2], "default", "switch"]
        assert steps[0].count >= 6 and steps[1].count >= 6 and steps[-1].count == 3
        # Only the new, empty default partitions were scanned when attached: each
        # month's CHECK implied its range, and no old default was attached meanwhile.
        assert steps[-1].verified == tuple(f"{t}_default" for t in partitions.TABLES)
        with _pg(pg_url) as conn:
            stored = [r[0] for r in conn.execute(
                "SELECT result_id FROM results ORDER BY result_id").fetchall()]
            assert stored == sorted(kept + writer.acked)  # none lost, none twice
            registered = conn.execute("SELECT count(*) FROM result_ids").fetchone()
            assert registered == (len(stored),)
            facts = conn.execute("SELECT count(*) FROM session_facts").fetchone()
            assert facts == (len(stored),)
            assert conn.execute("SELECT to_regclass('results_premigration'), "
                                "to_regclass('partition_moves')").fetchone() == (None, None)
            unchecked = conn.execute("SELECT count(*) FROM pg_constraint WHERE "
                                     "conname ~ '_p2026_0[678]_result_fkey' AND "
                                     "convalidated").fetchone()
            assert unchecked == (6,)
        assert _count(pg_url, "results_default") == 0
        late = len(writer.acked[::2])  # each a late session, then this month's
        assert sum(_count(pg_url, f"results_p{m.replace('-', '_')}") for m in MONTHS) == \
            len(kept) + late
        assert store.result(ids[0]) is None
    finally:
        writer.stop.set()
        stop.set()
        for thread in (writer, reader):
            if thread.is_alive():
                thread.join()
        store.close()


def test_migrate_resumes_after_each_interruption(
        pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review 2, findings 1, 5 and 6. A plan that fails leaves nothing behind; a
    migration started but not planned (an older release stopped there) is planned when
    run again, its old rows included; a result deleted and delivered again dated in
    another month follows to that month; a crash between two drops of the cleanup is
    finished by the next run. Every row ends in its month, once."""
    monkeypatch.setattr(postgres, "MIGRATIONS", MIGRATIONS[:13])
    old = _open_13(pg_url)
    try:
        ids = _fill(old)
    finally:
        old.close()
    monkeypatch.setattr(postgres, "MIGRATIONS", MIGRATIONS)
    store = _open(pg_url)
    try:
        def broken(tx: Tx, today: Any) -> list[str]:
            raise RuntimeError("plan failed")

        with monkeypatch.context() as patch:
            patch.setattr(migration, "plan_migration", broken)
            with pytest.raises(RuntimeError, match="plan failed"):
                store.partitions_migrate_step()
        with _pg(pg_url) as conn:
            assert conn.execute("SELECT to_regclass('partition_moves'), (SELECT count(*) "
                                "FROM pg_trigger WHERE tgname ~ '_default_changes$')"
                                ).fetchone() == (None, 0)
            # Started, not planned, as an older release could leave it; then a late
            # delivery of an old month, noted.
            with conn.transaction():
                migration.start_migration(Tx(conn, postgres.DIALECT))
        late = session("p2", started_at="2026-06-20T10:00:00.000000Z")
        assert store.insert_results([_item(late)]) == ["stored"]
        assert store.partitions_migrate_step() == migration.Step(MONTHS[0], 7)
        # June's first result removed, then delivered again dated in August.
        assert store.delete_result(ids[0], "test", "2026-12-01T00:00:00Z", "t")
        moved = session("p1", started_at="2026-08-10T10:00:00.000000Z", result_id=ids[0])
        assert store.insert_results([_item(moved)]) == ["stored"]

        real = postgres._MigrateStep._cleanup

        def killed(self: Any, statements: list[str]) -> migration.Step:
            drop = next(i for i, s in enumerate(statements) if s.startswith("DROP TABLE"))
            real(self, statements[:drop + 1])
            raise RuntimeError("killed in the cleanup")

        steps = [store.partitions_migrate_step(), store.partitions_migrate_step()]
        assert steps == [migration.Step(MONTHS[1], 6), migration.Step(MONTHS[2], 7)]
        # A month no row had when the plan was made, delivered now: the default's copy
        # takes it first, then its noted change makes it a month of its own.
        new_month = session("p1", started_at="2026-02-10T10:00:00.000000Z")
        assert store.insert_results([_item(new_month)]) == ["stored"]
        with monkeypatch.context() as patch:
            patch.setattr(postgres._MigrateStep, "_cleanup", killed)
            assert store.partitions_migrate_step() == migration.Step("default", 1)
            with pytest.raises(RuntimeError, match="killed"):
                store.partitions_migrate_step()
        finish = _migrate_all(store)
        assert [s.what for s in finish] == ["cleanup"]
        with _pg(pg_url) as conn:
            assert conn.execute("SELECT count(*) FROM pg_class WHERE relname ~ "
                                "'(_premigration|_newdefault)$'").fetchone() == (0,)
        assert [_count(pg_url, f"results_p{m.replace('-', '_')}") for m in
                ("2026-02", *MONTHS)] == [1, 6, 6, 7]
        assert _count(pg_url, "results_default") == 0
        assert _count(pg_url, "result_ids") == len(ids) + 2
        assert _count(pg_url, "session_facts") == len(ids) + 2
        stored = store.result(ids[0])
        assert stored is not None and stored.started_at.startswith("2026-08")
    finally:
        store.close()


def _made(store: PostgresStore) -> list[tuple[str, bool]]:
    return [(m.month, m.attached) for m in store.partition_months()]


def test_create_ahead_refuses_a_large_default_and_a_concurrent_run(
        pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review 2, findings 2 and 11: making a month beside a large default partition would
    stop ingest for a scan of it, so the command refuses (and says what to run); and it
    takes the lock `partitions migrate` takes."""
    store = _open(pg_url)
    try:
        _fill(store)  # months before the ones made ahead: in the default partition
        before = _made(store)
        monkeypatch.setattr(partitions, "DEFAULT_SMALL", 5)
        done = CliRunner().invoke(main, ["--db", pg_url, "partitions", "create-ahead",
                                         "--months", "6"])
        assert done.exit_code == 1 and "partitions migrate` first" in done.output, \
            done.output
        assert _made(store) == before
        monkeypatch.setattr(partitions, "DEFAULT_SMALL", 100_000)
        with _pg(pg_url) as conn:
            conn.execute("SELECT pg_advisory_lock(%s)", (postgres.PARTITION_LOCK,))
            done = CliRunner().invoke(main, ["--db", pg_url, "partitions", "create-ahead",
                                             "--months", "6"])
            assert done.exit_code == 1 and "is running" in done.output, done.output
        assert _made(store) == before
        done = CliRunner().invoke(main, ["--db", pg_url, "partitions", "create-ahead",
                                         "--months", "6"])
        assert done.exit_code == 0 and "created: " in done.output, done.output
    finally:
        store.close()


def test_a_long_running_collector_makes_the_coming_months(
        pg_url: str, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review 2, finding 7: the daily pass makes the months a collector started long ago
    did not, and warns when the default partition gathers rows."""
    from datetime import date

    store = _open(pg_url)
    try:
        made = store.maintain_partitions(date(2027, 7, 15))
        assert made == ["2027-07", "2027-08", "2027-09", "2027-10"]
        listed = {m.month: m.attached for m in store.partition_months()}
        assert all(listed[m] for m in made)
        assert store.maintain_partitions(date(2027, 7, 16)) == []
        _fill(store)  # 18 results in the default partition
        monkeypatch.setattr(postgres, "DEFAULT_WARN_ROWS", 17)
        with caplog.at_level(logging.WARNING, logger="bbprobe.collector"):
            store.maintain_partitions(date(2027, 7, 16))
        assert "run `bbprobe-collector partitions migrate`" in caplog.text
    finally:
        store.close()


def test_the_daily_pass_runs_in_the_collector_within_a_deadline(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The serving collector's task: a failure or a pass past its deadline is logged,
    and the next day's pass runs."""
    from collector.server import app

    monkeypatch.setattr(app, "PARTITIONS_INTERVAL_S", 0.0)
    monkeypatch.setattr(app, "PARTITIONS_DEADLINE_S", 0.01)
    calls: list[str] = []
    twice = asyncio.Event()

    class Partitioned:
        def maintain_partitions(self) -> None:
            calls.append("made")
            if calls.count("made") == 2:
                twice.set()

    async def run(fn: Any) -> None:
        if not calls:
            calls.append("failed")
            raise StoreUnavailable("database down")
        if calls == ["failed"]:
            calls.append("stuck")
            await asyncio.sleep(3600)
        fn(Partitioned())

    async def serve() -> None:
        task = asyncio.create_task(app.maintain_partitions(run))
        async with asyncio.timeout(60):  # a bound on a broken loop, not a measurement
            await twice.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.WARNING, logger="bbprobe.collector"):
        asyncio.run(serve())
    assert calls[:4] == ["failed", "stuck", "made", "made"]
    assert "failed: database down" in caplog.text and "took more than" in caplog.text


def test_month_names_are_ascii_digits() -> None:
    """Review 2, finding 12: other scripts' digits and a trailing newline are not months
    (they would name a table and make an empty range)."""
    assert partitions.parse_month("2026-05") == "2026-05"
    for text in ("\u0662\u0660\u0662\u0666-05", "2026-0\u0665", "2026-05\n", "2026-13"):
        with pytest.raises(InputError, match="YYYY-MM"):
            partitions.parse_month(text)
    assert partitions.MONTH.fullmatch("\u0662\u0660\u0662\u0666-05") is None


def test_partitions_need_postgresql(tmp_path: Path) -> None:
    db = tmp_path / "c.sqlite3"
    done = CliRunner().invoke(main, ["--db", str(db), "init"])
    assert done.exit_code == 0, done.output
    done = CliRunner().invoke(main, ["--db", str(db), "partitions", "list"])
    assert done.exit_code == 2 and "postgresql" in done.output
    done = CliRunner().invoke(main, ["--db", str(db), "partitions", "detach", "2026-13"])
    assert done.exit_code == 2 and "YYYY-MM" in done.output


# --- storage.read_url ------------------------------------------------------------------


def test_read_url_is_checked_when_the_config_is_read() -> None:
    with pytest.raises(ConfigError, match=r"storage\.read_url"):
        parse({"storage": {"read_url": "postgresql://h/db"}})
    with pytest.raises(ConfigError, match=r"storage\.read_url"):
        parse({"storage": {"backend": "postgresql", "url": "postgresql://h/db",
                           "read_url": "h:5432/db"}})
    cfg = parse({"storage": {"backend": "postgresql", "url": "postgresql://h/db",
                             "read_url": "postgresql://replica/db"}})
    assert cfg.storage.read_url == "postgresql://replica/db"


@pytest.fixture
def two_databases(pg_cluster: object) -> Iterator[tuple[str, str]]:
    """A primary and a stand-in for its replica: another database of the same schema
    holding other rows, so a test can tell which one was read."""
    from tests.pg import Cluster

    assert isinstance(pg_cluster, Cluster)
    names = [pg_cluster.create_database(), pg_cluster.create_database()]
    try:
        yield pg_cluster.url(names[0]), pg_cluster.url(names[1])
    finally:
        for name in names:
            pg_cluster.drop_database(name)


def _one_result(url: str, probe: str, started_at: str) -> str:
    store = _open(url)
    try:
        token = hashlib.sha256(url.encode() + probe.encode()).hexdigest()
        store.add_probe(probe, token, "2026-01-01T00:00:00Z", LINE)
        result = session(probe, started_at=started_at)
        store_result(store, result)
        return result.result_id
    finally:
        store.close()


def test_a_replica_behind_or_ahead_of_this_collector_is_refused(
        two_databases: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    primary, replica = two_databases
    _open(primary).close()
    monkeypatch.setattr(postgres, "REPLICA_CATCH_UP_S", 0.0)
    storage = StorageConfig(backend="postgresql", url=primary, read_url=replica, pool_size=2)
    # Never migrated (a standby follows its primary): an empty database is refused.
    with pytest.raises(StoreError, match=r"storage\.read_url: .* schema version 0"):
        open_store(storage, read_only=True)
    with _pg(replica) as conn:
        assert conn.execute("SELECT to_regclass('results')").fetchone() == (None,)
        conn.execute("CREATE TABLE bbprobe_schema (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO bbprobe_schema VALUES (%s)", (len(MIGRATIONS) + 1,))
    with pytest.raises(StoreError, match=f"schema version {len(MIGRATIONS) + 1}"):
        open_store(storage, read_only=True)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _ids(listing: Sequence[dict[str, Any]]) -> set[str]:
    return {row["result_id"] for row in listing}


def test_analysts_read_the_replica_and_writes_go_to_the_primary(
        two_databases: tuple[str, str], tmp_path: Path) -> None:
    primary, replica = two_databases
    on_primary = _one_result(primary, "p1", "2026-11-02T10:00:00.000000Z")
    on_replica = _one_result(replica, "p1", "2026-11-03T10:00:00.000000Z")
    storage = StorageConfig(backend="postgresql", url=primary, read_url=replica, pool_size=2)

    # The seam: the analysts' store is the replica, and it refuses writes.
    reader = open_store(storage, read_only=True)
    try:
        assert [r.result_id for r in reader.results()] == [on_replica]
        with pytest.raises(StoreFault, match="read_url"):
            reader.add_probe("p9", "9" * 64, "2026-01-01T00:00:00Z", LINE)
    finally:
        reader.close()

    # The CLI: analysts' commands read the replica, the others the primary; --db names
    # the one database to use.
    config = tmp_path / "collector.toml"
    config.write_text(f'[storage]\nbackend = "postgresql"\nurl = "{primary}"\n'
                      f'read_url = "{replica}"\n')
    done = CliRunner().invoke(main, ["--config", str(config), "results", "--format", "json"])
    assert done.exit_code == 0, done.output
    assert _ids(json.loads(done.output)["results"]) == {on_replica}
    done = CliRunner().invoke(main, ["--config", str(config), "probe", "add", "p2"])
    assert done.exit_code == 0, done.output
    assert _count(primary, "probes WHERE name = 'p2'") == 1
    assert _count(replica, "probes WHERE name = 'p2'") == 0
    done = CliRunner().invoke(main, ["--config", str(config), "--db", primary, "results",
                                     "--format", "json"])
    assert done.exit_code == 0, done.output
    assert _ids(json.loads(done.output)["results"]) == {on_primary}

    # The API: an analyst's token is checked on the primary, the listing read from the
    # replica; a probe's result is stored on the primary.
    base = CollectorConfig()
    cfg = replace(base, storage=storage,
                  server=replace(base.server, probe_requests_per_min=0))
    with running_collector(tmp_path / "web", cfg) as c:
        token = c.add_token("analyst")
        probe_token = c.add_probe("p3", LINE)
        status, data, _ = request("GET", c.url + "/api/v1/results", headers=_bearer(token))
        assert status == 200 and _ids(data["results"]) == {on_replica}
        status, report, _ = request("GET", c.url + "/api/v1/report?probe=p1",
                                    headers=_bearer(token))
        assert status == 200 and report["sessions"] == 1
        doc = json.loads(canonical_json(session("p3")))
        assert post_json(c.url + "/api/v1/results", doc, probe_token)[0] == 201
        assert _count(primary, "results WHERE probe_name = 'p3'") == 1
        assert _count(replica, "results WHERE probe_name = 'p3'") == 0
