"""A measurement server that refuses the connection: the first refused attempt of a
session is retried once after the retry pause (a server restarting, a load balancer's
gap), so a server back within that second gives a measured test; refused again, the
server is down, and each later test of the session makes one attempt only, so a session
against a dead server still ends in a couple of seconds.

The late server is a real collector whose listening socket is bound beforehand but
listens only once the agent has said it will retry: until then the kernel refuses
every connection to its port (no listener), as it does for a server restarting."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from aiohttp import web

from agent import spec
from agent.probes import transfer
from agent.probes.transfer import Access, Ran
from agent.schema import TransferAttempt, TransferMethod
from collector.config import CollectorConfig
from collector.server import app as app_mod
from collector.server.testing import serve_in_thread
from tests.conftest import icmp_allowed
from tests.factories import TRANSFER, attempt

# --- the rule, on a fake clock ----------------------------------------------------------


class Server:
    """What each attempt meets, in turn: "down" (every connection refused) or "up"."""

    def __init__(self, *steps: str) -> None:
        self.steps = list(steps)
        self.waits: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)

    async def runner(self, test_index: int, number: int) -> Ran:
        ok = attempt("download", test_index, number)
        if self.steps.pop(0) == "up":
            return Ran(ok)
        error = "cannot connect to 127.0.0.1:9: connection refused"
        refused = replace(ok, status="failed", throughput_bps=None, window_bytes=None,
                          window_s=None, bytes_total=0, stream_samples=(),
                          failure_reason="connect_error", error=error)
        return Ran(refused, unreachable=error)

    def test(self, access: Access, test_index: int = 0,
             method: TransferMethod = TRANSFER) -> list[tuple[int, str]]:
        done: list[TransferAttempt] = asyncio.run(transfer.run_test(
            self.runner, method, test_index, spec.RETRY_PAUSE_S, access=access,
            sleep=self.sleep))
        return [(a.attempt, a.status) for a in done]


def test_a_server_back_within_the_pause_is_measured() -> None:
    """Refused once, then up: the retry after the pause measures the test."""
    server, said = Server("down", "up"), list[str]()
    access = Access(progress=said.append)
    assert server.test(access) == [(1, "failed"), (2, "ok")]
    assert server.waits == [spec.RETRY_PAUSE_S]
    assert said == ["  attempt 1: the server refused the connection: retry in 1 s"]
    assert not access.server_down


def test_a_dead_server_costs_the_session_one_pause() -> None:
    """Refused on the retry too: the server is down; the next test of the session makes
    one attempt and stops, with no pause (the attempts allowed are 3 each)."""
    server, said = Server("down", "down", "down"), list[str]()
    access = Access(progress=said.append)
    assert TRANSFER.attempts == 3
    assert server.test(access) == [(1, "failed"), (2, "failed")]
    assert access.server_down
    assert server.test(access, test_index=1) == [(1, "failed")]
    assert server.waits == [spec.RETRY_PAUSE_S]
    assert said[1:] == [
        "  attempt 2: the server refused the connection (not running?): not retried",
        "  attempt 1: the server refused the connection (not running?): not retried"]


def test_a_server_that_came_back_is_given_its_retry_again() -> None:
    """A first test whose retry measured found the server up: a later refusal in the
    session is retried once too (the server is not known to be down)."""
    server = Server("down", "up", "down", "up")
    access = Access()
    assert server.test(access) == [(1, "failed"), (2, "ok")]
    assert server.test(access, test_index=1) == [(1, "failed"), (2, "ok")]
    assert server.waits == [spec.RETRY_PAUSE_S] * 2


def test_one_attempt_allowed_means_no_retry() -> None:
    """The retry is one of the method's attempts (the session's planned worst case,
    agent/budget.py, stays as planned): with one attempt there is none."""
    server = Server("down")
    access = Access()
    assert server.test(access, method=replace(TRANSFER, attempts=1)) == [(1, "failed")]
    assert server.waits == [] and not access.server_down


# --- a real collector that starts listening a moment late -------------------------------


@contextmanager
def late_collector(tmp_path: Path
                   ) -> Iterator[tuple[str, asyncio.Event, asyncio.AbstractEventLoop]]:
    """A real collector (SQLite in ``tmp_path``) on a port bound now and listened on when
    the yielded event is set (from any thread, through the yielded loop): until then a
    connection to it is refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    base = CollectorConfig()
    cfg = replace(base, server=replace(base.server, query_auth=False),
                  storage=replace(base.storage, path=str(tmp_path / "collector.sqlite3")))
    box: dict[str, object] = {}

    async def start() -> tuple[web.AppRunner, str]:
        runner = web.AppRunner(app_mod.create_app(cfg), access_log=None,
                               handle_signals=False, shutdown_timeout=5.0,
                               auto_decompress=False)
        await runner.setup()
        listen = asyncio.Event()

        async def listen_when_asked() -> None:
            await listen.wait()
            await web.SockSite(runner, sock).start()

        box.update(loop=asyncio.get_running_loop(), listen=listen,
                   task=asyncio.get_running_loop().create_task(listen_when_asked()))
        return runner, f"http://127.0.0.1:{port}"

    try:
        with serve_in_thread(start, "bbprobe-late-collector") as url:
            loop, listen = box["loop"], box["listen"]
            assert isinstance(loop, asyncio.AbstractEventLoop)
            assert isinstance(listen, asyncio.Event)
            yield url, listen, loop
    finally:
        sock.close()


def test_a_server_restarting_during_the_first_attempt_gives_a_measurement(
        tmp_path: Path, fast_config: Path) -> None:
    """`run --no-push` against a collector whose port refuses the first connection and listens
    from the moment the agent says it will retry: the retry measures the download, the
    upload measures at once, exit 0 (before: the download was a failed test, exit 6)."""
    with late_collector(tmp_path) as (url, listen, loop):
        ping = ["--set", "ping.loaded_interval_s=0.1"] if icmp_allowed() else \
            ["--set", "ping.enabled=false"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "--config", str(fast_config), "--server", url,
             *ping, "run", "--no-push", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert proc.stderr is not None
        said: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            said.append(line)
            if "retry in" in line or not line:
                break
        # The server comes up within the retry pause.
        loop.call_soon_threadsafe(listen.set)
        out, rest = proc.communicate(timeout=60)
    err = "".join(said) + rest
    assert "attempt 1: the server refused the connection: retry in 1 s" in err
    assert proc.returncode == 0, err
    doc = json.loads(out)
    assert [(t["direction"], t["attempt"], t["status"], t["failure_reason"])
            for t in doc["transfers"]] == [
        ("download", 1, "failed", "connect_error"), ("download", 2, "ok", None),
        ("upload", 1, "ok", None)]
    assert doc["summary"]["download_bps"] > 0 and doc["summary"]["upload_bps"] > 0
    if icmp_allowed():
        # The download's RTT-under-load train ran while the refused attempt waited for
        # its retry, not under the load: discarded. The upload's was under load.
        assert doc["ping_download"] is None
        assert "RTT under load discarded: attempt 1 was refused (connect_error)" in err
        assert doc["ping_upload"]["summary"]["packets_sent"] > 0
