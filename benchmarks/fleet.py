"""What fleet control costs the collector, against a reference request in the same run.
Prints a table; asserts nothing.

    .venv/bin/python -m benchmarks.fleet [--probes 1000] [--results 10] [--rules 50]
                                         [--repeat 30]

Method, stated with every number:
- One collector process (``python -m collector serve``, SQLite, WAL, synchronous=FULL)
  on 127.0.0.1, reads open, rate limits off. Its database holds ``--probes`` probes in
  10 regions, each with ``--results`` stored results (copies of one real ``quick``
  session the agent measured against this collector, with fresh ids and start times
  inside the last week), a health report each, and ``--rules`` instruction rules (one
  for all, one per region, the rest per probe) and 5 suppression windows.
- Each request is made ``--repeat`` times, one after the other, over a new connection
  each (http.client); the table gives the median and the 90th percentile of the wall
  time the client saw, and the ratio of the medians to the reference request:
  - the fleet view (``GET /api/v1/fleet``, JSON and CSV, and the ``/fleet`` page)
    against ``GET /api/v1/probes``, which lists the same probes with their metadata;
  - a probe's instruction (``GET /api/v1/instruction``, 200, and with If-None-Match,
    304: what a daemon pays before every session) and its health report
    (``POST /api/v1/reported-state``) against ``GET /api/v1/whoami``, the request every
    session already made.
- The client and the collector share the 2-core VM: compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agent.schema import SCHEMA_VERSION, format_utc, utc_now
from collector.config import StorageConfig
from collector.fleet.probes import register_probe
from collector.fleet.rules import Selector
from collector.intake import ingest
from collector.lines import LineMetadata
from collector.server.testing import serve_process
from collector.storage.model import NewResult
from collector.storage.sql.backends import open_store
from tests.httpclient import request

ROOT = Path(__file__).resolve().parents[1]


def _health() -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "agent_version": "0.1.0",
            "reported_at": utc_now(), "mode": "daemon", "instruction_version": None,
            "instruction_error": None, "campaign": None, "spool_results": 0,
            "spool_bytes": 0, "dead_letters": 0, "gaps_waiting": 0, "dropped_total": 0,
            "clock": None, "last_error": None, "failing_checks": [],
            "suppressed_until": None, "next_session_at": None}


def fill(db: Path, document: dict[str, Any], probes: int, results: int,
         rules: int) -> str:
    """The database of the method; returns the token of probe p0000."""
    store = open_store(StorageConfig(path=str(db)))
    rng = random.Random(15)
    now = datetime.now(UTC)
    token = ""
    try:
        for i in range(probes):
            name = f"p{i:04d}"
            secret = register_probe(store, name, LineMetadata(
                operator=f"op{i % 3}", region=f"region{i % 10}", technology="FTTH"))
            token = token or secret
            items = []
            for _ in range(results):
                started = now - timedelta(seconds=rng.uniform(600, 7 * 86400))
                doc = {**document, "result_id": str(uuid.uuid4()), "probe_id": name,
                       "started_at": format_utc(started),
                       "ended_at": format_utc(started + timedelta(seconds=12))}
                accepted = ingest.parse_body(json.dumps(doc).encode())
                items.append((doc, accepted))
            for doc, accepted in items:
                store.insert_results([NewResult(
                    result_id=doc["result_id"], probe_name=name,
                    schema_version=SCHEMA_VERSION, started_at=accepted.started_at,
                    ended_at=accepted.ended_at, received_at=utc_now(), body=accepted.body,
                    body_sha256=accepted.body_sha256, facts=accepted.facts)])
            store.put_health(name, utc_now(), 0.01, json.dumps(_health()))
        selectors = [Selector(), *(Selector(region=f"region{r}") for r in range(10)),
                     *(Selector(probe=f"p{i:04d}") for i in range(max(0, rules - 11)))]
        for n, chosen in enumerate(selectors[:rules]):
            store.update_instruction_rule(chosen.key(), lambda _, n=n: {
                "ping.count": 10 + n % 20}, utc_now())
        for w in range(5):
            store.add_suppression(Selector(region=f"region{w}").key(),
                                  format_utc(now + timedelta(days=w + 1)),
                                  format_utc(now + timedelta(days=w + 1, hours=2)),
                                  "maintenance", utc_now())
    finally:
        store.close()
    return token


def timed(repeat: int, method: str, url: str, body: bytes | None = None,
          headers: dict[str, str] | None = None, want: int = 200) -> tuple[float, float]:
    """(median, p90) wall time in ms of ``repeat`` requests."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        status, _, _ = request(method, url, body, headers, raw=True)
        times.append((time.perf_counter() - t0) * 1000)
        if status != want:
            raise SystemExit(f"{method} {url}: {status}, expected {want}")
    times.sort()
    return statistics.median(times), times[int(0.9 * (len(times) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probes", type=int, default=1000)
    parser.add_argument("--results", type=int, default=10)
    parser.add_argument("--rules", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bbprobe-fleet-bench-") as tmp:
        work = Path(tmp)
        db = work / "collector.sqlite3"
        config = work / "collector.toml"
        config.write_text('[server]\nhost = "127.0.0.1"\nport = 0\nquery_auth = false\n'
                          f'probe_requests_per_min = 0\n[storage]\npath = "{db}"\n')
        with serve_process(config, cwd=ROOT) as (url, _):
            measured = subprocess.run(
                [sys.executable, "-m", "agent", "--server", url, "--set", "profile=quick",
                 "--set", f"state_dir={work / 'state'}", "run", "--no-push", "--json",
                 "--quiet"], cwd=ROOT, capture_output=True, text=True, check=True,
                timeout=120)
            document = json.loads(measured.stdout)
            t0 = time.perf_counter()
            token = fill(db, document, args.probes, args.results, args.rules)
            filled = time.perf_counter() - t0
            auth = {"Authorization": f"Bearer {token}"}
            _, _, headers = request("GET", url + "/api/v1/instruction", headers=auth)
            etag = headers["etag"]
            health = json.dumps(_health()).encode()
            rows = [
                ("GET /api/v1/probes (reference)", timed(args.repeat, "GET",
                                                         url + "/api/v1/probes")),
                ("GET /api/v1/fleet", timed(args.repeat, "GET", url + "/api/v1/fleet")),
                ("GET /api/v1/fleet?format=csv",
                 timed(args.repeat, "GET", url + "/api/v1/fleet?format=csv")),
                ("GET /fleet (page)", timed(args.repeat, "GET", url + "/fleet")),
                ("GET /api/v1/whoami (reference)",
                 timed(args.repeat, "GET", url + "/api/v1/whoami", headers=auth)),
                ("GET /api/v1/instruction, 200",
                 timed(args.repeat, "GET", url + "/api/v1/instruction", headers=auth)),
                ("GET /api/v1/instruction, 304",
                 timed(args.repeat, "GET", url + "/api/v1/instruction",
                       headers={**auth, "If-None-Match": etag}, want=304)),
                ("POST /api/v1/reported-state",
                 timed(args.repeat, "POST", url + "/api/v1/reported-state", health,
                       {**auth, "Content-Type": "application/json"})),
            ]
    print(f"{args.probes} probes x {args.results} results, {args.rules} rules, 5 windows "
          f"(filled in {filled:.0f} s); {args.repeat} requests each, one at a time")
    print(f"{'request':<34} {'median ms':>10} {'p90 ms':>8} {'ratio':>7}")
    reference = rows[0][1][0]
    for i, (name, (med, p90)) in enumerate(rows):
        if i == 4:
            reference = med
        print(f"{name:<34} {med:>10.1f} {p90:>8.1f} {med / reference:>7.2f}")


if __name__ == "__main__":
    main()
