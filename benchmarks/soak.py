"""Goal C7 (reliability.md): sustained concurrency. Many probes post realistic results to
one collector at once, for minutes; nothing may fail, and every acknowledged result must
be stored exactly once. Prints a table; asserts nothing (tests/integration/test_soak.py
runs a short version and asserts).

    .venv/bin/python -m benchmarks.soak [--probes 200] [--seconds 600] [--think-s 0]

Method, stated with every number:
- A real collector process (`bbprobe-collector serve`, SQLite in a temporary directory,
  WAL, synchronous=FULL) on 127.0.0.1; ``--probes`` probes registered with their own
  tokens; one client per probe (aiohttp, one connection each), all running at once.
- Each client posts one result after another (``--think-s`` pause between them, 0 =
  back to back): a session document as the agent makes it, 10 pings and a 4-stream
  download and upload with per-stream samples every 100 ms over 12 s (about 60 KB of
  JSON), a fresh result id each time.
- Latency: from sending a request to reading its reply, every request. Percentiles by
  the nearest-rank method over all requests of the run.
- Errors: any reply other than 201, or any exception (connection reset, timeout).
- WAL and database sizes are read from the files every 10 s; the collector's RSS from
  /proc at the same moments.
- At the end the stored results are counted in the database and compared with the
  acknowledged ones (201s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from agent.schema import to_dict
from collector.fleet.probes import register_probe
from collector.lines import LineMetadata
from collector.storage.sql.sqlite import SqliteStore

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Run:
    latencies_s: list[float] = field(default_factory=list)
    acknowledged: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    samples: list[tuple[float, int, int, int]] = field(default_factory=list)  # t, wal, db, rss
    stored: int = 0
    seconds: float = 0.0

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


def document(probe: str) -> dict[str, Any]:
    """A realistic session: 10 pings, 4-stream download (100 Mbit/s) and upload (20)."""
    from tests.factories import attempt_with_samples, session

    result = session(probe, rtts=[10.0 + k / 10 for k in range(10)],
                     transfers=[attempt_with_samples("download", 100e6),
                                attempt_with_samples("upload", 20e6)])
    doc: dict[str, Any] = json.loads(json.dumps(to_dict(result)))
    return doc


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else math.nan


async def _client(url: str, probe: str, token: str, deadline: float, think_s: float,
                  run: Run) -> None:
    template = document(probe)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=1)) as http:
        while time.monotonic() < deadline:
            template["result_id"] = str(uuid.uuid4())
            body = json.dumps(template).encode()
            sent = time.monotonic()
            try:
                async with http.post(url + "/api/v1/results", data=body,
                                     headers=headers) as resp:
                    await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                run.error(type(exc).__name__)
                continue
            run.latencies_s.append(time.monotonic() - sent)
            if status == 201:
                run.acknowledged += 1
            else:
                run.error(f"HTTP {status}")
            if think_s:
                await asyncio.sleep(think_s)


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _sizes(db: Path) -> tuple[int, int]:
    wal = db.with_name(db.name + "-wal")
    return (wal.stat().st_size if wal.exists() else 0), db.stat().st_size


async def _watch(db: Path, pid: int, deadline: float, run: Run, t0: float) -> None:
    while time.monotonic() < deadline:
        wal, size = _sizes(db)  # two stat calls: not worth a thread
        run.samples.append((time.monotonic() - t0, wal, size, _rss(pid)))
        await asyncio.sleep(min(10.0, max(0.1, deadline - time.monotonic())))


def soak(probes: int, seconds: float, think_s: float = 0.0,
         workdir: Path | None = None) -> Run:
    """Run the load against a fresh collector process; returns what was measured."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        db = Path(tmp) / "collector.sqlite3"
        addr = Path(tmp) / "addr"
        cli = [sys.executable, "-m", "collector", "--db", str(db)]
        store = SqliteStore(db)
        try:
            tokens = [register_probe(store, f"soak-{n:04d}", LineMetadata())
                      for n in range(probes)]
        finally:
            store.close()
        server = subprocess.Popen([*cli, "serve", "--port", "0", "--addr-file", str(addr)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(300):
                if addr.exists():
                    break
                time.sleep(0.1)
            url = addr.read_text().strip()
            run = Run()

            async def main() -> None:
                t0 = time.monotonic()
                deadline = t0 + seconds
                async with asyncio.TaskGroup() as group:
                    group.create_task(_watch(db, server.pid, deadline, run, t0))
                    for n, token in enumerate(tokens):
                        group.create_task(_client(url, f"soak-{n:04d}", token, deadline,
                                                  think_s, run))
                run.seconds = time.monotonic() - t0

            asyncio.run(main())
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
        import sqlite3

        with sqlite3.connect(db) as conn:
            run.stored = int(conn.execute("SELECT COUNT(*) FROM results").fetchone()[0])
        return run


def report(run: Run, probes: int) -> str:
    lat = run.latencies_s
    wal = [s[1] for s in run.samples]
    rss = [s[3] for s in run.samples]
    mib = 1024 * 1024
    lines = [
        f"probes {probes}, {run.seconds:.0f} s, one client each, back to back",
        f"results acknowledged (201): {run.acknowledged}  "
        f"({run.acknowledged / run.seconds:.1f}/s)",
        f"stored in the database:     {run.stored}  "
        f"({'= acknowledged' if run.stored == run.acknowledged else 'MISMATCH'})",
        f"errors: {sum(run.errors.values())} {run.errors or ''}".rstrip(),
        f"latency (nearest rank, {len(lat)} requests): p50 {nearest_rank(lat, .5) * 1e3:.0f} ms,"
        f" p90 {nearest_rank(lat, .9) * 1e3:.0f} ms, p99 {nearest_rank(lat, .99) * 1e3:.0f} ms,"
        f" max {max(lat, default=math.nan) * 1e3:.0f} ms",
        f"WAL size: max {max(wal, default=0) / mib:.1f} MiB, last {wal[-1] / mib if wal else 0:.1f}"
        f" MiB; database {run.samples[-1][2] / mib if run.samples else 0:.0f} MiB; collector RSS"
        f" max {max(rss, default=0) / mib:.0f} MiB",
        "t (s)   WAL (MiB)   DB (MiB)   RSS (MiB)",
        *(f"{t:5.0f}   {w / mib:9.1f}   {d / mib:8.0f}   {r / mib:9.0f}"
          for t, w, d, r in run.samples),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--think-s", type=float, default=0.0)
    args = parser.parse_args()
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    run = soak(args.probes, args.seconds, args.think_s)
    print(report(run, args.probes))


if __name__ == "__main__":
    main()
