"""Reports at national scale: a synthetic fleet's semester, this tree against the previous
release in the same run, time and peak memory. Prints tables; asserts nothing.

    .venv/bin/python -m benchmarks.analytics load --dir DIR [--probes 10000] [--days 182]
        [--sessions-per-day 24] [--backend sqlite|postgresql|both] [--previous REV]
    .venv/bin/python -m benchmarks.analytics measure --dir DIR [--previous REV]

(``load`` writes the fleet once, into DIR, which ``measure`` reads as often as wanted: a
10,000-probe fleet takes about half an hour to write and tens of GB.)

Method, stated with every number:
- The fleet: ``--probes`` probes in 20 regions, 4 operators and 3 technologies, each
  with ``--sessions-per-day`` sessions a day (one every hour by default, as the
  evaluation benchmark) over ``--days`` days from 2026-01-01: 10 pings (0.5 % lost), one
  download and one upload attempt (1 % failed and retried). The rows are written straight
  into the facts tables and the day rollup, as benchmarks/evaluate.py does (the bodies are
  not read by a report). Generated with numpy, a probe at a time; the load rate is
  printed beside the ingest benchmark's (docs/benchmarks.md "Ingest at fleet speed":
  60-113 results/s per collector process): the synthetic fleet stands for that many
  collector-days of ingest.
- Operations, each in a process of its own (so its peak RSS is its own: ``wait4``'s
  ``ru_maxrss``, which includes the interpreter and the imports, about 80 MB), with the
  same code for both trees: the Allegato 2 report of the whole fleet over 2026-H1, one
  operator's report (a quarter of the probes), and the breakdown by region (20 reports).
  Each runs with this tree and with ``--previous`` (default: the last commit before issue
  28, whose reports held every speed in a Python list and sorted it), checked out with
  ``git worktree`` into a temporary directory; each run twice, the second with a warm
  page cache (the first is printed too).
- Same answer: every indicator's observed value and sample count of both trees are
  compared exactly (``repr`` of the float), and the verdict.
- The curve: one operator's report reads a quarter of the probes and the fleet report all
  of them, the same report at two fleet sizes; the line through them extrapolates to
  100,000 probes (an extrapolation, said as one). The breakdown is 20 reports of a
  twentieth each, without the coverage (as every breakdown): not a point of that line.
- PostgreSQL: the database is made by the previous release (schema as deployed today,
  unpartitioned) and measured with it; then this tree opens it (the migration to monthly
  partitions runs at open: the old tables become default partitions, no rows move) and
  is measured; with ``--migrate``, ``partitions migrate`` then moves every month into
  its partition (timed) and this tree is measured again.
- The full-file check an SQLite writer makes at open (``PRAGMA quick_check``: it reads
  all 20 GB, about 15 minutes here) is skipped by both trees: it is not part of a
  report, and this tree's analyst commands skip it (a read-only open).
- The machine is a 2-core VM shared with other work: compare the two trees' figures of the
  same run, not absolutes across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from agent.schema import format_utc
from collector.compliance.rollup import pack_speeds

ROOT = Path(__file__).resolve().parents[1]
PREVIOUS = "2c902f5"  # the last commit before issue 28
REGIONS = ("Abruzzo", "Basilicata", "Calabria", "Campania", "Emilia-Romagna",
           "Friuli-Venezia Giulia", "Lazio", "Liguria", "Lombardia", "Marche", "Molise",
           "Piemonte", "Puglia", "Sardegna", "Sicilia", "Toscana", "Trentino-Alto Adige",
           "Umbria", "Valle d'Aosta", "Veneto")


TRAINS = 64  # distinct ping trains per probe (json of each made once)

SESSION_COLUMNS = ("probe_name", "started_at", "result_id", "pings_sent", "pings_lost",
                   "rtt_n", "rtt_mean_ms", "rtt_m2", "rtts_ms", "valid", "invalid_codes",
                   "jitter_sum_ns", "jitter_pairs")
TRANSFER_COLUMNS = ("probe_name", "started_at", "result_id", "seq", "direction", "ok",
                    "kbps", "valid")
DAY_COLUMNS = ("probe_name", "day", "sessions", "pings_sent", "pings_lost", "rtt_n",
               "rtt_mean_ms", "rtt_m2", "download_attempts", "download_failed",
               "upload_attempts", "upload_failed", "download_kbps", "upload_kbps",
               "invalid_sessions", "invalid_codes", "jitter_sum_ns", "jitter_pairs")

Rows = tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]


def _trains(rng: np.random.Generator, base: float) -> list[tuple[str, int, int, float, float,
                                                                 int, int]]:
    """A probe's ping trains: (json, lost, n, mean, m2, jitter_sum_ns, jitter_pairs)."""
    out = []
    for _ in range(TRAINS):
        rtts = np.round(base + rng.exponential(2.0, 10), 3)
        lost = rng.random(10) < 0.005
        got = rtts[~lost]
        values = [None if lost[i] else float(rtts[i]) for i in range(10)]
        n = len(got)
        mean = float(got.mean()) if n else 0.0
        m2 = float(((got - mean) ** 2).sum()) if n else 0.0
        # Jitter terms (facts.jitter_terms): consecutive answered RTTs, in ns.
        ns = np.round(got * 1e6).astype(np.int64)
        diffs = np.abs(np.diff(ns))
        out.append((json.dumps(values, separators=(",", ":")), int(lost.sum()), n, mean, m2,
                    int(diffs.sum()), len(diffs)))
    return out


def fleet_rows(probes: int, days: int, per_day: int, seed: int = 7) -> Iterator[Rows]:
    """Each probe's session, transfer and day rows."""
    rng = np.random.default_rng(seed)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    step = 24 * 60 // per_day
    starts = [format_utc(start + timedelta(minutes=step * i + 7))
              for i in range(days * per_day)]
    for p in range(probes):
        name = f"probe-{p:05d}"
        trains = _trains(rng, 8 + 30 * rng.random())
        down = 20_000 + 980_000 * rng.random()
        pick = rng.integers(0, TRAINS, len(starts))
        speeds = rng.random((len(starts), 2))
        fails = rng.random((len(starts), 2)) < 0.01
        sessions: list[tuple[Any, ...]] = []
        transfers: list[tuple[Any, ...]] = []
        for i, started in enumerate(starts):
            rid = f"{p:05d}-{i:06d}"
            text, lost, n, mean, m2, jsum, jpairs = trains[pick[i]]
            sessions.append((name, started, rid, 10, lost, n, mean, m2, text, 1, "",
                             jsum, jpairs))
            seq = 0
            for d, (direction, rate) in enumerate((("download", down),
                                                   ("upload", down / 5))):
                if fails[i, d]:
                    transfers.append((name, started, rid, seq, direction, 0, None, 1))
                    seq += 1
                transfers.append((name, started, rid, seq, direction, 1,
                                  rate * (0.7 + 0.3 * float(speeds[i, d])), 1))
                seq += 1
        yield sessions, transfers, _days(sessions, transfers, per_day)


def _days(sessions: list[tuple[Any, ...]], transfers: list[tuple[Any, ...]],
          per_day: int) -> list[tuple[Any, ...]]:
    """The day rollup of one probe's rows, as the store builds it (agent.stats.Moments
    merged per day, as collector/compliance/rollup.py does)."""
    from agent.stats import Moments

    out = []
    by_day: dict[str, list[tuple[Any, ...]]] = {}
    for t in transfers:
        by_day.setdefault(t[1][:10], []).append(t)
    for i in range(0, len(sessions), per_day):
        day_sessions = sessions[i:i + per_day]
        day = day_sessions[0][1][:10]
        rtt = Moments()
        for s in day_sessions:
            rtt = rtt.merge(Moments(s[5], s[6], s[7]))
        ts = by_day.get(day, [])
        down = [t[6] for t in ts if t[4] == "download" and t[5]]
        up = [t[6] for t in ts if t[4] == "upload" and t[5]]
        d_att = sum(1 for t in ts if t[4] == "download")
        u_att = len(ts) - d_att
        out.append((day_sessions[0][0], day, len(day_sessions),
                    sum(s[3] for s in day_sessions), sum(s[4] for s in day_sessions),
                    rtt.n, rtt.mean, rtt.m2, d_att, d_att - len(down), u_att,
                    u_att - len(up), pack_speeds(down), pack_speeds(up), 0, "{}",
                    sum(s[11] for s in day_sessions), sum(s[12] for s in day_sessions)))
    return out


# The schema and the probes are made by the previous release's code (what a deployed
# collector's database is today), in a process of its own.
SETUP = r"""
import json, sys
from collector.config import StorageConfig
from collector.fleet.probes import register_probe
from collector.lines import LineMetadata
from collector.storage.sql.backends import open_store
backend, where_db, probes = sys.argv[1], sys.argv[2], int(sys.argv[3])
operators = ("BT Italia", "Op B", "Op C", "Op D")
regions = json.loads(sys.argv[4])
technologies = ("FTTH", "FTTC", "FWA")
cfg = (StorageConfig(backend="sqlite", path=where_db) if backend == "sqlite"
       else StorageConfig(backend="postgresql", url=where_db))
store = open_store(cfg)
for p in range(probes):
    register_probe(store, f"probe-{p:05d}", LineMetadata(
        operator=operators[p % 4], region=regions[(p // 4) % 20],
        technology=technologies[(p // 80) % 3], offer="Fibra 100"))
store.close()
"""


def _setup(tree: Path, backend: str, where_db: str, probes: int) -> None:
    subprocess.run([sys.executable, "-c", SETUP, backend, where_db, str(probes),
                    json.dumps(REGIONS)], cwd=tree,
                   env=dict(os.environ, PYTHONPATH=str(tree)), check=True)


def load_sqlite(path: Path, probes: int, days: int, per_day: int,
                tree: Path = ROOT) -> tuple[int, int]:
    import sqlite3

    _setup(tree, "sqlite", str(path), probes)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA foreign_keys=OFF")  # facts only: no bodies in this benchmark
    db.execute("PRAGMA synchronous=OFF")
    # No journal for the load: a WAL would hold the whole fleet (tens of GB) until its
    # checkpoint, twice the disk. The store sets WAL again when it opens the file.
    db.execute("PRAGMA journal_mode=OFF")
    n_sessions = n_transfers = 0
    db.execute("BEGIN")
    for sessions, transfers, days_ in fleet_rows(probes, days, per_day):
        for columns, table, rows in ((SESSION_COLUMNS, "session_facts", sessions),
                                     (TRANSFER_COLUMNS, "transfer_facts", transfers),
                                     (DAY_COLUMNS, "day_facts", days_)):
            db.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
                           f"({','.join('?' * len(columns))})", rows)
        n_sessions += len(sessions)
        n_transfers += len(transfers)
    db.execute("COMMIT")
    db.close()
    return n_sessions, n_transfers


def load_postgres(url: str, probes: int, days: int, per_day: int,
                  tree: Path = ROOT) -> None:
    import psycopg

    _setup(tree, "postgresql", url, probes)
    with psycopg.connect(url, autocommit=True) as conn:
        for table in ("session_facts", "transfer_facts"):
            conn.execute(f"ALTER TABLE {table} DROP CONSTRAINT IF EXISTS "
                         f"{table}_result_id_fkey")
        with conn.transaction(), conn.cursor() as cur:
            for sessions, transfers, days_ in fleet_rows(probes, days, per_day):
                for columns, table, rows in ((SESSION_COLUMNS, "session_facts", sessions),
                                             (TRANSFER_COLUMNS, "transfer_facts", transfers),
                                             (DAY_COLUMNS, "day_facts", days_)):
                    with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                        for row in rows:
                            copy.write_row(row)
        conn.execute("VACUUM ANALYZE")


# One operation in a fresh interpreter, with the code of whichever tree is on sys.path:
# only calls that both trees have.
RUNNER = r"""
import json, sys, time
from collector.compliance import targets
from collector.config import StorageConfig
from collector.reports import service
from collector.reports.text import report_dict
from collector.scope import resolve_scope
from collector.storage.sql.backends import open_store
backend, where_db, op = sys.argv[1:4]
cfg = (StorageConfig(backend="sqlite", path=where_db) if backend == "sqlite"
       else StorageConfig(backend="postgresql", url=where_db))
# The full-file integrity check a writer makes at open (15 min on this 20 GB file) is
# not part of a report: both trees skip it here (this tree's analyst commands skip it).
import sqlite3
class NoFullCheck(sqlite3.Connection):
    def execute(self, sql, *args):
        if sql == "PRAGMA quick_check":
            return super().execute("SELECT 'ok'")
        return super().execute(sql, *args)
connect = sqlite3.connect
sqlite3.connect = lambda *a, **kw: connect(*a, factory=NoFullCheck, **kw)
store = open_store(cfg)
table = targets.load("")
started = time.perf_counter()
def figures(report):
    return {"sessions": report.sessions, "verdict": report.verdict,
            "indicators": [(i.id, repr(i.observed), i.samples)
                           for i in (*report.indicators, *report.informational)]}
if op == "fleet":
    out = figures(service.compliance(store, resolve_scope(None, None, None, "2026-H1"), table))
elif op == "operator":
    where = resolve_scope(None, None, None, "2026-H1", filters={"operator": "BT Italia"},
                          known=store.probes)
    out = figures(service.compliance(store, where, table))
else:
    parts = service.breakdown(store, resolve_scope(None, None, None, "2026-H1"), table,
                              ["region"])
    out = {key["region"]: figures(report) for key, _scope, report in parts}
print(json.dumps({"s": time.perf_counter() - started, "out": out}))
"""


def run_op(tree: Path, backend: str, where_db: str, op: str) -> tuple[float, float, Any]:
    """(seconds inside the process, peak RSS MB, the figures) of one operation."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, backend, where_db, op],
                            cwd=tree, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    text = proc.stdout.read()
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{op} on {backend} with {tree} failed ({proc.returncode})")
    got = json.loads(text.strip().splitlines()[-1])
    return got["s"], usage.ru_maxrss / 1024, got["out"]


OPERATIONS = (("fleet", "Allegato 2 report, all probes, 2026-H1"),
              ("operator", "one operator (1/4 of the probes)"),
              ("region", "breakdown by region (20 reports)"))


Cells = dict[str, dict[str, tuple[float, float, float, Any]]]


def compare(label_: str, backend: str, where_db: str, trees: dict[str, Path]) -> Cells:
    """Each operation twice per tree: {op: {tree: (1st s, 2nd s, peak MB, figures)}}."""
    got: Cells = {}
    print(f"\n{label_}: {'operation':<40} " + " ".join(
        f"{name + ' s (1st/2nd)':>22} {name + ' MB':>12}" for name in trees)
        + f" {'time new/old':>12} {'RSS new/old':>12} same")
    for op, label in OPERATIONS:
        cells, figures = {}, {}
        for name, tree in trees.items():
            first = run_op(tree, backend, where_db, op)
            second = run_op(tree, backend, where_db, op)
            cells[name] = (first[0], second[0], max(first[1], second[1]))
            figures[name] = second[2]
            got.setdefault(op, {})[name] = (*cells[name], second[2])
        names = list(trees)
        line = " ".join(f"{cells[n][0]:>10.2f}/{cells[n][1]:<11.2f} {cells[n][2]:>12.0f}"
                        for n in names)
        ratio = ""
        if len(names) == 2:
            new, old = cells[names[0]], cells[names[1]]
            ratio = f" {new[1] / old[1]:>12.2f} {new[2] / old[2]:>12.2f} " + (
                "yes" if figures[names[0]] == figures[names[1]] else "NO")
        print(f"{'':>{len(label_) + 1}} {label:<40} {line}{ratio}", flush=True)
    return got


def _same(a: Cells, b: Cells, name_a: str, name_b: str) -> str:
    return ", ".join(f"{op} {'yes' if a[op][name_a][3] == b[op][name_b][3] else 'NO'}"
                     for op in a)


def _migrate_months(url: str) -> float:
    """``partitions migrate`` of every month, with this tree; seconds."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "collector", "partitions", "migrate", "--db", url,
                    "--months", "10000"], cwd=ROOT, check=True)
    return time.perf_counter() - started


def _worktree(rev: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), rev],
                   check=True, capture_output=True)
    return where


def _drop_worktree(where: Path) -> None:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(where)],
                   check=False, capture_output=True)
    shutil.rmtree(where, ignore_errors=True)


def load(args: argparse.Namespace) -> None:
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"probes": args.probes, "days": args.days, "per_day": args.sessions_per_day,
            "backend": args.backend, "previous": args.previous}
    with tempfile.TemporaryDirectory(prefix="bbprobe-analytics-") as tmp:
        old = _worktree(args.previous, Path(tmp) / "previous")
        try:
            if args.backend in ("sqlite", "both"):
                started = time.perf_counter()
                n_sessions, n_transfers = load_sqlite(
                    out / "fleet.sqlite3", args.probes, args.days, args.sessions_per_day, old)
                load_s = time.perf_counter() - started
                meta.update(sessions=n_sessions, attempts=n_transfers, sqlite_load_s=load_s,
                            sqlite_mb=(out / "fleet.sqlite3").stat().st_size / 1e6)
                print(f"SQLite: {n_sessions:,} sessions, {n_transfers:,} attempts, "
                      f"{meta['sqlite_mb']:,.0f} MB, loaded in {load_s:.0f} s "
                      f"({n_sessions / load_s:,.0f} sessions/s)", flush=True)
            if args.backend in ("postgresql", "both"):
                from tests import pg

                with pg.cluster(durable=True, keep=out / "pg") as cluster:
                    name = cluster.create_database()
                    started = time.perf_counter()
                    load_postgres(cluster.url(name), args.probes, args.days,
                                  args.sessions_per_day, old)
                    meta.update(pg_database=name, pg_load_s=time.perf_counter() - started)
                    print(f"PostgreSQL loaded in {meta['pg_load_s']:.0f} s", flush=True)
        finally:
            _drop_worktree(old)
    (out / "fleet.json").write_text(json.dumps(meta, indent=2) + "\n")


def _curve(points: list[tuple[int, float, float]]) -> None:
    xs = np.array([p[0] for p in points], dtype=float)
    for label, ys in (("s", np.array([p[1] for p in points])),
                      ("MB", np.array([p[2] for p in points]))):
        slope, icpt = np.polyfit(xs, ys, 1)
        print(f"  least squares over {len(points)} sizes: {label} = {icpt:.1f} + "
              f"{slope * 1000:.3f} per 1,000 probes; 100,000 probes extrapolate to "
              f"{icpt + slope * 100_000:,.0f} {label}")


def measure(args: argparse.Namespace) -> None:
    out = Path(args.dir)
    meta = json.loads((out / "fleet.json").read_text())
    probes = meta["probes"]
    print(f"Fleet: {probes:,} probes x {meta['days']} days x {meta['per_day']} sessions "
          f"= {meta.get('sessions', 0):,} sessions, {meta.get('attempts', 0):,} attempts; "
          f"previous release {meta['previous']}; Python {sys.version.split()[0]}", flush=True)
    sizes = {"operator": probes / 4, "fleet": probes}
    with tempfile.TemporaryDirectory(prefix="bbprobe-analytics-") as tmp:
        old = _worktree(meta["previous"], Path(tmp) / "previous")
        try:
            lite: Cells | None = None
            if (out / "fleet.sqlite3").exists():
                got = lite = compare("SQLite", "sqlite", str(out / "fleet.sqlite3"),
                              {"new": ROOT, "old": old})
                print("SQLite curve (this tree, warm):")
                _curve([(int(sizes[op]), got[op]["new"][1], got[op]["new"][2])
                        for op in ("operator", "fleet")])
            if (out / "pg").exists():
                from tests import pg

                with pg.cluster(durable=True, keep=out / "pg") as cluster:
                    url = cluster.url(meta["pg_database"])
                    before = compare("PostgreSQL, previous release", "postgresql", url,
                                     {"old": old})
                    unmoved = compare("PostgreSQL, this tree (months in the default "
                                      "partition)", "postgresql", url, {"new": ROOT})
                    print("same figures as the previous release: "
                          + _same(unmoved, before, "new", "old"))
                    got = unmoved
                    if args.migrate:
                        print(f"partitions migrate, every month: "
                              f"{_migrate_months(url):.0f} s", flush=True)
                        got = compare("PostgreSQL, this tree (partitioned)", "postgresql",
                                      url, {"new": ROOT})
                    print("same figures as the previous release: "
                          + _same(got, before, "new", "old"))
                    if lite is not None:
                        print("same figures as SQLite: " + _same(got, lite, "new", "new"))
                    print("PostgreSQL curve (this tree, warm):")
                    _curve([(int(sizes[op]), got[op]["new"][1], got[op]["new"][2])
                            for op in ("operator", "fleet")])
        finally:
            _drop_worktree(old)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    loading = sub.add_parser("load")
    loading.add_argument("--dir", required=True)
    loading.add_argument("--probes", type=int, default=10_000)
    loading.add_argument("--days", type=int, default=182)
    loading.add_argument("--sessions-per-day", type=int, default=24)
    loading.add_argument("--backend", choices=["sqlite", "postgresql", "both"],
                         default="both")
    loading.add_argument("--previous", default=PREVIOUS)
    measuring = sub.add_parser("measure")
    measuring.add_argument("--dir", required=True)
    measuring.add_argument("--migrate", action="store_true",
                           help="then move every month into its partition and measure "
                                "again (copies the whole fleet: long at 10,000 probes)")
    args = parser.parse_args()
    (load if args.what == "load" else measure)(args)


if __name__ == "__main__":
    main()
