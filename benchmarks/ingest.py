"""Ingest speed and cost, the previous release against the current code, in one run.
Prints a table of ratios; asserts nothing.

    .venv/bin/python -m benchmarks.ingest [--ref 86d1ce6] [--seconds 20]
                                          [--concurrency 16 200] [--profile DIR]
                                          [--backend sqlite|postgresql]
                                          [--release-agent] [--batch]

Method, stated with every number:
- Documents are real ones: the current agent runs a ``quick`` session and an ``agcom``
  session (adaptive streams: 20 on loopback, as on a fast line) against a collector on
  127.0.0.1 (``bbprobe run --no-push --json``). Every post is the same document with a
  fresh result id (the body is serialised once; only the id changes). With
  ``--release-agent`` the release's own agent measures two more (its sample times keep
  every bit of the double; the current agent's are to the microsecond), and these too
  go to both collectors: the table then shows a session as each release measures and
  stores it.
- Each collector is a process of its own (``python -m collector serve``) with rate limits
  off, on a store of its own: a SQLite file (WAL, synchronous=FULL) in a temporary
  directory, or (``--backend postgresql``) a fresh database in a throwaway PostgreSQL
  cluster (tests/pg.py) with fsync and synchronous_commit on, as deployed. "release" runs the
  tree of ``--ref`` (``git archive``), "current" the working tree, with the same
  interpreter and libraries.
- Load: ``--concurrency`` clients (aiohttp, a new connection per request), back to back,
  each result posted alone (``POST /api/v1/results``), or with ``--batch`` alone in a
  batch (``POST /api/v1/results/batch``, what the agent sends after every session),
  for ``--seconds`` after a 3 s warm-up that is not counted. The load generator shares
  the 2-core VM with the collector: ratios between rows matter more than absolutes.
- results/s: 201 answers that arrived in the counted window / its length (with 200
  clients and large documents one answer takes seconds: the window is what counts).
- CPU s / 1,000 results: the collector process's user + system time over the counted
  window (/proc/PID/stat), per 1,000 results acknowledged in it.
- Peak RSS: the collector's VmHWM at the end of the run.
- KiB/session: SQLite: the database file and its WAL after the collector stopped;
  PostgreSQL: pg_database_size after, less before (tables, indexes and TOAST; not the
  server's WAL); divided by the results stored.
- ``--profile DIR``: py-spy samples the current collector during the 16-client run of the
  large document; the top functions by own time are printed (py-spy must be installed;
  root, or ptrace allowed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import aiohttp

from collector.server.testing import bound_url

ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDER = "00000000-0000-4000-8000-000000000000"
TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Row:
    version: str
    document: str
    clients: int
    rate: float
    errors: int
    cpu_per_1000: float
    peak_rss_mib: float
    kib_per_session: float


def release_tree(ref: str, into: Path) -> Path:
    """The source tree at ``ref`` (git archive; no checkout of this repository moves)."""
    data = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", ref],
                          check=True, capture_output=True, timeout=120).stdout
    target = into / f"release-{ref}"
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(target, filter="data")
    return target


# Run from the tree's directory with it on PYTHONPATH (_env): this interpreter, that code.
COLLECTOR = [sys.executable, "-m", "collector"]


def _env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree)}


@dataclass(frozen=True, slots=True)
class Backend:
    """Where a collector under test stores: a fresh SQLite file or PostgreSQL database
    per collector."""

    name: str
    cluster: object | None = None  # tests.pg.Cluster for PostgreSQL

    def storage(self, work: Path) -> tuple[str, Callable[[], tuple[int, int]]]:
        """A fresh store: its config lines, and a function giving (bytes, results)."""
        if self.cluster is None:
            db = work / f"{uuid.uuid4().hex[:8]}.sqlite3"
            return f'path = "{db}"\n', lambda: _stored_sqlite(db)
        cluster: Any = self.cluster
        url = cluster.url(cluster.create_database())
        empty = _stored_postgres(url)[0]

        def stored() -> tuple[int, int]:
            size, count = _stored_postgres(url)
            return size - empty, count

        return f'backend = "postgresql"\nurl = "{url}"\n', stored


@contextmanager
def collector(tree: Path, work: Path, backend: Backend, extra: str = ""
              ) -> Iterator[tuple[str, str, int, Callable[[], tuple[int, int]]]]:
    """A collector of ``tree`` on a fresh store: (url, token, pid, bytes-and-results).
    ``extra``: more config lines (whole tables)."""
    storage, stored = backend.storage(work)
    config = work / f"{uuid.uuid4().hex[:8]}.toml"
    config.write_text('[server]\nhost = "127.0.0.1"\nport = 0\nprobe_requests_per_min = 0\n'
                      f'max_body_bytes = 8000000\n\n[storage]\n{storage}\n{extra}')
    token = subprocess.run(
        [*COLLECTOR, "--config", str(config), "probe", "add", "bench"], cwd=tree,
        env=_env(tree), check=True, capture_output=True, text=True, timeout=60
    ).stdout.strip().splitlines()[-1]
    addr, log = config.with_suffix(".addr"), config.with_suffix(".log")
    # stderr to a file, as journald takes it: a pipe read only at the end would fill
    # (a line per result) and measure the log's drops, not ingest; the log level stays
    # the default, so its cost is counted, and a baseline tree without [log] still runs.
    with log.open("w") as stderr:
        server = subprocess.Popen([*COLLECTOR, "--config", str(config), "serve",
                                   "--addr-file", str(addr)], cwd=tree, env=_env(tree),
                                  stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    try:
        try:
            url = bound_url(server, addr)
        except RuntimeError:
            raise RuntimeError(f"collector did not start: {log.read_text()[-2000:]}") from None
        yield url, token, server.pid, stored
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=60)


def real_documents(work: Path, tree: Path = ROOT, label: str = "") -> dict[str, bytes]:
    """A quick and an agcom session measured by the agent of ``tree`` against a local
    collector (the current one)."""
    out = {}
    with collector(ROOT, work, Backend("sqlite")) as (url, token, _pid, _stored):
        for name, profile in (("quick", "quick"), ("agcom-20-stream", "agcom")):
            done = subprocess.run(
                [sys.executable, "-m", "agent", "run", "--collector", url, "--token", token,
                 "--probe-id", "bench", "--no-push", "--json", "--quiet",
                 "--set", f"profile={profile}", "--set", "checks.max_cpu_percent=100",
                 "--set", f"state_dir={work / 'agent-state'}"],
                cwd=tree, env=_env(tree), capture_output=True, text=True, timeout=300,
                check=True)
            doc = json.loads(done.stdout)
            doc["result_id"] = PLACEHOLDER
            body = json.dumps(doc, separators=(",", ":")).encode()
            out[f"{name}{label} ({len(body) // 1000} KB)"] = body
    return out


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def load(url: str, token: str, body: bytes, clients: int, seconds: float, pid: int,
               warmup: float = 3.0, batch: bool = False,
               make: Callable[[], bytes] | None = None) -> tuple[int, int, float]:
    """(acknowledged, errors, collector CPU seconds) in the counted window. ``batch``:
    each result goes alone in a batch request, as the agent delivers it. ``make``: each
    request's document from it (benchmarks/evidence.py signs each), else ``body`` with a
    fresh result id."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    path = "/api/v1/results/batch" if batch else "/api/v1/results"

    def fresh() -> bytes:
        return body.replace(PLACEHOLDER.encode(), str(uuid.uuid4()).encode())

    one = make or fresh
    start = time.monotonic()
    counted_from, until = start + warmup, start + warmup + seconds
    ok = errors = 0
    cpu: dict[str, float] = {}

    async def client() -> None:
        nonlocal ok, errors
        connector = aiohttp.TCPConnector(limit=1, force_close=True)
        async with aiohttp.ClientSession(connector=connector,
                                         timeout=aiohttp.ClientTimeout(total=120)) as http:
            while time.monotonic() < until:
                doc = one()
                if batch:
                    doc = b'{"results":[' + doc + b"]}"
                try:
                    async with http.post(url + path, data=doc, headers=headers) as resp:
                        reply = await resp.read()
                        status = resp.status
                    if batch and status == 200:
                        status = json.loads(reply)["items"][0]["status"]
                except (aiohttp.ClientError, TimeoutError):
                    status = 0
                # Counted by when the answer came: inside the window.
                if counted_from <= time.monotonic() <= until:
                    if status == 201:
                        ok += 1
                    else:
                        errors += 1

    async def meter() -> None:
        await asyncio.sleep(max(0.0, counted_from - time.monotonic()))
        cpu["from"] = _cpu_s(pid)
        await asyncio.sleep(max(0.0, until - time.monotonic()))
        cpu["until"] = _cpu_s(pid)

    async with asyncio.TaskGroup() as group:
        group.create_task(meter())
        for _ in range(clients):
            group.create_task(client())
    return ok, errors, cpu["until"] - cpu["from"]


def _stored_sqlite(db: Path) -> tuple[int, int]:
    size = sum(p.stat().st_size for p in (db, db.with_name(db.name + "-wal")) if p.exists())
    with sqlite3.connect(db) as conn:
        count = int(conn.execute("SELECT COUNT(*) FROM results").fetchone()[0])
    return size, count


def _stored_postgres(url: str) -> tuple[int, int]:
    import psycopg

    with psycopg.connect(url) as conn:
        size = conn.execute("SELECT pg_database_size(current_database())").fetchone()
        tables = conn.execute("SELECT to_regclass('results')").fetchone()
        count = conn.execute("SELECT COUNT(*) FROM results").fetchone() \
            if tables and tables[0] else (0,)
    return int(size[0] if size else 0), int(count[0] if count else 0)


def profile_top(pid: int, seconds: float, out: Path, top: int = 15) -> list[str]:
    """py-spy's samples of ``pid`` folded by function (own time), most first."""
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "ingest-profile.txt"
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    done = subprocess.run([spy, "record", "--pid", str(pid), "--duration", str(int(seconds)),
                           "--format", "raw", "--output", str(raw)],
                          check=False, capture_output=True, text=True,
                          timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError(f"py-spy failed: {done.stderr.strip()[-500:]}")
    own: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        own[frames[-1]] += int(count)
        total += int(count)
    return [f"{100 * n / total:5.1f} %  {frame}" for frame, n in own.most_common(top)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ref", default="86d1ce6",
                        help="the previous release (git ref); default: the last "
                             "release before ingest was made faster")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 200])
    parser.add_argument("--profile", type=Path, help="write py-spy's profile here")
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--batch", action="store_true",
                        help="post each result alone in a batch, as the agent does")
    parser.add_argument("--release-agent", action="store_true",
                        help="also post the documents the release's own agent writes")
    args = parser.parse_args()
    rows: list[Row] = []
    profile: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bbprobe-ingest-") as tmp, \
            _backend(args.backend) as backend:
        work = Path(tmp)
        trees = {"release": release_tree(args.ref, work), "current": ROOT}
        docs = real_documents(work)
        if args.release_agent:
            docs |= real_documents(work, trees["release"], f", {args.ref}'s agent")
        for name, body in docs.items():
            for clients in args.concurrency:
                for version, tree in trees.items():
                    with collector(tree, work, backend) as (url, token, pid, stored):
                        ok, errors, cpu = asyncio.run(load(url, token, body, clients,
                                                           args.seconds, pid,
                                                           batch=args.batch))
                        if args.profile and version == "current" and clients == min(
                                args.concurrency) and name == list(docs)[1]:
                            profile = _profile_during(url, token, body, clients, pid,
                                                      args.profile)
                        peak = _peak_rss_mib(pid)
                    size, count = stored()
                    rows.append(Row(version, name, clients, ok / args.seconds, errors,
                                    1000 * cpu / ok if ok else float("nan"), peak,
                                    size / 1024 / count if count else float("nan")))
                    r = rows[-1]
                    print(f"{version:<8} {name:<24} c={clients:<4} {r.rate:7.1f}/s "
                          f"err {errors}  cpu {r.cpu_per_1000:6.1f} s/1000  "
                          f"rss {peak:5.0f} MiB  {r.kib_per_session:6.1f} KiB/session",
                          file=sys.stderr, flush=True)
    print(f"Ingest: release {args.ref} against the current tree, {args.backend}, "
          f"{args.seconds:g} s counted per row")
    print(f"{'document':<24} {'clients':>7} {'results/s rel -> cur':>22} {'ratio':>6} "
          f"{'CPU s/1000':>16} {'peak RSS MiB':>14} {'KiB/session':>14} {'ratio':>6}")
    for name in docs:
        for clients in args.concurrency:
            rel, cur = (next(r for r in rows if (r.version, r.document, r.clients) ==
                             (v, name, clients)) for v in ("release", "current"))
            print(f"{name:<24} {clients:>7} {rel.rate:>10.1f} -> {cur.rate:>7.1f} "
                  f"{cur.rate / rel.rate if rel.rate else float('nan'):>6.2f} "
                  f"{rel.cpu_per_1000:>7.1f} -> "
                  f"{cur.cpu_per_1000:<6.1f} {rel.peak_rss_mib:>5.0f} -> "
                  f"{cur.peak_rss_mib:<6.0f} {rel.kib_per_session:>5.1f} -> "
                  f"{cur.kib_per_session:<6.1f} {cur.kib_per_session / rel.kib_per_session:>6.2f}")
    if profile:
        print("\nCurrent collector, own time by function (py-spy, the large document, "
              f"{min(args.concurrency)} clients):")
        for line in profile:
            print("  " + line)


@contextmanager
def _backend(name: str) -> Iterator[Backend]:
    if name == "sqlite":
        yield Backend("sqlite")
        return
    from tests import pg

    with pg.cluster(durable=True) as cluster:
        yield Backend("postgresql", cluster)


def _profile_during(url: str, token: str, body: bytes, clients: int, pid: int,
                    out: Path) -> list[str]:
    """A second loaded window on the same collector, sampled by py-spy."""
    seconds = 15.0

    async def both() -> list[str]:
        spy = asyncio.to_thread(profile_top, pid, seconds, out)
        loaded = load(url, token, body, clients, seconds + 4, pid, warmup=1.0)
        top, _ = await asyncio.gather(spy, loaded)
        return top

    return asyncio.run(both())


if __name__ == "__main__":
    main()
