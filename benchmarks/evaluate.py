"""How fast the collector evaluates: one line's campaign, and a fleet's semester.
Prints tables; asserts nothing.

    .venv/bin/python -m benchmarks.evaluate line [--repeat 30]
    .venv/bin/python -m benchmarks.evaluate fleet [--probes 1000] [--days 182]

Method, stated with every number:
- line: a real SQLite store holding one probe's 96-in-24-h campaign, ingested as the API
  does (10 pings, a download and an upload per session, per-stream samples every 100 ms);
  the line certificate and the operator-level report for that probe, each timed end to
  end (query + evaluation) over ``--repeat`` runs, median and max; beside them, the same
  evaluation by decoding every stored JSON body (what the collector did before the facts
  tables), to show what the facts buy.
- fleet: ``--probes`` probes x ``--days`` days x 24 hourly sessions written straight into
  the facts tables (the bodies are not needed to evaluate, and 4.4 million of them would
  be ~90 GB); synthetic but shaped like real lines (10 RTTs around a per-probe base, 0.5 %
  lost; one download and one upload attempt, 1 % failed and retried). Timed: the
  Allegato 2 report over all probes, over a quarter of them selected by operator, and one
  probe's certificate over the last day; each run twice (the second with a warm page
  cache, the usual case on a collector that is in use). ``--backend both`` (default)
  loads the same rows into a PostgreSQL cluster of its own (tests/pg.py, fsync on,
  default settings but shared_buffers 128 MB; COPY, then VACUUM ANALYZE) and runs the
  same operations there, with the ratio of the warm runs.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agent.decoding import parse_result
from agent.schema import format_utc
from agent.stats import Moments
from collector.compliance import targets
from collector.compliance.evaluate import evaluate, observe
from collector.compliance.facts import jitter_terms
from collector.compliance.rollup import pack_speeds
from collector.config import StorageConfig
from collector.fleet.probes import register_probe
from collector.lines import LineMetadata
from collector.reports import service
from collector.reports.text import report_dict
from collector.scope import resolve_scope
from collector.storage.sql.backends import open_store
from collector.storage.sql.sqlite import SqliteStore
from collector.storage.store import Store

ROOT = Path(__file__).resolve().parents[1]
TABLE = targets.load("")
LINE = LineMetadata(operator="BT Italia", offer="Fibra 100", download_min_kbps=30_000,
                    upload_min_kbps=5_000, max_delay_ms=50, max_loss_ratio=0.01)


def _timed(fn: Callable[[], object], repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return times


def _row(label: str, times: list[float]) -> str:
    return f"{label:<52} {statistics.median(times):>9.2f} {max(times):>9.2f}"


def line(repeat: int) -> None:
    from tests.factories import attempt_with_samples, session

    with tempfile.TemporaryDirectory(prefix="bbprobe-bench-") as tmp:
        store = SqliteStore(Path(tmp) / "c.sqlite3")
        register_probe(store, "line-1", LINE)
        start = datetime(2026, 1, 14, 23, 0, tzinfo=UTC)
        rng = random.Random(1)
        from tests.factories import store_result

        for i in range(96):
            moment = format_utc(start + timedelta(minutes=15 * i))
            store_result(store, session(
                "line-1", started_at=moment,
                rtts=[rng.gauss(18, 2) for _ in range(10)],
                transfers=[attempt_with_samples("download", rng.gauss(90e6, 5e6), streams=4),
                           attempt_with_samples("upload", rng.gauss(18e6, 1e6), streams=4)]))
        body_kb = sum(len(r.body) for r in store.results()) / 96 / 1024
        where = resolve_scope(["line-1"], None, None)
        cert = _timed(lambda: service.certificate(store, "line-1", None, None, "96in24h",
                                                  "Europe/Rome"), repeat)
        report = _timed(lambda: service.compliance(store, where, TABLE), repeat)
        decoded = _timed(lambda: evaluate(observe(
            parse_result(json.loads(r.body)) for r in service.stored_results(store, where)),
            TABLE), repeat)
        verdict = service.certificate(store, "line-1", None, None, "96in24h", "Europe/Rome")
        store.close()
    print(f"One line, 96 sessions in 24 h, stored bodies {body_kb:.1f} KiB each; "
          f"{repeat} runs; Python {sys.version.split()[0]}")
    print(f"{'operation':<52} {'median ms':>9} {'max ms':>9}")
    print(_row("line certificate (facts query + certify)", cert))
    print(_row("Allegato 2 report for the probe (facts)", report))
    print(_row("same report by decoding every body (before)", decoded))
    print(f"certificate verdict: {verdict.verdict}, bands complete: {verdict.complete}")


def _fleet_rows(probes: int, days: int, seed: int = 7):  # type: ignore[no-untyped-def]
    rng = random.Random(seed)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    hours = [format_utc(start + timedelta(hours=h, minutes=7)) for h in range(days * 24)]
    for p in range(probes):
        name = f"probe-{p:04d}"
        base_rtt = 8 + 30 * rng.random()
        down = 20_000 + 80_000 * rng.random()
        up = down / 5
        sessions = []
        transfers = []
        for h, started in enumerate(hours):
            rid = f"{p:04d}-{h:06d}"
            rtts = [None if rng.random() < 0.005 else round(base_rtt + rng.expovariate(0.5), 3)
                    for _ in range(10)]
            got = [r for r in rtts if r is not None]
            m = Moments.of(got)
            sessions.append((name, started, rid, 10, 10 - len(got), m.n, m.mean, m.m2,
                             json.dumps(rtts, separators=(",", ":")), 1, "",
                             *jitter_terms(rtts)))
            seq = 0
            for direction, rate in (("download", down), ("upload", up)):
                if rng.random() < 0.01:
                    transfers.append((name, started, rid, seq, direction, 0, None, 1))
                    seq += 1
                transfers.append((name, started, rid, seq, direction, 1,
                                  rate * (0.7 + 0.3 * rng.random()), 1))
                seq += 1
        yield name, sessions, transfers, _day_rows(sessions, transfers)


def _day_rows(sessions: list[tuple[Any, ...]],
              transfers: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The day rollup of one probe's rows, as the store builds it (valid sessions)."""
    days: dict[str, dict[str, Any]] = {}
    for name, started, _rid, sent, lost, n, mean, m2, *_, jsum, jpairs in sessions:
        d = days.setdefault(started[:10], {"name": name, "sessions": 0, "sent": 0, "lost": 0,
                                           "rtt": Moments(), "down": [], "up": [],
                                           "d_att": 0, "d_fail": 0, "u_att": 0, "u_fail": 0,
                                           "jsum": 0.0, "jpairs": 0})
        d["jsum"] += jsum
        d["jpairs"] += jpairs
        d["sessions"] += 1
        d["sent"] += sent
        d["lost"] += lost
        d["rtt"] = d["rtt"].merge(Moments(n, mean, m2))
    for _name, started, _rid, _seq, direction, ok, kbps, _valid in transfers:
        d = days[started[:10]]
        key = "d" if direction == "download" else "u"
        d[f"{key}_att"] += 1
        d[f"{key}_fail"] += not ok
        if ok:
            d["down" if key == "d" else "up"].append(kbps)
    return [(d["name"], day, d["sessions"], d["sent"], d["lost"], d["rtt"].n, d["rtt"].mean,
             d["rtt"].m2, d["d_att"], d["d_fail"], d["u_att"], d["u_fail"],
             pack_speeds(d["down"]), pack_speeds(d["up"]), 0, "{}", d["jsum"], d["jpairs"])
            for day, d in sorted(days.items())]


FACT_TABLES = {
    "session_facts": ("probe_name", "started_at", "result_id", "pings_sent", "pings_lost",
                      "rtt_n", "rtt_mean_ms", "rtt_m2", "rtts_ms", "valid", "invalid_codes",
                      "jitter_sum_ns", "jitter_pairs"),
    "transfer_facts": ("probe_name", "started_at", "result_id", "seq", "direction", "ok",
                       "kbps", "valid"),
    "day_facts": ("probe_name", "day", "sessions", "pings_sent", "pings_lost", "rtt_n",
                  "rtt_mean_ms", "rtt_m2", "download_attempts", "download_failed",
                  "upload_attempts", "upload_failed", "download_kbps", "upload_kbps",
                  "invalid_sessions", "invalid_codes", "jitter_sum_ns", "jitter_pairs"),
}


def _register(store: Store, probes: int) -> None:
    for p in range(probes):
        operator = ("BT Italia", "Op B", "Op C", "Op D")[p % 4]
        register_probe(store, f"probe-{p:04d}", LineMetadata(operator=operator))


def _load_sqlite(path: Path, probes: int, days: int) -> tuple[int, int]:
    import sqlite3

    store = SqliteStore(path)
    _register(store, probes)
    store.close()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA foreign_keys=OFF")  # facts only: no bodies in this benchmark
    db.execute("PRAGMA synchronous=OFF")
    n_sessions = n_transfers = 0
    db.execute("BEGIN")
    for _name, sessions, transfers, day_rows in _fleet_rows(probes, days):
        for table, rows in zip(FACT_TABLES, (sessions, transfers, day_rows), strict=True):
            marks = ",".join("?" * len(FACT_TABLES[table]))
            db.executemany(f"INSERT INTO {table} ({', '.join(FACT_TABLES[table])}) "
                           f"VALUES ({marks})", rows)
        n_sessions += len(sessions)
        n_transfers += len(transfers)
    db.execute("COMMIT")
    db.close()
    return n_sessions, n_transfers


def _load_postgres(url: str, probes: int, days: int) -> None:
    """The same rows into PostgreSQL, with COPY (foreign keys dropped: no bodies)."""
    import psycopg

    store = open_store(StorageConfig(backend="postgresql", url=url))
    _register(store, probes)
    store.close()
    with psycopg.connect(url, autocommit=True) as conn:
        for table in ("session_facts", "transfer_facts"):
            conn.execute(f"ALTER TABLE {table} DROP CONSTRAINT IF EXISTS "
                         f"{table}_result_id_fkey")
        with conn.transaction(), conn.cursor() as cur:
            for _name, sessions, transfers, day_rows in _fleet_rows(probes, days):
                for table, rows in zip(FACT_TABLES, (sessions, transfers, day_rows),
                                       strict=True):
                    with cur.copy(f"COPY {table} ({', '.join(FACT_TABLES[table])}) "
                                  "FROM STDIN") as copy:
                        for row in rows:
                            copy.write_row(row)
        conn.execute("VACUUM ANALYZE")


def _measure(store: Store, days: int) -> tuple[list[tuple[str, list[float]]], Any, float,
                                                bool]:
    everyone = resolve_scope(None, None, None, "2026-H1")
    operator = resolve_scope(None, None, None, "2026-H1", filters={"operator": "BT Italia"},
                             known=store.probes)
    last_day = format_utc(datetime(2026, 1, 1, tzinfo=UTC) + timedelta(days=days - 1))
    rows = []
    for label, fn in (
        ("Allegato 2 report, all probes, 2026-H1", lambda: service.compliance(
            store, everyone, TABLE)),
        ("Allegato 2 report, operator = BT Italia (1/4)", lambda: service.compliance(
            store, operator, TABLE)),
        ("Allegato 2 report, all probes, mid-day bounds", lambda: service.compliance(
            store, resolve_scope(None, "2026-01-01T12:00:00Z", "2026-06-30T12:00:00Z"),
            TABLE)),
        ("one probe's certificate, last 24 h", lambda: service.certificate(
            store, "probe-0001", last_day, None, "96in24h", "Europe/Rome")),
    ):
        rows.append((label, _timed(fn, 2)))
    report = service.compliance(store, everyone, TABLE)
    # The same scope from the session rows alone (include_invalid takes that path; no
    # session is invalid here): the before/after of the day rollup, and a cross-check.
    started = time.perf_counter()
    slow = service.compliance(store, everyone, TABLE, include_invalid=True)
    slow_s = time.perf_counter() - started
    agree = all(
        a.samples == b.samples and (a.observed == b.observed or (
            a.observed is not None and b.observed is not None
            and abs(a.observed - b.observed) <= 1e-9 * abs(b.observed)))
        for a, b in zip((*report.indicators, *report.informational),
                        (*slow.indicators, *slow.informational), strict=True))
    return rows, report, slow_s, agree


def fleet(probes: int, days: int, backends: tuple[str, ...]) -> None:
    results: dict[str, tuple[list[tuple[str, list[float]]], Any, float, bool, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bbprobe-bench-") as tmp:
        path = Path(tmp) / "c.sqlite3"
        loaded = time.perf_counter()
        n_sessions, n_transfers = _load_sqlite(path, probes, days)
        load_s = time.perf_counter() - loaded
        size_mb = path.stat().st_size / 1e6
        if "sqlite" in backends:
            store = SqliteStore(path)
            results["SQLite"] = (*_measure(store, days), load_s)
            store.close()
        if "postgresql" in backends:
            from tests import pg

            with pg.cluster(durable=True) as cluster:
                url = cluster.url(cluster.create_database())
                loaded = time.perf_counter()
                _load_postgres(url, probes, days)
                pg_load_s = time.perf_counter() - loaded
                store = open_store(StorageConfig(backend="postgresql", url=url))
                pg_size_mb = store.size_bytes() / 1e6
                results["PostgreSQL"] = (*_measure(store, days), pg_load_s)
                store.close()
    print(f"Fleet: {probes} probes x {days} days x 24 sessions = {n_sessions:,} sessions, "
          f"{n_transfers:,} transfer attempts, {n_sessions * 10:,} pings; SQLite facts "
          f"database {size_mb:,.0f} MB" + (f", PostgreSQL {pg_size_mb:,.0f} MB"
                                            if "PostgreSQL" in results else ""))
    names = list(results)
    header = " ".join(f"{n + ' 1st s':>15} {n + ' 2nd s':>15}" for n in names)
    ratio = len(names) == 2
    print(f"{'operation':<48} {header}" + (f" {'PG/SQLite':>9}" if ratio else ""))
    for i, (label, _) in enumerate(results[names[0]][0]):
        cells = " ".join(f"{results[n][0][i][1][0] / 1000:>15.2f} "
                         f"{results[n][0][i][1][1] / 1000:>15.2f}" for n in names)
        extra = ""
        if ratio:
            a, b = (results[n][0][i][1][1] for n in names)
            extra = f" {b / a:>9.2f}"
        print(f"{label:<48} {cells}{extra}")
    slow = " ".join(f"{results[n][2]:>31.2f}" for n in names)
    print(f"{'same report from session rows only (no rollup)':<48} {slow}")
    for n in names:
        _rows, report, _slow, agree, loaded_s = results[n]
        print(f"{n}: report of {report.sessions:,} sessions, verdict {report.verdict}; "
              f"rollup and session rows agree: {'yes' if agree else 'NO'}; "
              f"loaded in {loaded_s:.0f} s")
    if ratio:
        same = [json.dumps(report_dict(results[n][1], resolve_scope(None, None, None,
                                                                     "2026-H1")))
                for n in names]
        print(f"reports identical on both backends: {'yes' if same[0] == same[1] else 'NO'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    one = sub.add_parser("line")
    one.add_argument("--repeat", type=int, default=30)
    many = sub.add_parser("fleet")
    many.add_argument("--probes", type=int, default=1000)
    many.add_argument("--days", type=int, default=182)
    many.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    args = parser.parse_args()
    if args.what == "line":
        line(args.repeat)
    else:
        fleet(args.probes, args.days, ("sqlite", "postgresql") if args.backend == "both"
              else (args.backend,))


if __name__ == "__main__":
    main()
