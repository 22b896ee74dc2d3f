"""With the collector down: the session stops as soon as the server refuses the
connection (a recorded failed result, still spooled), delivery says what it waits for and
that Ctrl-C keeps the result, errors read "connection refused" (never aiohttp's
"ssl:default" for an http URL), and the kept result goes once the collector is back.

The dead server is a closed port (bound, read, closed); the live one a real collector
on 127.0.0.1 port 0 (collector.server.testing) with its SQLite file."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent import neterrors
from agent.app.cli import main
from agent.client import CollectorClient
from agent.config import DeliveryConfig
from agent.delivery import deliver, waiting_lines
from agent.errors import DeliveryError
from agent.spool import Spool
from collector.server.testing import RunningCollector
from tests import factories

AGENT = [sys.executable, "-m", "agent"]


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _spooled(fast_config: Path) -> list[Path]:
    return sorted((fast_config.parent / "state" / "spool").glob("*.json"))


# A method whose retries and RTT-under-load trains, run against a server that is not
# there, took 8.6 s: 3 attempts 1 s apart beside a 4.2 s train, each way.
SLOW_TO_FAIL = ("--set", "download.attempts=3", "--set", "upload.attempts=3",
                "--set", "download.window_s=4", "--set", "upload.window_s=4",
                "--set", "ping.loaded_interval_s=0.2")


def test_a_dead_server_ends_the_session_at_once(collector: RunningCollector,
                                                fast_config: Path) -> None:
    """Collector and measurement server down: the first test's refused connection is
    retried once (a server may be restarting), refused again the server is down and each
    later test makes one attempt (no RTT train over an idle line); the result records
    them and is spooled, delivery says what it waits for, the exit is 6 (no
    measurement); back online, `push` delivers the kept result."""
    token = collector.add_probe("probe-down")
    dead = _closed_port()
    started = time.monotonic()
    done = CliRunner().invoke(main, [
        "--config", str(fast_config), "--collector", dead, "--server", dead,
        "--probe-id", "probe-down", *SLOW_TO_FAIL, "run", "--json"],
        env={"BBPROBE_TOKEN": token}, catch_exceptions=False)
    elapsed = time.monotonic() - started
    err = done.stderr
    assert done.exit_code == 6, err
    doc = json.loads(done.stdout)
    assert doc["duration_s"] < 3.0, doc["duration_s"]
    assert elapsed < 8.0  # the session, then delivery's 1.5 s (fast_config)
    hostport = dead.removeprefix("http://")
    assert [(t["direction"], t["attempt"], t["failure_reason"], t["error"])
            for t in doc["transfers"]] == [
        (d, n, "connect_error", f"cannot connect to {hostport}: connection refused")
        for d, n in (("download", 1), ("download", 2), ("upload", 1))]
    assert doc["ping_download"] is None and doc["ping_upload"] is None
    assert "attempt 1: the server refused the connection: retry in 1 s" in err
    assert "attempt 2: the server refused the connection (not running?): not retried" in err
    assert err.count("not retried") == 2  # and the upload's one attempt
    # Said plainly: no aiohttp internals, no asyncio's wording.
    assert "ssl:default" not in err and "Connect call failed" not in err
    assert f"cannot reach the collector at {dead}: connection refused" in err
    assert f"delivery: cannot reach the collector at {dead}: connection refused; " \
           "trying again for up to" in err
    assert "Ctrl-C stops waiting and keeps the result in the spool (bbprobe push or " \
           "the next run sends it)" in err
    (kept,) = _spooled(fast_config)
    assert kept.name.endswith(f"_{doc['result_id']}.json")
    pushed = CliRunner().invoke(main, ["--config", str(fast_config), "--collector",
                                       collector.url, "push"],
                                env={"BBPROBE_TOKEN": token}, catch_exceptions=False)
    assert pushed.exit_code == 0, pushed.stderr
    assert not _spooled(fast_config)
    assert collector.count_results() == 1


def test_ctrl_c_while_delivery_waits_keeps_the_result(fast_config: Path) -> None:
    """Ctrl-C during the wait the delivery line announced: exit 130 at once, the result
    still in the spool."""
    dead = _closed_port()
    proc = subprocess.Popen(
        [*AGENT, "--config", str(fast_config), "--collector", dead, "--server", dead,
         "--probe-id", "p1", "--set", "ping.enabled=false",
         "--set", "delivery.max_wait_s=120", "--set", "delivery.retry_min_s=5", "run"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "BBPROBE_TOKEN": "bbp_t"})
    assert proc.stderr is not None
    said: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        said.append(line)
        if "Ctrl-C stops waiting" in line or not line:
            break
    assert "Ctrl-C stops waiting" in said[-1], "".join(said)
    stopped = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGINT, "".join(said) + rest
    assert time.monotonic() - stopped < 5
    assert "stopped by SIGINT; results not yet acknowledged stay in the spool" in rest
    assert len(_spooled(fast_config)) == 1


def test_delivery_says_what_it_waits_for(tmp_path: Path) -> None:
    """Before each wait, one line with the reason and the time left; the first also says
    that stopping keeps the result (a real client on a closed port; the waits are not
    slept)."""
    spool = Spool(tmp_path)
    spool.put(factories.session("p1"))
    dead = _closed_port()
    client = CollectorClient(dead, "bbp_t", 2)
    now = [0.0]
    said: list[str] = []

    async def sleep(seconds: float) -> None:
        now[0] += seconds

    report = asyncio.run(deliver(
        spool, client, DeliveryConfig(retry_min_s=2, retry_max_s=8, max_wait_s=20),
        probe_id="p1", clock=lambda: now[0], sleep=sleep, jitter=lambda: 0.5, say=said.append))
    assert report.pending == 1 and report.delivered == []
    error = f"cannot reach the collector at {dead}: connection refused"
    assert report.error == error
    assert said[:3] == [
        f"delivery: {error}; trying again for up to 20 s (delivery.max_wait_s), next in 2 s",
        "Ctrl-C stops waiting and keeps the result in the spool (bbprobe push or the "
        "next run sends it)",
        f"delivery: still {error}; next try in 4 s, 18 s left"]
    assert waiting_lines("x", 3, 8, 6.4) == ["delivery: still x; next try in 8 s, 6 s left"]


def test_connection_errors_are_said_plainly() -> None:
    """The errno's own words, for the collector API and the transfers alike."""
    dead = _closed_port()
    with pytest.raises(DeliveryError) as caught:
        asyncio.run(CollectorClient(dead, "bbp_t", 2).whoami())
    assert str(caught.value) == f"cannot reach the collector at {dead}: connection refused"
    assert caught.value.retryable
    refused = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 9)")
    assert neterrors.describe(refused) == "connection refused"
    assert neterrors.refused(refused)
    several = OSError("Multiple exceptions: [Errno 111] Connect call failed ('::1', 9, 0, "
                      "0), [Errno 111] Connect call failed ('127.0.0.1', 9)")
    assert neterrors.describe(several) == "connection refused (every address)"
    assert neterrors.refused(several)
    mixed = OSError("Multiple exceptions: [Errno 111] Connect call failed ('::1', 9), "
                    "[Errno 101] Network is unreachable")
    assert not neterrors.refused(mixed)
    assert neterrors.describe(mixed).startswith("multiple exceptions: [Errno 111]")
    assert neterrors.describe(OSError(101, "x")) == "network is unreachable"
    assert not neterrors.refused(TimeoutError()) and not neterrors.refused(None)
    assert neterrors.describe(socket.gaierror(-2, "Name or service not known")) == \
        "name or service not known"
    assert neterrors.describe(ssl.SSLError(1, "[SSL] wrong version number")).startswith(
        "TLS failed:")
