"""What the Prometheus metrics cost the collector, against references in the same run.
Prints tables; asserts nothing.

    .venv/bin/python -m benchmarks.metrics [--seconds 15] [--clients 16] [--rounds 2]
                                           [--probes 1000] [--results 10] [--repeat 30]

Method, stated with every number:
- **Ingest with and without metrics.** One collector process at a time (``python -m
  collector serve``, SQLite, WAL, synchronous=FULL, rate limits off), with
  ``[metrics] enabled`` true, then false, alternated for ``--rounds`` rounds each so that
  drift of the machine falls on both. Load as benchmarks/ingest.py: ``--clients``
  aiohttp clients, a new connection per request, each posting the same real ``quick``
  session (the agent measured it against this collector) with a fresh id, for
  ``--seconds`` after a 3 s warm-up. Reported: results/s acknowledged (201) in the
  window, the collector's CPU time (user + system, /proc) per 1,000 results, and the
  ratio of the means, on / off.
- **A scrape against the reads it resembles.** ``--probes`` probes, each with
  ``--results`` stored results and a health report (benchmarks/fleet.py's database),
  one collector, reads open, ``min_interval_s = 0`` (every scrape reads the database):
  ``GET /metrics`` ``--repeat`` times, one after the other, a new connection each,
  against ``GET /api/v1/probes`` (the same probes' metadata) and ``GET /api/v1/fleet``
  (the fleet view, which the scrape's fleet gauges share). Then the same collector with
  the default ``min_interval_s = 5``: repeated scrapes get the cached body. Median and
  90th percentile of the client's wall time; ratio of medians to ``/api/v1/probes``;
  the body's size and series count. And one evaluation of the alerter (what its
  triggers read: fleet rows, health reports, contracted lines' newest sessions), in the
  benchmark's own process against the same database, ``--repeat`` times.
- The load generator shares the 2-core VM with the collector: compare ratios, not
  absolutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from benchmarks.fleet import fill, timed
from benchmarks.ingest import Backend, collector, load, real_documents
from collector.alerts.worker import evaluate
from collector.config import CollectorConfig, StorageConfig
from collector.server.testing import serve_process
from collector.storage.sql.backends import open_store
from tests.httpclient import request

ROOT = Path(__file__).resolve().parents[1]


def ingest_rows(work: Path, body: bytes, rounds: int, clients: int,
                seconds: float) -> dict[str, list[tuple[float, float]]]:
    """{"on"/"off": [(results/s, CPU s per 1,000 results), ...]}"""
    out: dict[str, list[tuple[float, float]]] = {"on": [], "off": []}
    for _ in range(rounds):
        for variant in ("on", "off"):
            extra = f"[metrics]\nenabled = {'true' if variant == 'on' else 'false'}\n"
            with collector(ROOT, work, Backend("sqlite"), extra) as (url, token, pid, _):
                ok, errors, cpu = asyncio.run(load(url, token, body, clients, seconds, pid))
            if errors:
                print(f"  ({variant}: {errors} errors)")
            out[variant].append((ok / seconds, cpu / ok * 1000 if ok else float("nan")))
    return out


def scrape_rows(work: Path, probes: int, results: int, repeat: int
                ) -> tuple[list[tuple[str, tuple[float, float]]], int, int]:
    db = work / "scrape.sqlite3"
    base = ('[server]\nhost = "127.0.0.1"\nport = 0\nquery_auth = false\n'
            f'probe_requests_per_min = 0\n[storage]\npath = "{db}"\n')
    config = work / "scrape.toml"
    config.write_text(base + "[metrics]\nmin_interval_s = 0.0\n")
    rows = []
    with serve_process(config, cwd=ROOT) as (url, _):
        measured = subprocess.run(
            [sys.executable, "-m", "agent", "--server", url, "--set", "profile=quick",
             "--set", f"state_dir={work / 'state'}", "run", "--no-push", "--json",
             "--quiet"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120)
        fill(db, json.loads(measured.stdout), probes, results, 0)
        rows.append(("GET /api/v1/probes (reference)",
                     timed(repeat, "GET", url + "/api/v1/probes")))
        rows.append(("GET /api/v1/fleet", timed(repeat, "GET", url + "/api/v1/fleet")))
        rows.append(("GET /metrics (database read)", timed(repeat, "GET", url + "/metrics")))
        body = request("GET", url + "/metrics", raw=True)[1]
        rows.append(("alert evaluation (one tick)", _evaluation(db, repeat)))
    cached = work / "cached.toml"
    cached.write_text(base)
    with serve_process(cached, cwd=ROOT) as (url, _):
        request("GET", url + "/metrics", raw=True)
        rows.append(("GET /metrics (cached, 5 s)", timed(repeat, "GET", url + "/metrics")))
    series = sum(len(f.samples) for f in text_string_to_metric_families(body.decode()))
    return rows, len(body), series


def _evaluation(db: Path, repeat: int) -> tuple[float, float]:
    """(median, p90) ms of one alerter evaluation over the database, in this process:
    what every collector process spends each alerts.interval_s."""
    store = open_store(StorageConfig(path=str(db)))
    cfg = CollectorConfig()
    try:
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            evaluate(store, cfg, datetime.now(UTC), False, {})
            times.append((time.perf_counter() - t0) * 1000)
    finally:
        store.close()
    times.sort()
    return statistics.median(times), times[int(0.9 * (len(times) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--probes", type=int, default=1000)
    parser.add_argument("--results", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bbprobe-metrics-bench-") as tmp:
        work = Path(tmp)
        docs = real_documents(work)
        name, body = next((k, v) for k, v in docs.items() if k.startswith("quick"))
        t0 = time.perf_counter()
        ingest = ingest_rows(work, body, args.rounds, args.clients, args.seconds)
        took = time.perf_counter() - t0
        rows, size, series = scrape_rows(work, args.probes, args.results, args.repeat)
    print(f"Ingest, {name}, {args.clients} clients, {args.seconds:g} s x {args.rounds} "
          f"rounds each ({took:.0f} s)")
    print(f"{'metrics':<10} {'results/s':>18} {'CPU s/1000':>18}")
    means = {}
    for variant, runs in ingest.items():
        rate = statistics.fmean(r for r, _ in runs)
        cpu = statistics.fmean(c for _, c in runs)
        means[variant] = (rate, cpu)
        print(f"{variant:<10} {rate:>8.1f} ({', '.join(f'{r:.0f}' for r, _ in runs)})"
              f" {cpu:>8.2f} ({', '.join(f'{c:.2f}' for _, c in runs)})")
    print(f"{'on / off':<10} {means['on'][0] / means['off'][0]:>18.3f} "
          f"{means['on'][1] / means['off'][1]:>18.3f}")
    print()
    print(f"Scrape, {args.probes} probes x {args.results} results; body {size / 1024:.0f} "
          f"KiB, {series} samples; {args.repeat} requests each, one at a time")
    print(f"{'request':<34} {'median ms':>10} {'p90 ms':>8} {'ratio':>7}")
    reference = rows[0][1][0]
    for label, (med, p90) in rows:
        print(f"{label:<34} {med:>10.1f} {p90:>8.1f} {med / reference:>7.2f}")


if __name__ == "__main__":
    main()
