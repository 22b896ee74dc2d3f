"""Many collector processes over one PostgreSQL database: two independent
collectors taking the same results and cross-duplicates at once, and one collector
serving with ``--workers``. Real processes (``python -m collector serve``), a real
PostgreSQL started by the tests, loopback only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from collector.config import CollectorConfig, StorageConfig
from collector.fleet.probes import register_probe
from collector.lines import LineMetadata
from collector.server.testing import bound_url, stop
from collector.storage.sql.backends import open_store
from tests.factories import canonical_json, day_rollups, session
from tests.httpclient import post_json, request

pytestmark = pytest.mark.slow  # a PostgreSQL cluster and collector processes

PROBES = ("p1", "p2", "p3", "p4")
# What each collector process printed, by pid, once it has stopped.
OUTPUT: dict[int, tuple[str, str]] = {}


def _split(url: str) -> tuple[str, str]:
    """The URI without its password, and the password (given as $PGPASSWORD)."""
    head, _, rest = url.partition("://")
    user_pw, _, host = rest.partition("@")
    user, _, password = user_pw.partition(":")
    return f"{head}://{user}@{host}", password


@contextmanager
def collector_process(tmp: Path, url: str,
                      *extra: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """``bbprobe-collector serve`` on 127.0.0.1:0 over ``url``; the password comes from
    $PGPASSWORD, as libpq reads it. Yields the base URL and the process."""
    bare, password = _split(url)
    tmp.mkdir(parents=True, exist_ok=True)
    addr = tmp / "addr"
    config = tmp / "collector.toml"
    config.write_text(f'[server]\nhost = "127.0.0.1"\nport = 0\nquery_auth = false\n'
                      f'probe_requests_per_min = 0\n\n[storage]\nbackend = "postgresql"\n'
                      f'url = "{bare}"\npool_size = 4\n')
    env = {**os.environ, "PGPASSWORD": password}
    proc = subprocess.Popen(
        [sys.executable, "-m", "collector", "serve", "--config", str(config), "--addr-file",
         str(addr), *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        yield bound_url(proc, addr), proc
    finally:
        OUTPUT[proc.pid] = stop(proc)


def _tokens(url: str) -> dict[str, str]:
    store = open_store(StorageConfig(backend="postgresql", url=url))
    try:
        return {p: register_probe(store, p, LineMetadata(operator="Op")) for p in
                PROBES}
    finally:
        store.close()


def test_two_collectors_store_every_result_once(tmp_path: Path, pg_url: str) -> None:
    """Two collector processes, one database: every result posted to both at once (and
    some with other content under the same id) is stored exactly once; one 201 per id,
    duplicates 200, conflicts 409; both then give the same report. The password, given
    through the environment, appears in no output."""
    tokens = _tokens(pg_url)
    docs = [json.loads(canonical_json(session(
        PROBES[i % 4], started_at=f"2026-06-{1 + i // 24:02d}T{i % 24:02d}:05:00.000000Z",
        rtts=[10.0 + i % 7, 11.5, None if i % 5 == 0 else 9.25])))
        for i in range(160)]
    statuses: dict[str, list[int]] = {d["result_id"]: [] for d in docs}
    lock = threading.Lock()
    with collector_process(tmp_path / "a", pg_url) as (url_a, proc_a), \
            collector_process(tmp_path / "b", pg_url) as (url_b, proc_b):

        def post(base: str, doc: dict[str, object]) -> None:
            status, _ = post_json(base + "/api/v1/results", doc, tokens[str(doc["probe_id"])])
            with lock:
                statuses[str(doc["result_id"])].append(status)

        threads = []
        for n, doc in enumerate(docs):
            # Every document to both collectors at once; every 8th also with other
            # content under the same id, to one of them.
            threads.append(threading.Thread(target=post, args=(url_a, doc)))
            threads.append(threading.Thread(target=post, args=(url_b, doc)))
            if n % 8 == 0:
                threads.append(threading.Thread(target=post, args=(
                    (url_a, url_b)[n % 2], {**doc, "agent_version": "other"})))
        for start in range(0, len(threads), 24):  # 24 requests in flight at a time
            batch = threads[start:start + 24]
            for t in batch:
                t.start()
            for t in batch:
                t.join(60)
        reports = [request("GET", base + "/api/v1/report")[1] for base in (url_a, url_b)]
        listings = [request("GET", base + "/api/v1/results?format=csv")[1]
                    for base in (url_a, url_b)]
    for n, doc in enumerate(docs):
        got = sorted(statuses[doc["result_id"]])
        # With a conflicting copy: whichever content came first is stored (201); the
        # other content is refused (409), the same content again is a duplicate (200).
        allowed = ([200, 201, 409], [201, 409, 409]) if n % 8 == 0 else ([200, 201],)
        assert got in allowed, (n, got)
    store = open_store(StorageConfig(backend="postgresql", url=pg_url))
    try:
        assert store.count_results() == len(docs)
        assert store.count("session_facts") == len(docs)
        days = day_rollups(store)
        assert sum(d.sessions + d.invalid_sessions for d in days) == len(docs)
    finally:
        store.close()
    assert reports[0] == reports[1] and reports[0]["sessions"] == len(docs)
    assert listings[0] == listings[1]
    _, password = _split(pg_url)
    for proc in (proc_a, proc_b):
        out, err = OUTPUT[proc.pid]
        assert proc.returncode == 0, err
        assert password not in out + err


def test_workers_share_one_port(tmp_path: Path, pg_url: str) -> None:
    """``serve --workers 3``: three processes on one port; results posted on fresh
    connections are all stored; a worker killed is started again; SIGTERM stops all; a
    scrape of any worker gives the counters of all."""
    tokens = _tokens(pg_url)
    with collector_process(tmp_path, pg_url, "--workers", "3") as (base, proc):
        parent = psutil.Process(proc.pid)
        workers = parent.children()
        assert len(workers) == 3
        ports = {c.laddr.port for w in workers for c in w.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN}
        assert ports == {int(base.rsplit(":", 1)[1])}
        docs = [json.loads(canonical_json(session(
            PROBES[i % 4], started_at=f"2026-07-01T{i % 24:02d}:{i // 24:02d}:00.000000Z")))
            for i in range(60)]
        for doc in docs[:30]:
            assert post_json(base + "/api/v1/results", doc, tokens[doc["probe_id"]])[0] == 201
        workers[0].kill()
        deadline = time.monotonic() + 30
        while len([c for c in parent.children() if c.is_running() and
                   c.status() != psutil.STATUS_ZOMBIE]) < 3 or workers[0].pid in {
                       c.pid for c in parent.children()}:
            assert time.monotonic() < deadline, "the killed worker was not replaced"
            time.sleep(0.2)
        for doc in docs[30:]:
            status, _ = post_json(base + "/api/v1/results", doc, tokens[doc["probe_id"]])
            assert status == 201
        report = request("GET", base + "/api/v1/report")[1]
        assert report["sessions"] == len(docs)
        # Prometheus: whichever worker answers a scrape, the counters are the
        # sum over all of them, the killed one's included (a counter that went back
        # would read as a reset in rate()); its live gauge went with it.
        for _ in range(6):
            text = request("GET", base + "/metrics", raw=True)[1].decode()
            parsed = {(s.name, tuple(sorted(s.labels.items()))): s.value
                      for f in text_string_to_metric_families(text) for s in f.samples}
            assert parsed[("bbprobe_collector_results_total",
                           (("outcome", "stored"),))] == len(docs)
            per_worker = CollectorConfig().measurement.max_concurrent
            assert parsed[("bbprobe_collector_measurement_transfers_limit", ())] == \
                3 * per_worker
        children = parent.children()
        proc.send_signal(signal.SIGTERM)
        proc.wait(40)
        _gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive
    assert proc.returncode == 0, OUTPUT[proc.pid][1]
