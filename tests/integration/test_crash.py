"""Crash tests (reliability.md A1, A3, C1): processes killed with SIGKILL at random moments
over many cycles, then a verifier. Real processes, real sockets, a real SQLite file.

Cycles: BBPROBE_CRASH_CYCLES (default 40 each, about a minute in all; the goal's 1,000
is a longer run of the same test: BBPROBE_CRASH_CYCLES=1000). Seed: BBPROBE_CRASH_SEED.
Each test prints its counts (pytest -s) for the record.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from collector.fleet.probes import register_probe
from collector.lines import LineMetadata
from collector.server.testing import RunningCollector
from collector.storage.sql.sqlite import SqliteStore
from tests.crash_agent import last_logged, result_id
from tests.factories import session_dict
from tests.httpclient import request

CYCLES = int(os.environ.get("BBPROBE_CRASH_CYCLES", "40"))
SEED = int(os.environ.get("BBPROBE_CRASH_SEED", "1"))
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # CYCLES kill-and-restart cycles each: about a minute


def _stored_ids(url: str, probe: str) -> list[str]:
    _, listing, _ = request("GET", f"{url}/api/v1/results?probe={probe}")
    return [r["result_id"] for r in listing["results"]]


def test_agent_killed_at_random_delivers_every_result_once(collector: RunningCollector,
                                                          tmp_path: Path) -> None:
    """An agent spooling and delivering results in a loop is SIGKILLed at a random moment
    in each cycle (while writing the spool, while pushing, between). A final clean run
    delivers the rest: every spooled result id is stored exactly once, nothing is
    dead-lettered, no conflict."""
    token = collector.add_probe("crash-probe")
    rng = random.Random(SEED)
    state = tmp_path / "state"
    state.mkdir()
    for _ in range(CYCLES):
        proc = subprocess.Popen([sys.executable, "-m", "tests.crash_agent", str(state),
                                 collector.url, token], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.4, 1.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    final = subprocess.run([sys.executable, "-m", "tests.crash_agent", str(state),
                            collector.url, token, "--once"], cwd=REPO, capture_output=True,
                           text=True, timeout=120, check=False)
    assert final.returncode == 0, final.stdout + final.stderr
    logged = last_logged(state / "log")
    expected = {result_id(s) for s in range(1, logged + 1)}
    stored = _stored_ids(collector.url, "crash-probe")
    assert len(stored) == len(set(stored)) == collector.count_results()
    assert expected <= set(stored) <= expected | {result_id(logged + 1)}
    assert not list((state / "dead-letter").glob("*.json"))
    print(f"\nagent crash test: {CYCLES} SIGKILL cycles, {logged} results spooled, "
          f"{len(stored)} stored once each, 0 dead-lettered")
    assert logged > CYCLES  # the kills did not all land before any work


def _start_collector(db: Path, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    addr = workdir / "collector.addr"
    addr.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "collector", "--db", str(db), "serve",
                             "--host", "127.0.0.1", "--port", "0", "--addr-file", str(addr)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if addr.exists() and addr.read_text().strip():
            return proc, addr.read_text().strip()
        assert proc.poll() is None, "collector exited at start"
        time.sleep(0.02)
    raise AssertionError("collector did not start within 30 s")


def _post(url: str, token: str, docs: list[dict[str, object]]) -> list[str]:
    """Post one result or a batch; the ids the collector acknowledged (2xx read)."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    if len(docs) == 1:
        status, body, _ = request("POST", url + "/api/v1/results",
                                  json.dumps(docs[0]).encode(), headers)
        return [str(docs[0]["result_id"])] if status in (200, 201) else []
    status, body, _ = request("POST", url + "/api/v1/results/batch",
                              json.dumps({"results": docs}).encode(), headers)
    if status != 200:
        return []
    return [i["result_id"] for i in body["items"] if i["status"] in (200, 201)]


def test_collector_killed_after_acks_keeps_every_acked_result(tmp_path: Path) -> None:
    """The collector is SIGKILLed right after it acknowledged results (even cycles) or at
    a random moment while results stream in (odd cycles). Every acknowledged id is in the
    database afterwards, and SQLite's integrity check passes. (About the SQLite file
    itself, under `synchronous=FULL`: built with `SqliteStore` and read with sqlite3.)"""
    db = tmp_path / "c.sqlite3"
    store = SqliteStore(db)
    token = register_probe(store, "p1", LineMetadata())
    store.close()
    rng = random.Random(SEED)
    acked: list[str] = []
    sent = 0
    for cycle in range(CYCLES):
        proc, url = _start_collector(db, tmp_path)
        if cycle % 2 == 0:
            for _ in range(rng.randint(1, 4)):
                docs = [session_dict(probe_id="p1") for _ in range(rng.choice((1, 1, 5)))]
                sent += len(docs)
                acked += _post(url, token, docs)
            proc.send_signal(signal.SIGKILL)  # right after the last ack
        else:
            killer = threading.Timer(rng.uniform(0.05, 0.4),
                                     lambda p=proc: p.send_signal(signal.SIGKILL))
            killer.start()
            while proc.poll() is None:
                docs = [session_dict(probe_id="p1") for _ in range(rng.choice((1, 3)))]
                sent += len(docs)
                try:
                    acked += _post(url, token, docs)
                except OSError:
                    break  # killed mid-request: not acknowledged
            killer.join()
        proc.wait(30)
    check = sqlite3.connect(db)
    assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = {row[0] for row in check.execute("SELECT result_id FROM results")}
    facts = {row[0] for row in check.execute("SELECT result_id FROM session_facts")}
    check.close()
    missing = set(acked) - stored
    assert not missing, f"{len(missing)} acknowledged results lost"
    assert facts == stored  # a result and its facts commit together
    print(f"\ncollector crash test: {CYCLES} SIGKILL cycles, {sent} results sent, "
          f"{len(acked)} acknowledged, {len(stored)} stored, 0 acknowledged lost; "
          "integrity_check ok")
    assert len(acked) > CYCLES
