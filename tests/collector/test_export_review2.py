"""The export's findings of review 2 (issue 28, phase 1), on each backend: a page of a
rare family reads only its own sessions' transfers; a session whose stored row is gone
(on PostgreSQL, its month detached) stays in the export from its facts, and every
report figure still comes out of the files; the "received before" seek is bounded so
PostgreSQL prunes months; beginning a dataset removes every partition of the layout,
listed or not; --refresh replaces an unreadable manifest; open data's k-anonymity holds
per month, the publication unit."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from collector.config import StorageConfig
from collector.errors import InputError
from collector.fleet.probes import register_probe
from collector.reports import service
from collector.scope import resolve_scope
from collector.storage.sql import base
from collector.storage.sql.postgres import PostgresStore
from collector.storage.store import Store
from tests.collector.test_export import LINES, TABLE, _export, _recomputed, _sessions
from tests.collector.test_export_resume import KEY, _fleet, _open, _probe_ids
from tests.factories import attempt, session, store_result


def _family_sessions(store: Store) -> tuple[set[str], int]:
    """One probe, ten IPv4 sessions an hour apart, and IPv6 sessions only at the first
    and the last hour: a page of IPv6 spans the whole day. The IPv6 ids and how many
    transfer facts they have."""
    register_probe(store, "p1", LINES["rome-ftth-01"])
    v6: set[str] = set()
    for hour in range(10):
        store_result(store, dataclasses.replace(
            session("p1", started_at=f"2026-03-02T{hour:02d}:00:00.000000Z",
                    transfers=[attempt("download", bps=50e6), attempt("upload", bps=5e6),
                               attempt("download", 0, 2, bps=40e6)]),
            address_family="ipv4", address_family_requested="both"))
        if hour in (0, 9):
            result = dataclasses.replace(
                session("p1", started_at=f"2026-03-02T{hour:02d}:30:00.000000Z",
                        transfers=[attempt("download", bps=20e6),
                                   attempt("upload", bps=2e6)]),
                address_family="ipv6", address_family_requested="both")
            store_result(store, result)
            v6.add(result.result_id)
    return v6, 2 * len(v6)


def test_a_family_page_reads_only_its_own_sessions_transfers(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 8: the transfers read of a page is bounded by the page's ids, not only by
    its key range, so a rare family does not load every other session's transfers."""
    v6, v6_transfers = _family_sessions(store)
    fetched: list[int] = []
    rows = base.Tx.rows

    def spy(self: base.Tx, sql: str, params: Any = ()) -> Any:
        got = rows(self, sql, params)
        if "FROM transfer_facts" in sql and "direction, ok, kbps" in sql:
            fetched.append(len(got))
        return got

    monkeypatch.setattr(base.Tx, "rows", spy)
    pages = list(store.export_sessions(None, None, None, "ipv6"))  # type: ignore[attr-defined]
    assert {f.result_id for page in pages for f, _ in page} == v6
    assert all(len(f.transfers) == 2 for page in pages for f, _ in page)
    # 27 transfer facts of IPv4 sessions lie between the two IPv6 ones in the key range.
    assert sum(fetched) == v6_transfers == 4
    summary = _export(store, tmp_path / "out", dataclasses.replace(
        resolve_scope(None, None, None), family="ipv6"))
    assert summary.rows["sessions"] == 2 and summary.rows["attempts"] == 4


def _february_gone(store: Store, storage: StorageConfig) -> None:
    """February's stored rows become unreadable while its facts stay: on PostgreSQL its
    results partition is detached (partitions.py, retention); SQLite has no partitions,
    so its rows are deleted past the foreign keys, the same state for the reads."""
    if isinstance(store, PostgresStore):
        assert store.partitions_detach("2026-02")
        return
    with sqlite3.connect(storage.path) as db:
        db.execute("PRAGMA foreign_keys = OFF")
        db.execute("DELETE FROM results WHERE started_at < '2026-03'")
    db.close()


def _fill_by_month(store: Store) -> list[str]:
    """test_export's sessions (February and March); on PostgreSQL each month in a
    partition of its own (not the default one), so that one can be detached. Their ids."""
    if isinstance(store, PostgresStore):
        store.partitions_create_ahead(datetime(2026, 2, 15, tzinfo=UTC), 1)
    for name, line in LINES.items():
        register_probe(store, name, line)
    ids = []
    for r in _sessions():
        store_result(store, r)
        ids.append(r.result_id)
    return ids


def test_a_session_whose_stored_row_is_gone_stays_facts_only(
        store: Store, storage: StorageConfig, tmp_path: Path) -> None:
    """Finding 9: a session with no readable results row (a detached month) is kept,
    from its facts: DuckDB recomputes every report figure from the files as before, the
    body's columns are null (received_at among them), the dictionary says so."""
    ids = _fill_by_month(store)
    scope = resolve_scope(None, None, None)
    assert store.result(ids[0]) is not None
    _february_gone(store, storage)
    assert store.result(ids[0]) is None  # February's body is gone, its facts stay
    report = service.compliance(store, scope, TABLE)
    out = tmp_path / "out"
    summary = _export(store, out, scope)
    assert summary.rows["sessions"] == 27  # all of them, February's too
    got = _recomputed(out)
    assert got["sessions"] == report.sessions > 0
    observed = {i.id: i.observed for i in (*report.indicators, *report.informational)}
    for ident in ("download_p5_kbps", "download_p95_kbps", "upload_p5_kbps",
                  "upload_p95_kbps"):
        assert got[ident] == observed[ident], ident
    for ident in ("download_failure_ratio", "upload_failure_ratio", "delay_mean_ms",
                  "delay_stdev_ms", "loss_ratio", "jitter_mean_ms"):
        assert got[ident] == pytest.approx(observed[ident], rel=1e-9), ident
    february = pq.read_table(out / "sessions/month=2026-02/part-0.parquet").to_pylist()
    march = pq.read_table(out / "sessions/month=2026-03/part-0.parquet").to_pylist()
    assert len(february) == 13 and len(march) == 14
    assert all(r["received_at"] is None and r["agent_version"] is None for r in february)
    assert all(r["received_at"] is not None and r["agent_version"] for r in march)
    loaded = pq.read_table(out / "pings/month=2026-02/part-0.parquet").to_pylist()
    assert {r["train"] for r in loaded} == {"idle"}  # the facts hold the idle train only
    doc = json.loads((out / "dictionary.json").read_text())
    assert "received_at is null" in doc["facts_only"]
    assert "from their facts alone" in (out / "dictionary.md").read_text()


def test_received_before_still_leaves_out_later_deliveries(store: Store,
                                                           tmp_path: Path) -> None:
    """Finding 9, the other side: with rows kept when absent, a session received after
    the pin (its row present) is still left out of a resumed run."""
    from tests.collector.test_export_resume import _store_late

    _fill_by_month(store)
    out = tmp_path / "out"
    scope = resolve_scope(None, None, None)
    first = _export(store, out, scope)
    late = session("rome-ftth-01", started_at="2026-03-02T23:00:00.000000Z", rtts=[12.0])
    _store_late(store, late)
    (out / "sessions/month=2026-03/part-0.parquet").unlink()
    _export(store, out, scope)
    ids = {r["session_id"] for r in
           pq.read_table(out / "sessions/month=2026-03/part-0.parquet").to_pylist()}
    assert late.result_id not in ids and len(ids) == first.rows["sessions"] - 13


def test_postgresql_prunes_the_received_before_seek_to_the_months_read(
        pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 9 on PostgreSQL: the "received before" seek into results is bounded by
    the session's start time and the read's period, so the plan of March's read holds
    no other month's results partition."""
    from collector.storage.sql.backends import open_store

    store = open_store(StorageConfig(backend="postgresql", url=pg_url, pool_size=2))
    assert isinstance(store, PostgresStore)
    try:
        _fill_by_month(store)
        seen: list[tuple[str, list[Any]]] = []
        rows = base.Tx.rows

        def spy(self: base.Tx, sql: str, params: Any = ()) -> Any:
            if "FROM session_facts" in sql and "r.received_at" in sql and "LIMIT" in sql:
                seen.append((sql, list(params)))
            return rows(self, sql, params)

        monkeypatch.setattr(base.Tx, "rows", spy)
        _export(store, tmp_path / "out", resolve_scope(None, None, None))
        monkeypatch.undo()
        # March's read: its period starts the parameters (no probe list on PostgreSQL).
        march = [(sql, params) for sql, params in seen
                 if params[0] == "2026-03-01T00:00:00.000000Z"]
        assert march
        sql, params = march[0]
        assert "r.started_at = session_facts.started_at" in sql
        with store._reading() as tx:
            plan = "\n".join(str(r[0]) for r in tx.rows("EXPLAIN " + sql, params))
        assert "results_p2026_03" in plan
        assert "results_p2026_02" not in plan, plan
    finally:
        store.close()


def test_a_new_dataset_removes_every_partition_of_the_layout(store: Store,
                                                             tmp_path: Path) -> None:
    """Finding 10: a raw partition no manifest lists (a run stopped part-way through a
    month) and a raw temporary file (a killed run) do not survive --refresh into open
    data, nor a new dataset begun where the manifest was removed: no raw probe name in
    any file afterwards."""
    names = _fleet(store)
    scope = resolve_scope(None, None, None)
    for refresh in (True, False):
        out = tmp_path / f"out-{refresh}"
        _export(store, out, scope, fmt="csv")  # raw, and uncompressed: names readable
        raw = (out / "sessions/month=2026-03/part-0.csv").read_bytes()
        assert names[0].encode() in raw
        (out / "sessions/month=2025-12").mkdir()
        (out / "sessions/month=2025-12/part-0.parquet").write_bytes(raw)
        (out / "attempts/month=2026-03/.part-0.parquet.tmp").write_bytes(raw)
        (out / "pings/month=2025-11").mkdir()
        (out / "pings/month=2025-11/part-0.csv").write_bytes(raw)
        (out / "sessions/month=2025-12/notes.txt").write_text("keep")
        if not refresh:
            (out / "manifest.json").unlink()
        _open(store, out, refresh=refresh)
        published = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file()
                             and p.name != "notes.txt")
        for name in [*names, "lonely-probe"]:
            assert name.encode() not in published, (refresh, name)
        assert not (out / "sessions/month=2025-12/part-0.parquet").exists()
        assert (out / "sessions/month=2025-12/notes.txt").read_text() == "keep"


def test_refresh_replaces_an_unreadable_manifest(store: Store, tmp_path: Path) -> None:
    """Finding 13: the error for an unreadable manifest suggests --refresh, and --refresh
    does replace it."""
    _fleet(store)
    out = tmp_path / "out"
    scope = resolve_scope(None, None, None)
    _export(store, out, scope)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(InputError, match="remove it or use --refresh"):
        _export(store, out, scope)
    again = _export(store, out, scope, refresh=True)
    assert len(again.written) == 3
    assert json.loads((out / "manifest.json").read_text())["partitions"]


def test_open_data_suppresses_small_cells_per_month(store: Store, tmp_path: Path) -> None:
    """Finding 14: a cell holding k probes over the export but one probe in a month is
    suppressed from that month's files (each month can be published alone); the
    dictionary names the month as the publication unit."""
    from collector.export import opendata

    names = _fleet(store, 5)  # five probes in one cell in March, at 11:00 in Rome
    # April: one of them alone in the same cell (09:00 UTC is 11:00 in Rome, CEST).
    store_result(store, session(names[0], started_at="2026-04-01T09:00:00.000000Z",
                                rtts=[10.0], transfers=[attempt("download", bps=5e6)]))
    out = tmp_path / "out"
    summary = _open(store, out)
    assert len(pq.read_table(out / "sessions/month=2026-03").to_pylist()) == 5
    assert pq.read_table(out / "sessions/month=2026-04").num_rows == 0
    assert summary.suppressed["sessions"] == 2  # lonely-probe in March, rome-0001 in April
    ps = opendata.Pseudonymiser(KEY)
    assert ps.probe(names[0]) in _probe_ids(out)
    doc = json.loads((out / "dictionary.json").read_text())
    assert doc["open_data"]["publication_unit"] == "month"
    assert "in a UTC month" in doc["open_data"]["rule"]
