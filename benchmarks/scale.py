"""Ingest results/s, SQLite with one collector process against PostgreSQL with 1, 2 and 4
processes (``serve --workers N``), all driven by the same load in one run.
Prints a table with ratios to SQLite; asserts nothing.

    .venv/bin/python -m benchmarks.scale [--seconds 20] [--clients 16]

Method, stated with every number:
- Documents as the agent makes them: "4x100M" is a 4-stream 100 Mbit/s session (10 pings,
  download and upload with per-stream samples every 100 ms over 12 s, about 60 KB of
  JSON); "20xmulti-gig" is a 20-stream 2 Gbit/s download and 1 Gbit/s upload (about
  300 KB). A fresh result id each time (the body is serialised once; only the id
  changes), so every post is a new result.
- Collector: ``bbprobe-collector serve`` in its own process(es), default config,
  rate limits off. SQLite: WAL, synchronous=FULL, in a temporary directory. PostgreSQL:
  a cluster of its own (tests/pg.py) with fsync ON, synchronous_commit on (durable, as
  deployed), pool_size 8 per process.
- Load: ``--clients`` concurrent HTTP/1.1 clients (aiohttp, one connection each, a new
  connection per request so SO_REUSEPORT spreads them), back to back, for
  ``--seconds`` after a 3 s warm-up that is not counted. The load generator runs on the
  same 2-core machine and takes CPU from the collector: the figures are for this
  machine, and ratios between rows matter more than the absolute numbers.
- results/s = 201 answers that arrived in the counted window / its length (the load
  loop is benchmarks/ingest.py's). Errors: any other answer.
- KiB/result: the store's growth over the run (after the collector stopped) divided by
  the results stored, warm-up included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agent.schema import to_dict
from benchmarks.ingest import PLACEHOLDER, load
from collector.config import StorageConfig
from collector.fleet.probes import register_probe
from collector.lines import LineMetadata
from collector.server.testing import bound_url
from collector.storage.sql.backends import open_store


def documents() -> dict[str, bytes]:
    from tests.factories import attempt_with_samples, session

    small = session("bench", rtts=[10.0 + k / 10 for k in range(10)], result_id=PLACEHOLDER,
                    transfers=[attempt_with_samples("download", 100e6),
                               attempt_with_samples("upload", 20e6)])
    big = session("bench", rtts=[2.0 + k / 10 for k in range(10)], result_id=PLACEHOLDER,
                  transfers=[attempt_with_samples("download", 2e9, streams=20),
                             attempt_with_samples("upload", 1e9, streams=20)])
    return {name: json.dumps(to_dict(doc)).encode() for name, doc in
            (("4x100M", small), ("20xmulti-gig", big))}


@contextmanager
def collector(storage: StorageConfig, workdir: Path, workers: int,
              env: dict[str, str]) -> Iterator[tuple[str, str, str, int]]:
    """A collector serving ``storage``; yields its URL, a probe's name and token, and the
    (parent) process id."""
    name = f"bench-{uuid.uuid4().hex[:6]}"
    store = open_store(storage)
    try:
        token = register_probe(store, name, LineMetadata())
    finally:
        store.close()
    config = workdir / f"collector-{uuid.uuid4().hex[:6]}.toml"
    lines = ['[server]', 'host = "127.0.0.1"', 'port = 0', 'probe_requests_per_min = 0',
             'max_body_bytes = 4000000', '', '[storage]', f'backend = "{storage.backend}"']
    lines += [f'url = "{storage.url}"'] if storage.backend == "postgresql" else \
        [f'path = "{storage.path}"']
    config.write_text("\n".join(lines) + "\n")
    addr = config.with_suffix(".addr")
    server = subprocess.Popen(
        [sys.executable, "-m", "collector", "serve", "--config", str(config), "--addr-file",
         str(addr), "--workers", str(workers)], env={**os.environ, **env},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield bound_url(server, addr), name, token, server.pid
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)


def _size(storage: StorageConfig) -> tuple[int, int]:
    """(bytes on disk, results stored): the SQLite file with its WAL, or
    pg_database_size (tables and indexes, not the server's WAL)."""
    store = open_store(storage)
    try:
        return store.size_bytes(), store.count_results()
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    from tests import pg

    docs = documents()
    rows: list[tuple[str, str, float, int, float]] = []
    with tempfile.TemporaryDirectory(prefix="bbprobe-scale-") as tmp, \
            pg.cluster(durable=True) as cluster:
        work = Path(tmp)
        setups: list[tuple[str, Any, int]] = [
            ("SQLite, 1 process", lambda: StorageConfig(
                path=str(work / f"{uuid.uuid4().hex[:6]}.sqlite3")), 1)]
        for n in (1, 2, 4):
            setups.append((f"PostgreSQL, {n} process{'es' if n > 1 else ''}",
                           lambda: StorageConfig(backend="postgresql", url=cluster.url(
                               cluster.create_database())), n))
        for doc_name, body in docs.items():
            for label, make, workers in setups:
                storage = make()
                empty = _size(storage)[0]
                with collector(storage, work, workers, {}) as (url, probe, token, pid):
                    template = body.replace(b'"probe_id": "bench"',
                                            f'"probe_id": "{probe}"'.encode())
                    ok, errors, _cpu = asyncio.run(load(url, token, template, args.clients,
                                                        args.seconds, pid))
                    rate = ok / args.seconds
                size, stored = _size(storage)
                per_result = (size - empty) / stored if stored else float("nan")
                rows.append((doc_name, label, rate, errors, per_result))
                print(f"{doc_name:<14} {label:<26} {rate:8.1f} results/s  errors {errors}  "
                      f"{per_result / 1024:.0f} KiB/result", file=sys.stderr, flush=True)
    print(f"Ingest, {args.clients} concurrent clients, {args.seconds:g} s counted "
          f"(documents: {', '.join(f'{k} {len(v) / 1000:.0f} KB' for k, v in docs.items())})")
    print(f"{'document':<14} {'store':<26} {'results/s':>10} {'x SQLite':>9} {'errors':>7} "
          f"{'KiB/result':>10}")
    for doc_name in docs:
        base = next(r[2] for r in rows if r[0] == doc_name)
        for name, label, rate, errors, per_result in rows:
            if name == doc_name:
                print(f"{name:<14} {label:<26} {rate:>10.1f} {rate / base:>9.2f} {errors:>7} "
                      f"{per_result / 1024:>10.0f}")


if __name__ == "__main__":
    main()
