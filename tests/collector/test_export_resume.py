"""The export's review findings (issue 28, phase 1), on each backend: open data publishes
only cells confirmed to hold k probes, names no probe in its manifest, writes probes in
pseudonym order; a resumed export finishes the same pinned dataset, rewrites a partition
cut short, fsyncs what it renames; rows reach the writer in bounded batches; --refresh
deletes only the export's own files; the key never lands in --out; the dictionary
describes every table of the dataset."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from agent.schema import SessionResult, utc_now
from collector.cli.main import main
from collector.config import StorageConfig
from collector.export import opendata, writer
from collector.export import run as export_run
from collector.fleet.probes import register_probe
from collector.lines import LineMetadata
from collector.scope import resolve_scope
from collector.storage.sql import base
from collector.storage.store import Store
from tests.collector.test_export import LINES, _db_option, _export, filled  # noqa: F401
from tests.factories import attempt, insert_result, session, store_result

KEY = bytes(range(32))
SAME_CELL = LineMetadata(operator="Op A", offer="x", region="Lazio", technology="FTTH")


def _store_late(store: Store, result: SessionResult) -> None:
    """Store ``result`` as received now (a late delivery from a probe's spool):
    tests.factories.store_result with today's received_at."""
    from collector.intake import ingest
    from tests.factories import canonical_json

    accepted = ingest.parse_body(canonical_json(result).encode())
    insert_result(store, result_id=result.result_id, probe_name=result.probe_id,
                  schema_version=result.schema_version, started_at=accepted.started_at,
                  ended_at=accepted.ended_at, received_at=utc_now(), body=accepted.body,
                  body_sha256=accepted.body_sha256, facts=accepted.facts)


def _fleet(store: Store, n: int = 6) -> list[str]:
    """``n`` probes named by a scheme, one cell, one session each at the same hour, and
    one probe alone in its cell."""
    names = [f"rome-{i:04d}" for i in range(1, n + 1)]
    for name in names:
        register_probe(store, name, SAME_CELL)
        store_result(store, session(name, started_at="2026-03-01T10:00:00.000000Z",
                                    rtts=[10.0], transfers=[attempt("download", bps=5e6)]))
    register_probe(store, "lonely-probe", LineMetadata(operator="Op Z", offer="y",
                                                       region="Molise", technology="FWA"))
    store_result(store, session("lonely-probe", started_at="2026-03-01T10:05:00.000000Z",
                                rtts=[10.0], transfers=[attempt("download", bps=5e6)]))
    return names


def _open(store: Store, out: Path, **options: Any) -> export_run.Summary:
    return _export(store, out, options.pop("scope", resolve_scope(None, None, None)),
                   open_data=True, key=KEY, k=5, **options)


def _probe_ids(out: Path) -> list[str]:
    return [r["probe_id"] for r in pq.read_table(out / "sessions").to_pylist()]


def test_open_data_publishes_only_cells_the_count_confirmed(store: Store, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """A cell the first pass never counted (its session not yet seen) is suppressed, not
    published; and a session stored between the count and the pages (received after the
    export's snapshot) is not published either."""
    _fleet(store)
    ps = opendata.Pseudonymiser(KEY)
    real = store.export_probe_hours  # type: ignore[attr-defined]
    monkeypatch.setattr(store, "export_probe_hours", lambda *a, **kw: (
        x for x in real(*a, **kw) if x[0] != "lonely-probe"))
    _open(store, tmp_path / "a")
    assert ps.probe("lonely-probe") not in _probe_ids(tmp_path / "a")
    assert len(_probe_ids(tmp_path / "a")) == 6

    def count_then_deliver(*a: Any, **kw: Any) -> Any:
        yield from real(*a, **kw)
        register_probe(store, "newcomer", LineMetadata(operator="Op N", region="Umbria"))
        _store_late(store, session("newcomer", started_at="2026-03-01T10:06:00.000000Z",
                                   rtts=[10.0]))

    monkeypatch.setattr(store, "export_probe_hours", count_then_deliver)
    _open(store, tmp_path / "b")
    assert ps.probe("newcomer") not in _probe_ids(tmp_path / "b")
    assert ps.probe("rome-0001") in _probe_ids(tmp_path / "b")


@pytest.mark.parametrize("filters", [[], ["--operator", "op a"], ["--probe", "rome-0002"]])
def test_no_raw_probe_name_in_any_open_data_file(store: Store, storage: StorageConfig,
                                                 tmp_path: Path, filters: list[str]) -> None:
    """With a scope chosen by metadata or by name, the manifest keeps a keyed digest of
    the probe list, never the names; no other file holds one either."""
    names = _fleet(store)
    out = tmp_path / "open"
    got = CliRunner().invoke(main, ["export", "--db", _db_option(storage), "--out", str(out),
                                    "--open-data", "--pseudonym-key", str(tmp_path / "key"),
                                    "--k", "2", *filters])
    assert got.exit_code == 0, got.output
    raw = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    for name in [*names, "lonely-probe"]:
        assert name.encode() not in raw, name
    probes = json.loads((out / "manifest.json").read_text())["settings"]["probes"]
    assert probes is None if not filters else set(probes) == {"hmac_sha256"}


def test_open_data_rows_are_in_pseudonym_order_not_name_order(store: Store,
                                                              tmp_path: Path) -> None:
    """Each month's probes come in the order of their pseudonyms: the order of the raw
    names (a fleet's naming scheme) cannot be read off the rows."""
    names = _fleet(store)
    ps = opendata.Pseudonymiser(KEY)
    by_name = [ps.probe(n) for n in sorted(names)]
    assert by_name != sorted(by_name)  # this key's pseudonyms are not in name order
    _open(store, tmp_path / "out")
    order = _probe_ids(tmp_path / "out")
    assert order == sorted(by_name)


def test_a_resumed_export_finishes_the_same_pinned_dataset(filled: Store,  # noqa: F811
                                                           tmp_path: Path) -> None:
    """The first run pins until and received_before to its start; sessions delivered
    later (into a finished month or an unfinished one) stay out of every later run into
    the same --out, so a rewritten partition is the same as before; --refresh makes a
    new dataset that has them."""
    out = tmp_path / "out"
    scope = resolve_scope(None, None, None)
    first = _export(filled, out, scope)
    snapshot = json.loads((out / "manifest.json").read_text())["snapshot"]
    assert snapshot["until"] == snapshot["received_before"] == first.snapshot["until"]
    before = pq.read_table(out / "sessions/month=2026-03/part-0.parquet").to_pylist()
    late = session("rome-ftth-01", started_at="2026-03-02T23:00:00.000000Z", rtts=[12.0])
    _store_late(filled, late)
    (out / "sessions/month=2026-03/part-0.parquet").unlink()
    again = _export(filled, out, scope)
    assert again.written == ["sessions/month=2026-03/part-0.parquet"]
    assert again.snapshot == first.snapshot
    after = pq.read_table(out / "sessions/month=2026-03/part-0.parquet").to_pylist()
    assert after == before
    refreshed = _export(filled, out, scope, refresh=True)
    assert refreshed.snapshot["received_before"] > first.snapshot["received_before"]
    ids = {r["session_id"] for r in
           pq.read_table(out / "sessions/month=2026-03/part-0.parquet").to_pylist()}
    assert late.result_id in ids


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_a_partition_cut_short_is_written_again(filled: Store, tmp_path: Path,  # noqa: F811
                                                fmt: str) -> None:
    """A partition the manifest lists as finished but whose file lost its end (a crash
    before its blocks reached the disk) is not skipped: written again, whole."""
    out = tmp_path / "out"
    scope = resolve_scope(None, None, None)
    _export(filled, out, scope, fmt=fmt)
    name = f"attempts/month=2026-02/part-0.{fmt}"
    whole = (out / name).read_bytes()
    (out / name).write_bytes(whole[: len(whole) // 2])
    (out / f"pings/month=2026-03/part-0.{fmt}").write_bytes(b"")
    again = _export(filled, out, scope, fmt=fmt)
    assert sorted(again.written) == [name, f"pings/month=2026-03/part-0.{fmt}"]
    assert (out / name).read_bytes() == whole or (
        fmt == "parquet" and pq.read_table(out / name).num_rows == pq.read_table(
            pq.BufferReader(whole)).num_rows)


def test_partitions_and_manifest_are_fsynced_with_their_directory(
        filled: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """Each file is fsync'ed before its rename and its directory after, so a power loss
    cannot keep a name over missing blocks."""
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "out"
    _export(filled, out, resolve_scope(None, None, None))
    part = out / "pings/month=2026-02"
    assert str(part / ".part-0.parquet.tmp") in synced
    assert synced.index(str(part)) > synced.index(str(part / ".part-0.parquet.tmp"))
    assert str(out / ".manifest.json.tmp") in synced and str(out) in synced


def test_rows_reach_the_writer_in_bounded_batches(filled: Store, tmp_path: Path,  # noqa: F811
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows go to the writer a session at a time (not a page's worth at once), and the
    Parquet writer never holds more than a batch of row dicts plus one session's rows;
    row groups stay ROW_GROUP rows; the data is the same as with the default sizes."""
    scope = resolve_scope(None, None, None)
    _export(filled, tmp_path / "default", scope)
    held: list[int] = []
    given: list[int] = []
    write = writer.ParquetPartition.write

    def watched(self: writer.ParquetPartition, rows: Any) -> None:
        given.append(len(rows))
        write(self, rows)
        held.append(len(self.buffer))

    monkeypatch.setattr(writer, "BATCH", 4, raising=False)
    monkeypatch.setattr(writer, "ROW_GROUP", 10)
    monkeypatch.setattr(writer.ParquetPartition, "write", watched)
    _export(filled, tmp_path / "small", scope)
    assert max(given) <= 8  # a session has at most 8 pings (4 idle, 3 loaded) here
    assert held and max(held) <= 4 + 8
    meta = pq.read_metadata(tmp_path / "small/pings/month=2026-02/part-0.parquet")
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert sizes[:-1] == [10] * (len(sizes) - 1) and 0 < sizes[-1] <= 10
    for table in ("sessions", "attempts", "pings"):
        assert pq.read_table(tmp_path / "small" / table).equals(
            pq.read_table(tmp_path / "default" / table))


def test_the_results_read_is_bounded_by_the_pages_start_times(
        filled: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """Each page reads its bodies with a started_at range (partition pruning on
    PostgreSQL's monthly results), the page's first and last start time."""
    seen: list[tuple[str, Any]] = []
    rows = base.Tx.rows

    def spy(self: base.Tx, sql: str, params: Any = ()) -> Any:
        if "FROM results WHERE" in sql and "body_packed" in sql:
            seen.append((sql, list(params)))
        return rows(self, sql, params)

    monkeypatch.setattr(base.Tx, "rows", spy)
    _export(filled, tmp_path / "out", resolve_scope(None, None, None))
    assert seen
    for sql, params in seen:
        assert "started_at >= ? AND started_at <= ?" in sql
        lo, hi = params[-2:]
        assert lo[:7] == hi[:7] and lo <= hi  # one month's page


def test_refresh_deletes_only_the_exports_own_files(filled: Store,  # noqa: F811
                                                    tmp_path: Path) -> None:
    """A manifest is a file anyone with access to --out may edit: --refresh deletes
    only names of the export's layout that resolve inside --out."""
    out = tmp_path / "out"
    scope = resolve_scope(None, None, None)
    _export(filled, out, scope)
    victims = tmp_path / "victims"
    (victims / "month=2025-01").mkdir(parents=True)
    outside = victims / "month=2025-01/part-0.parquet"
    outside.write_text("keep")
    absolute = tmp_path / "absolute.txt"
    absolute.write_text("keep")
    (out / "attempts").rename(tmp_path / "attempts-old")
    (out / "attempts").symlink_to(victims)
    doc = json.loads((out / "manifest.json").read_text())
    doc["partitions"].update({"attempts/month=2025-01/part-0.parquet": {"rows": 1},
                              str(absolute): {"rows": 1}, "../absolute.txt": {"rows": 1}})
    (out / "manifest.json").write_text(json.dumps(doc))
    _export(filled, out, scope, refresh=True)
    assert outside.read_text() == "keep" and absolute.read_text() == "keep"


def test_the_key_never_lands_in_out_nor_outlives_a_refused_scope(
        filled: Store, storage: StorageConfig, tmp_path: Path) -> None:  # noqa: F811
    """A key path inside --out is refused on one line, before anything is written; a
    refused scope (a misspelt --probe) leaves no new key behind."""
    out = tmp_path / "out"
    for key, extra, message in ((out / "key", [], "--pseudonym-key: "),
                                (tmp_path / "key", ["--probe", "rome-ftth-1"],
                                 "no probe named")):
        got = CliRunner().invoke(main, ["export", "--db", _db_option(storage), "--out",
                                        str(out), "--open-data", "--pseudonym-key",
                                        str(key), *extra])
        assert got.exit_code == 2, got.output
        assert message in got.output and len(got.output.strip().splitlines()) == 1
        assert not key.exists()


def test_the_dictionary_describes_every_table_of_the_dataset(
        filled: Store, tmp_path: Path) -> None:  # noqa: F811
    """A run with --tables sessions into a full export keeps the three tables in the
    dictionary, with their rows from the manifest."""
    out = tmp_path / "out"
    scope = resolve_scope(None, None, None)
    full = _export(filled, out, scope)
    (out / "sessions/month=2026-03/part-0.parquet").unlink()
    _export(filled, out, scope, tables=("sessions",))
    doc = json.loads((out / "dictionary.json").read_text())
    assert list(doc["tables"]) == ["sessions", "attempts", "pings"]
    assert {t: v["rows"] for t, v in doc["tables"].items()} == full.rows
    assert "## pings (" in (out / "dictionary.md").read_text()
