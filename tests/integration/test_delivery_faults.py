"""The agent as a process under faults: SIGTERM mid-test and mid-push, a full disk, and
what `bbprobe status` then shows (reliability.md A5, A8). Real processes, real sockets,
a real tmpfs for the full disk."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import DeliveryConfig
from agent.spool import Spool
from collector.config import StorageConfig
from collector.fleet.probes import register_probe
from collector.lines import LineMetadata
from collector.server.testing import RunningCollector
from collector.storage.sql.backends import open_store
from tests.conftest import IN_CI
from tests.factories import session

AGENT = [sys.executable, "-m", "agent"]


class Stalled:
    """A TCP server on 127.0.0.1 that accepts and never answers (until closed)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def stalled() -> Iterator[Stalled]:
    server = Stalled()
    try:
        yield server
    finally:
        server.close()


def _spawn(fast_config: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*AGENT, "--config", str(fast_config), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _spooled(fast_config: Path) -> list[Path]:
    return sorted((fast_config.parent / "state" / "spool").glob("*.json"))


def test_sigterm_during_a_test_stops_at_once_and_keeps_the_spool(
        fast_config: Path, stalled: Stalled) -> None:
    """A result waiting in the spool survives a SIGTERM that arrives while a transfer
    hangs on a server that never answers; the agent exits 143 within seconds."""
    waiting = session("probe-9")
    Spool(fast_config.parent / "state").put(waiting)
    proc = _spawn(fast_config, "--probe-id", "probe-9", "--collector", stalled.url,
                  "--token", "t", "--server", stalled.url, "--set", "ping.enabled=false",
                  "--set", "download.timeout_s=60", "run")
    time.sleep(1.5)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert time.monotonic() - started < 10
    assert "stopped by SIGTERM; results not yet acknowledged stay in the spool" in err
    assert [p.name.split("_", 1)[1] for p in _spooled(fast_config)] == [
        f"{waiting.result_id}.json"]


@pytest.mark.slow
@pytest.mark.privileged
def test_sigterm_during_the_push_keeps_the_result(
        collector: RunningCollector, fast_config: Path, stalled: Stalled) -> None:
    """Measured against the real collector, pushed to one that hangs: SIGTERM while the
    push waits leaves the result spooled, and the next run delivers it."""
    token = collector.add_probe("probe-9")
    proc = _spawn(fast_config, "--probe-id", "probe-9", "--collector", stalled.url,
                  "--token", token, "--server", collector.url, "run", "--json")
    deadline = time.monotonic() + 60
    while not _spooled(fast_config) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.05)
    assert _spooled(fast_config), "the session never reached the spool"
    time.sleep(0.5)  # inside the push now
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    result_id = json.loads(out)["result_id"]
    assert [p.name.split("_", 1)[1] for p in _spooled(fast_config)] == [f"{result_id}.json"]
    again = subprocess.run([*AGENT, "--config", str(fast_config), "--probe-id", "probe-9",
                            "--collector", collector.url, "--token", token, "--server",
                            collector.url, "run"], capture_output=True, text=True,
                           timeout=120, check=False)
    assert again.returncode == 0, again.stderr
    assert collector.count_results() == 2 and not _spooled(fast_config)


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 160 KiB tmpfs of our own (root), unmounted afterwards."""
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("CI=true needs root to mount a tmpfs for the full-disk test")
        pytest.skip("needs root to mount a small tmpfs (full-disk test)")
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k,mode=0700", "tmpfs",
                    str(mount)], check=True, timeout=30)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, timeout=30)


def test_full_disk_is_a_counted_drop_never_a_crash(tiny_fs: Path) -> None:
    """Results written until the disk is full (no byte cap, no free-space floor: room is
    made by dropping the oldest, and the kernel's ENOSPC stops the rest): put() never
    raises, every file in the spool is a whole result, no temp file is left, drops are
    counted as far as the disk allows, and once space frees writing works again."""
    spool = Spool(tiny_fs, DeliveryConfig(spool_max_bytes=10**9, min_free_bytes=0))
    accepted = refused = 0
    for n in range(300):
        if n == 150:
            # Something else fills the disk: dropping its own oldest results can no
            # longer make room for the spool (its own sizing is exact), so the kernel's
            # ENOSPC comes for certain, on the counter or on the result.
            with contextlib.suppress(OSError), \
                    (tiny_fs / "filler").open("wb", buffering=0) as filler:
                while True:
                    filler.write(b"\0" * 4096)
        if spool.put(session("p1")) is None:
            refused += 1
        else:
            accepted += 1
    pending = spool.pending()
    dropped = accepted + refused - len(pending)
    # The full disk was met: results were refused, or room was made by dropping the
    # oldest (no byte cap or free-space floor is set, so only ENOSPC drops anything).
    # Which of the two happens depends on tmpfs's page accounting at that moment.
    assert accepted > 10 and (refused >= 1 or dropped >= 1), (accepted, refused, dropped)
    assert 1 <= len(pending) <= accepted
    for path in pending:
        assert json.loads(path.read_text())["probe_id"] == "p1"  # whole, never torn
    assert not list(tiny_fs.rglob("*.tmp"))
    # A drop made to make room deletes its victim first, so the counter's own write has
    # room: every such drop is counted. Only a result the full disk refused outright may
    # go uncounted (its counter write meets the same full disk).
    counted = spool.stats().get("dropped_total", 0)
    assert dropped - refused <= counted <= dropped, (counted, dropped, refused)
    (tiny_fs / "filler").unlink()
    for path in pending[: len(pending) // 2]:
        spool.remove(path)
    assert spool.put(session("p1")) is not None  # recovered once space freed


def test_status_shows_backlog_dead_letters_and_the_collector(
        collector: RunningCollector, fast_config: Path) -> None:
    """`bbprobe status` (text and --json) shows the waiting result, the dead-lettered one
    with its reason and the commands for it, the collector answering for this token, and
    the last result's figures."""
    token = collector.add_probe("probe-9")
    spool = Spool(fast_config.parent / "state")
    spool.put(session("probe-9"))
    refused = spool.put(session("probe-9"))
    assert refused is not None
    spool.dead_letter(refused, "HTTP 422: summary.loss_ratio: must be <= 1, got 2")
    done = subprocess.run([*AGENT, "--config", str(fast_config), "--collector", collector.url,
                           "--token", token, "status"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "spool: 1 result(s) waiting" in out
    assert "dead-letter: 1 result(s) set aside, refused or damaged " \
        "(bbprobe dead-letter list|retry|drop):" in out
    assert "HTTP 422: summary.loss_ratio: must be <= 1, got 2" in out
    assert f"collector: {collector.url} answers, as probe probe-9" in out
    assert "last results:" in out and "down 50.00 / up 10.00 Mbit/s, RTT 11.00 ms" in out
    as_json = subprocess.run([*AGENT, "--config", str(fast_config), "status", "--json",
                              "--no-check"], capture_output=True, text=True, timeout=60,
                             check=False)
    doc = json.loads(as_json.stdout)
    assert (doc["spool"]["results"], len(doc["dead_letter"])) == (1, 1)


@pytest.mark.slow
def test_outage_backlog_arrives_complete(fast_config: Path, tmp_path: Path) -> None:
    """The ingesting collector is down for three sessions while the probe keeps measuring
    (against a measurement server that stays up); when it is back, the next run delivers
    the whole backlog, oldest first, each result once."""
    from collector.server.testing import running_collector
    from tests.integration.test_crash import _start_collector

    db = tmp_path / "ingest.sqlite3"  # the collector process serves `--db` this file
    with contextlib.closing(open_store(StorageConfig(path=str(db)))) as store:
        token = register_probe(store, "probe-9", LineMetadata())
    with running_collector(tmp_path / "measure") as measure:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            down = f"http://127.0.0.1:{s.getsockname()[1]}"
        common = [*AGENT, "--config", str(fast_config), "--probe-id", "probe-9", "--token",
                  token, "--server", measure.url, "--set", "ping.enabled=false"]
        made = []
        for _ in range(3):
            done = subprocess.run([*common, "--collector", down, "run", "--json"],
                                  capture_output=True, text=True, timeout=120, check=False)
            assert done.returncode == 3, done.stderr
            made.append(json.loads(done.stdout)["result_id"])
        assert len(_spooled(fast_config)) == 3
        proc, url = _start_collector(db, tmp_path)
        try:
            done = subprocess.run([*common, "--collector", url, "run", "--json"],
                                  capture_output=True, text=True, timeout=120, check=False)
            assert done.returncode == 0, done.stderr
            made.append(json.loads(done.stdout)["result_id"])
        finally:
            proc.terminate()
            proc.wait(30)
    with contextlib.closing(open_store(StorageConfig(path=str(db)))) as store:
        assert [r.result_id for r in store.results(["probe-9"])] == made
    assert not _spooled(fast_config)


@pytest.mark.slow
def test_daemon_asks_the_probe_name_again_at_each_session(
        collector: RunningCollector, fast_config: Path) -> None:
    """The daemon starts while the collector cannot answer whoami (503): it does not fall
    back on the host name for good but asks again at the session, and that result is
    stored under the collector's name for the token (before: the host name, refused
    with 403 and dead-lettered, until a restart)."""
    from tests.faultproxy import fault_proxy

    token = collector.add_probe("probe-9")
    with fault_proxy(collector.url, [("status", 503, None)]) as proxy:
        proc = _spawn(fast_config, "--collector", proxy.url, "--token", token, "--server",
                      collector.url, "--set", "ping.enabled=false", "daemon", "--first-now")
        try:
            # Stored by the collector is not yet acknowledged to the spool: the daemon
            # removes its file only after reading the ack, so wait for both (a SIGTERM
            # between the two leaves the file for the next start, as designed).
            deadline = time.monotonic() + 90
            while ((collector.count_results() == 0 or _spooled(fast_config))
                   and time.monotonic() < deadline):
                assert proc.poll() is None, proc.communicate()[1]
                time.sleep(0.1)
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    with contextlib.closing(collector.open_store()) as store:
        assert len(store.results(["probe-9"])) == 1, err
    state = fast_config.parent / "state"
    assert not _spooled(fast_config) and not list((state / "dead-letter").glob("*.json"))
    # (The instruction is asked between the two.)
    asked = [line for line in proxy.seen if "whoami" in line]
    assert asked[:2] == ["GET /api/v1/whoami -> 503", "GET /api/v1/whoami -> 200"]
    assert "daemon running (probe name not known yet" in err
