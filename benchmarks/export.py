"""The analysts' export (collector/export/) on sessions with real bodies: rows/s,
sessions/s and peak RSS for Parquet, CSV and open data. Prints a table; asserts nothing.

    .venv/bin/python -m benchmarks.export [--probes 20] [--days 30] [--sessions-per-day 24]
        [--dir DIR]

Method, stated with every number:
- The store: a SQLite file (in ``--dir``, or a temporary directory removed at the end)
  written through the store's own ``insert_results``, the ingest path, with bodies built
  as the tests build them (tests/factories.py): each session has an idle train of 10
  pings (one lost in 20), loaded ping trains during the download and the upload (60
  echoes each: 12 s at spec LOADED_PING_INTERVAL_S = 0.2 s), and one download and one
  upload attempt of 4 streams sampled every 0.1 s for 12 s (``attempt_with_samples``),
  so bodies are the size a real agent sends (the stream samples are stored, and left out
  by the export's read: codec.without_samples), packed as ingest packs them (codec.pack).
  ``--probes`` probes in 2 cells of line metadata (from 10 probes, each cell holds k = 5
  and open data publishes; below, it suppresses), ``--sessions-per-day`` sessions a day
  each over ``--days`` days from 2026-01-01.
- Each export runs in a process of its own (``python -c``), the whole scope into a fresh
  directory; the time is measured inside it (perf_counter around ``export.run.run``,
  imports excluded), the peak RSS by the parent with ``os.wait4``'s ``ru_maxrss`` (the
  whole process: interpreter, imports and pyarrow included, about 80-100 MB before any
  row). rows/s counts the rows of all three tables written (plus, open data, those
  suppressed, which are read and made too).
- The machine is a 2-core VM shared with other work: compare the rows of one run, not
  absolutes across runs; run it at two sizes to see that peak RSS does not grow with
  the number of sessions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent.schema import format_utc
from collector.config import StorageConfig
from collector.fleet.probes import register_probe
from collector.intake import ingest
from collector.lines import LineMetadata
from collector.storage.model import NewResult
from collector.storage.sql.backends import open_store
from tests.factories import attempt_with_samples, canonical_json, ping_test, session

ROOT = Path(__file__).resolve().parents[1]
CELLS = [LineMetadata(operator=f"Op {c}", offer="Fibra", region="Lazio", technology="FTTH")
         for c in "AB"]
LOADED = 60  # echoes per loaded train: 12 s at 0.2 s
VARIANTS = 8  # distinct transfer pairs per probe (bodies differ by speed)
BATCH = 200  # results per insert transaction

RUNNER = r"""
import json, sys, time
from pathlib import Path
from collector.config import StorageConfig
from collector.export import run
from collector.scope import resolve_scope
from collector.storage.sql.backends import open_store
db, out, fmt, open_data = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
store = open_store(StorageConfig(path=db))
started = time.perf_counter()
summary = run.run(store, run.Options(Path(out), fmt, resolve_scope(None, None, None),
                                     open_data=open_data, key=bytes(32) if open_data else None))
print(json.dumps({"s": time.perf_counter() - started, "rows": summary.rows,
                  "suppressed": summary.suppressed}))
"""


def fill(db: Path, probes: int, days: int, per_day: int) -> int:
    """Write the fleet's sessions into a new SQLite store at ``db``; how many."""
    store = open_store(StorageConfig(path=str(db)))
    start = datetime(2026, 1, 1, tzinfo=UTC)
    step = 24 * 60 // per_day
    count = 0
    pending: list[NewResult] = []
    for p in range(probes):
        name = f"probe-{p:04d}"
        register_probe(store, name, CELLS[p % len(CELLS)])
        down = 20e6 + 5e6 * p
        variants = [(attempt_with_samples("download", down * (0.8 + 0.05 * v)),
                     attempt_with_samples("upload", down / 5 * (0.8 + 0.05 * v)))
                    for v in range(VARIANTS)]
        loaded = [ping_test([20.0 + p + (i % 7) * 1.5 for i in range(LOADED)]),
                  ping_test([25.0 + p + (i % 5) * 2.0 for i in range(LOADED)])]
        for i in range(days * per_day):
            rtts = [8.0 + p * 0.5 + ((i + k) % 9) * 0.3 if (i + k) % 20 else None
                    for k in range(10)]
            result = dataclasses.replace(
                session(name, started_at=format_utc(start + timedelta(minutes=step * i + 7)),
                        rtts=rtts, transfers=variants[i % VARIANTS],
                        result_id=str(uuid.UUID(int=p << 64 | i))),
                ping_download=loaded[0], ping_upload=loaded[1])
            accepted = ingest.parse_body(canonical_json(result).encode())
            pending.append(NewResult(
                result_id=result.result_id, probe_name=name,
                schema_version=result.schema_version, started_at=accepted.started_at,
                ended_at=accepted.ended_at, received_at="2026-12-01T00:00:00.000000Z",
                body=accepted.body, body_sha256=accepted.body_sha256, facts=accepted.facts,
                packed=accepted.packed or None))
            if len(pending) >= BATCH:
                store.insert_results(pending)
                count += len(pending)
                pending = []
    if pending:
        store.insert_results(pending)
        count += len(pending)
    store.close()
    return count


def measure(db: Path, out: Path, fmt: str, open_data: bool) -> tuple[float, float, dict]:
    """(seconds inside the process, peak RSS MB, its summary) of one export."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(db), str(out), fmt,
                             "1" if open_data else "0"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    text = proc.stdout.read()
    _pid, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"export {fmt} open_data={open_data} failed")
    got = json.loads(text.strip().splitlines()[-1])
    return got["s"], usage.ru_maxrss / 1024, got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--sessions-per-day", type=int, default=24)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="bbprobe-export-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    db = work / "store.sqlite"
    try:
        started = time.perf_counter()
        sessions = fill(db, args.probes, args.days, args.sessions_per_day)
        print(f"store: {sessions:,} sessions ({args.probes} probes x {args.days} days x "
              f"{args.sessions_per_day}), {db.stat().st_size / 2**20:,.0f} MB SQLite, "
              f"written in {time.perf_counter() - started:,.0f} s")
        print(f"{'mode':<18}{'rows':>12}{'time s':>9}{'rows/s':>10}{'sessions/s':>12}"
              f"{'peak RSS MB':>13}")
        for label, fmt, open_data in (("parquet", "parquet", False), ("csv", "csv", False),
                                      ("open data parquet", "parquet", True)):
            out = work / f"out-{label.replace(' ', '-')}"
            shutil.rmtree(out, ignore_errors=True)
            seconds, rss, got = measure(db, out, fmt, open_data)
            rows = sum(got["rows"].values()) + sum(got["suppressed"].values())
            print(f"{label:<18}{rows:>12,}{seconds:>9.1f}{rows / seconds:>10,.0f}"
                  f"{sessions / seconds:>12,.0f}{rss:>13,.0f}")
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
