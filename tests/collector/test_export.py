"""The analysts' export (collector/export/), on each backend: DuckDB, an independent
reader, recomputes every figure of the compliance report from the Parquet dataset and
agrees with the collector; CSV, resuming, --refresh, bad options, and open-data basics
(review findings: test_export_resume.py)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from agent.schema import SCHEMA_VERSION, SessionResult, utc_now
from collector.cli.main import main
from collector.compliance import targets
from collector.config import StorageConfig
from collector.errors import InputError
from collector.export import run as export_run
from collector.export.columns import EXPORT_SCHEMA_VERSION, names
from collector.fleet.probes import register_probe
from collector.lines import LineMetadata
from collector.reports import service
from collector.scope import Scope, resolve_scope
from collector.storage.store import Store
from tests.factories import attempt, ping_test, session, store_result

TABLE = targets.load("")
LINES = {"rome-ftth-01": LineMetadata(operator="Op A", offer="Fibra 1000", region="Lazio",
                                      technology="FTTH"),
         "milan-fwa-02": LineMetadata(operator="Op B", offer="Casa", region="Lombardia",
                                      technology="FWA")}


def _sessions() -> list[SessionResult]:
    """Two probes over two UTC months: failed and refused attempts, lost pings, loaded
    ping trains, a session without pings, sessions the agent flagged invalid."""
    out = []
    days = ("2026-02-27", "2026-02-28", "2026-03-01", "2026-03-02")
    for d, day in enumerate(days):
        for h, hour in enumerate(("07", "13", "21")):
            for p, probe in enumerate(LINES):
                i = d * 3 + h
                rtts = [18.0 + i * 0.37 + p, None if (i + p) % 4 == 0 else 19.25 + p,
                        17.5 + (i % 5) * 1.1, 20.125 - p * 0.5]
                transfers = [attempt("download", ok=(i + p) % 5 != 1,
                                     bps=(40 + 3.3 * i + p) * 1e6),
                             attempt("download", 0, 2, bps=(31 + 2.9 * i) * 1e6),
                             attempt("upload", bps=(4.5 + 0.7 * i + p) * 1e6),
                             attempt("upload", 1, 1, ok=(i + p) % 6 != 2,
                                     bps=(5.25 + 0.3 * i) * 1e6)]
                if i % 4 == 3:  # the server refused one (its capacity): not the line's
                    transfers.append(dataclasses.replace(
                        attempt("upload", 2, 1, ok=False), failure_reason="server_refused",
                        http_status=503, error="server busy"))
                result = session(probe, started_at=f"{day}T{hour}:1{p}:0{h}.250000Z",
                                 rtts=rtts, transfers=transfers)
                result = dataclasses.replace(
                    result, ping_download=ping_test([30.0 + i, None, 31.5]))
                out.append(result)
    out.append(session("rome-ftth-01", started_at="2026-03-01T11:00:00.000000Z", rtts=[],
                       transfers=[attempt("upload", ok=False)]))
    out.append(session("rome-ftth-01", started_at="2026-03-01T12:00:00.000000Z",
                       rtts=[500.0, 501.0], transfers=[attempt("download", bps=1e3)],
                       invalid=["wifi"]))
    out.append(session("milan-fwa-02", started_at="2026-02-28T12:30:00.000000Z",
                       rtts=[None], invalid=["cpu_busy"]))
    return out


@pytest.fixture
def filled(store: Store) -> Store:
    for name, line in LINES.items():
        register_probe(store, name, line)
    for r in _sessions():
        store_result(store, r)
    return store


def _export(store: Store, out: Path, scope: Scope, **options: Any) -> export_run.Summary:
    return export_run.run(store, export_run.Options(out, options.pop("fmt", "parquet"),
                                                    scope, **options))  # type: ignore[arg-type]


def _recomputed(out: Path) -> dict[str, float | int | None]:
    """Every figure of the report, from the Parquet files alone, in DuckDB's SQL:
    quantile_cont is Hyndman-Fan type 7, the targets table's percentile method."""
    db = duckdb.connect()

    def view(table: str) -> None:
        db.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet("
                   f"'{out}/{table}/*/*.parquet', hive_partitioning = true)")

    for table in ("sessions", "attempts", "pings"):
        view(table)

    def one(sql: str) -> Any:
        row = db.execute(sql).fetchone()
        assert row is not None
        return row[0]

    figures: dict[str, float | int | None] = {
        "sessions": one("SELECT count(*) FROM sessions WHERE valid")}
    for d in ("download", "upload"):
        speeds = f"FROM attempts WHERE valid AND ok AND kbps IS NOT NULL AND direction = '{d}'"
        for p in (5, 95):
            # Type 7 as Hyndman and Fan write it, h = (n - 1) p / 100 and
            # x[lo] + (h - lo)(x[lo + 1] - x[lo]): the report's arithmetic, to the bit.
            figures[f"{d}_p{p}_kbps"] = one(
                f"WITH s AS (SELECT kbps AS x, row_number() OVER (ORDER BY kbps) - 1 AS i, "
                f"count(*) OVER () AS n {speeds}), "
                f"r AS (SELECT DISTINCT (n - 1) * {p} / 100 AS h, n - 1 AS top FROM s) "
                "SELECT min(x) FILTER (WHERE i = floor(h)) + (h - floor(h)) * "
                "(min(x) FILTER (WHERE i = least(floor(h) + 1, top)) "
                "- min(x) FILTER (WHERE i = floor(h))) FROM s, r GROUP BY h")
            # DuckDB's own quantile_cont is type 7 too, interpolated as
            # x[lo] (1 - d) + x[lo + 1] d: the same value within an ulp or so.
            figures[f"{d}_p{p}_quantile_cont"] = one(
                f"SELECT quantile_cont(kbps, {p / 100}) {speeds}")
        figures[f"{d}_failure_ratio"] = one(
            "SELECT count(*) FILTER (WHERE NOT ok) / count(*) FROM attempts "
            f"WHERE valid AND NOT refused AND direction = '{d}'")
    idle = "FROM pings WHERE valid AND train = 'idle'"
    figures["delay_mean_ms"] = one(f"SELECT avg(rtt_ms / 2) {idle}")
    figures["delay_stdev_ms"] = one(f"SELECT stddev_samp(rtt_ms / 2) {idle}")
    figures["loss_ratio"] = one(f"SELECT count(*) FILTER (WHERE rtt_ms IS NULL) / count(*) "
                                f"{idle}")
    # Jitter twice: from the RTTs themselves (consecutive answered echoes of a train),
    # and from the sessions' exact integer terms.
    figures["jitter_from_pings"] = one(
        "SELECT sum(abs(rtt_ms - prev)) / count(*) FROM (SELECT rtt_ms, lag(rtt_ms) "
        "OVER (PARTITION BY session_id ORDER BY ping_index) AS prev "
        f"{idle} AND rtt_ms IS NOT NULL) WHERE prev IS NOT NULL")
    figures["jitter_mean_ms"] = one("SELECT sum(jitter_sum_ns) / sum(jitter_pairs) / 1e6 "
                                    "FROM sessions WHERE valid")
    return figures


@pytest.mark.parametrize(("probes", "since", "until"), [
    (None, None, None),
    (["rome-ftth-01"], "2026-02-28T10:00:00Z", "2026-03-02T00:00:00Z"),
])
def test_duckdb_recomputes_every_report_figure_from_the_parquet_export(
        filled: Store, tmp_path: Path, probes: list[str] | None, since: str | None,
        until: str | None) -> None:
    """DuckDB reads the hive-partitioned Parquet dataset and recomputes sessions,
    p5/p95 of both directions (exactly), failure ratios, delay mean and stdev, loss and
    jitter; they agree with service.compliance over the same scope."""
    scope = resolve_scope(probes, since, until)
    report = service.compliance(filled, scope, TABLE)
    _export(filled, tmp_path / "out", scope)
    got = _recomputed(tmp_path / "out")
    assert got["sessions"] == report.sessions > 0
    observed = {i.id: i.observed for i in (*report.indicators, *report.informational)}
    assert set(observed) >= {"download_p5_kbps", "upload_p95_kbps", "loss_ratio",
                             "jitter_mean_ms"}
    for ident in ("download_p5_kbps", "download_p95_kbps", "upload_p5_kbps",
                  "upload_p95_kbps"):
        assert got[ident] == observed[ident], ident  # to the last digit
        assert got[ident.replace("_kbps", "_quantile_cont")] == pytest.approx(
            observed[ident], rel=1e-14)
    for ident in ("download_failure_ratio", "upload_failure_ratio", "delay_mean_ms",
                  "delay_stdev_ms", "loss_ratio", "jitter_mean_ms"):
        expected = observed[ident]
        assert expected is not None and expected > 0, ident
        assert got[ident] == pytest.approx(expected, rel=1e-9), ident
    assert got["jitter_from_pings"] == pytest.approx(observed["jitter_mean_ms"], rel=1e-6)


def test_partitions_metadata_and_compression(filled: Store, tmp_path: Path) -> None:
    """One file per table and UTC month, zstd-compressed, with the export and result
    schema versions in the key/value metadata; the dictionary describes every column
    and the manifest counts every row."""
    out = tmp_path / "out"
    summary = _export(filled, out, resolve_scope(None, None, None))
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.parquet"))
    assert files == [f"{t}/month={m}/part-0.parquet" for t in ("attempts", "pings", "sessions")
                     for m in ("2026-02", "2026-03")]
    meta = pq.read_metadata(out / "sessions/month=2026-03/part-0.parquet")
    kv = {k.decode(): v.decode() for k, v in meta.metadata.items()}
    assert kv["bbprobe.export_schema_version"] == EXPORT_SCHEMA_VERSION
    assert kv["bbprobe.result_schema_version"] == str(SCHEMA_VERSION)
    assert meta.row_group(0).column(0).compression == "ZSTD"
    assert pq.read_schema(out / "pings/month=2026-02/part-0.parquet").names == list(
        names("pings"))
    doc = json.loads((out / "dictionary.json").read_text())
    assert [c["name"] for c in doc["tables"]["attempts"]["columns"]] == list(names("attempts"))
    assert all(c["meaning"] and c["method"] for t in doc["tables"].values()
               for c in t["columns"])
    assert doc["tables"]["sessions"]["rows"] == summary.rows["sessions"] == 27
    assert "| kbps | float64 | kbit/s |" in (out / "dictionary.md").read_text()


def test_csv_export_follows_the_csv_convention(filled: Store, tmp_path: Path) -> None:
    """CSV: the same layout, a header row, booleans true/false, times UTC to the second,
    and the same rows as the Parquet export."""
    scope = resolve_scope(None, None, None)
    _export(filled, tmp_path / "pq", scope)
    _export(filled, tmp_path / "csv", scope, fmt="csv")
    db = duckdb.connect()
    from_csv = db.execute(
        f"SELECT count(*), count(*) FILTER (WHERE ok = 'true') FROM "
        f"read_csv('{tmp_path}/csv/attempts/*/*.csv', all_varchar = true)").fetchone()
    first = db.execute(
        f"SELECT min(started_at) FROM "
        f"read_csv('{tmp_path}/csv/sessions/*/*.csv', all_varchar = true)").fetchone()
    from_pq = db.execute(
        f"SELECT count(*), count(*) FILTER (WHERE ok) FROM "
        f"read_parquet('{tmp_path}/pq/attempts/*/*.parquet')").fetchone()
    assert from_csv is not None and from_pq is not None
    assert from_csv == from_pq
    assert first == ("2026-02-27T07:10:00Z",)  # stored 07:10:00.250000Z
    header = (tmp_path / "csv/sessions/month=2026-02/part-0.csv").read_text().split("\n")[0]
    assert header == ",".join(names("sessions"))


def test_a_rerun_resumes_and_refresh_rewrites(filled: Store, tmp_path: Path) -> None:
    """A second run skips the finished partitions; a deleted partition is written again;
    --refresh rewrites every one; other settings in the same --out are refused."""
    out = tmp_path / "out"
    scope = resolve_scope(None, None, None)
    first = _export(filled, out, scope)
    assert len(first.written) == 6 and first.skipped == []
    again = _export(filled, out, scope)
    assert again.written == [] and len(again.skipped) == 6
    assert again.rows == first.rows
    (out / "pings/month=2026-03/part-0.parquet").unlink()
    third = _export(filled, out, scope)
    assert third.written == ["pings/month=2026-03/part-0.parquet"]
    assert pq.read_metadata(out / "pings/month=2026-03/part-0.parquet").num_rows > 0
    forced = _export(filled, out, scope, refresh=True)
    assert len(forced.written) == 6
    assert not [p for p in out.rglob("*.tmp")]
    narrower = resolve_scope(None, "2026-03-01", None)
    with pytest.raises(InputError, match="other options"):
        _export(filled, out, narrower)
    replaced = _export(filled, out, narrower, refresh=True)
    assert sorted(replaced.written) == [f"{t}/month=2026-03/part-0.parquet"
                                        for t in ("attempts", "pings", "sessions")]
    assert not (out / "sessions/month=2026-02").exists() or not any(
        (out / "sessions/month=2026-02").iterdir())


def _db_option(storage: StorageConfig) -> str:
    return storage.url if storage.backend == "postgresql" else storage.path


def test_open_data_publishes_no_raw_probe_name_nor_full_address(
        filled: Store, storage: StorageConfig, tmp_path: Path) -> None:
    """--open-data through the CLI: no raw probe name or result id in any file, only
    truncated addresses, times to the minute, error text left out; with k above the
    probes of a cell, every row is suppressed and the dictionary says how many."""
    key = tmp_path / "key"
    out = tmp_path / "open"
    got = CliRunner().invoke(main, ["export", "--db", _db_option(storage), "--out", str(out),
                                    "--open-data", "--pseudonym-key", str(key), "--k", "2"])
    assert got.exit_code == 0, got.output
    assert oct(os.stat(key).st_mode & 0o777) == "0o600"
    db = duckdb.connect()
    sessions = db.execute(f"SELECT probe_id, session_id, ping_target_address, started_at, "
                          f"client_addresses FROM read_parquet('{out}/sessions/*/*.parquet')"
                          ).fetchall()
    # k = 2 and each cell holds one probe: all suppressed.
    assert sessions == []
    doc = json.loads((out / "dictionary.json").read_text())
    assert doc["open_data"]["k"] == 2
    assert doc["open_data"]["suppressed_rows"]["sessions"] == 27
    # The same lines under one operator and region: cells of two probes, published.
    for name in LINES:
        filled.change_contract(name, {"operator": "Op A", "offer": "x", "region": "Lazio",
                                      "technology": "FTTH"}, utc_now(), utc_now(), "test")
    got = CliRunner().invoke(main, ["export", "--db", _db_option(storage), "--out",
                                    str(out), "--open-data", "--pseudonym-key", str(key),
                                    "--k", "2", "--refresh"])
    assert got.exit_code == 0, got.output
    sessions = db.execute(f"SELECT probe_id, session_id, ping_target_address, started_at "
                          f"FROM read_parquet('{out}/sessions/*/*.parquet')").fetchall()
    assert sessions and all(len(p) == 16 and len(s) == 32 for p, s, _, _ in sessions)
    assert {a for _, _, a, _ in sessions} <= {"198.18.0.0/24", None}
    assert all(t.second == 0 and t.microsecond == 0 for _, _, _, t in sessions)
    errors = db.execute(f"SELECT count(error) FROM read_parquet('{out}/attempts/*/*.parquet')"
                        ).fetchone()
    assert errors == (0,)
    raw = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    for name in LINES:
        assert name.encode() not in raw
    assert b"198.18.0.1" not in raw
    ids = [r.result_id for r in _sessions()]
    assert not any(i.encode() in raw for i in ids)


@pytest.mark.parametrize(("args", "message"), [
    (["--tables", "sessions,nope"], "--tables: expected names among"),
    (["--open-data"], "--open-data needs --pseudonym-key"),
    (["--k", "3"], "--pseudonym-key and --k apply to --open-data only"),
    (["--open-data", "--pseudonym-key", "KEY", "--k", "1"], "--k: expected an integer"),
    (["--since", "yesterday"], "since: expected an ISO 8601"),
    (["--probe", "rome-ftth-1"], "no probe named"),
])
def test_bad_options_are_one_line_errors(filled: Store, storage: StorageConfig,
                                         tmp_path: Path, args: list[str],
                                         message: str) -> None:
    """Each bad option is refused on one line naming it (exit 2), writing nothing."""
    args = [a.replace("KEY", str(tmp_path / "key")) for a in args]
    got = CliRunner().invoke(main, ["export", "--db", _db_option(storage), "--out",
                                    str(tmp_path / "out"), *args])
    assert got.exit_code == 2, got.output
    assert message in got.output
    assert len(got.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_export_of_one_table_by_metadata(filled: Store, storage: StorageConfig,
                                             tmp_path: Path) -> None:
    """--tables and the report's metadata filters: only the chosen table, only the
    chosen operator's sessions."""
    out = tmp_path / "out"
    got = CliRunner().invoke(main, ["export", "--db", _db_option(storage), "--out", str(out),
                                    "--tables", "sessions", "--operator", "op b"])
    assert got.exit_code == 0, got.output
    assert sorted(p.name for p in out.iterdir()) == ["dictionary.json", "dictionary.md",
                                                     "manifest.json", "sessions"]
    probes = duckdb.connect().execute(
        f"SELECT DISTINCT probe_id FROM read_parquet('{out}/sessions/*/*.parquet')"
    ).fetchall()
    assert probes == [("milan-fwa-02",)]


def test_the_dictionary_names_the_interval_methods() -> None:
    """dictionary.json and .md say how each report figure's 95 % interval is computed,
    with the method words a report's ci95.method uses, so an analyst can reproduce it."""
    from collector.compliance.certify import certify
    from collector.export.columns import dictionary, dictionary_markdown
    from tests.collector.test_certify import CONTRACT, campaign, facts

    doc = dictionary(["sessions"], "parquet", {}, SCHEMA_VERSION, None)
    methods = doc["interval_methods"]
    assert methods["confidence"] == 0.95
    assert set(methods) == {"confidence", "percentiles", "proportions", "delay_mean",
                            "delay_stdev", "jitter", "minimum_samples"}
    assert "Binomial(n, p/100)" in methods["percentiles"]
    assert "Wilson" in methods["proportions"]
    assert "Student t" in methods["delay_mean"]
    assert "chi-square" in methods["delay_stdev"]
    # The words match what a certificate's checks say of their own intervals.
    checks = {c.id: c.interval for c in certify("p1", CONTRACT, facts(campaign())).checks}
    assert "binomial" in checks["download_p5_kbps"].method
    assert "Wilson" in checks["loss_ratio"].method
    page = dictionary_markdown(doc)
    assert "## 95 % intervals of report figures (confidence 0.95)" in page
    assert "- proportions: failure ratios and packet loss: Wilson score" in page
