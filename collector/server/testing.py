"""Start a real collector for tests and benchmarks: 127.0.0.1, port 0, SQLite in a temp dir
(or the store the given config names: PostgreSQL in the conformance suite).

    with running_collector(tmp_path) as c:
        token = c.add_probe("p1")
        ...  # talk to c.url with any client, from any thread or process
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import AnyStr

from aiohttp import web

from collector.config import CollectorConfig
from collector.fleet import probes as admin
from collector.lines import LineMetadata
from collector.server import app as app_mod
from collector.storage.sql.backends import open_store
from collector.storage.store import Store


@dataclass(frozen=True, slots=True)
class RunningCollector:
    url: str
    db_path: Path
    config: CollectorConfig

    def open_store(self) -> Store:
        """A second connection to the collector's store, as the CLI would open it."""
        return open_store(self.config.storage)

    def add_probe(self, name: str, line: LineMetadata | None = None) -> str:
        """Register a probe through a second connection, as the CLI would; returns its token."""
        store = self.open_store()
        try:
            return admin.register_probe(store, name, line or LineMetadata())
        finally:
            store.close()

    def add_token(self, name: str, role: str = "analyst") -> str:
        """Create an analyst or admin token through a second connection; returns it."""
        store = self.open_store()
        try:
            return admin.add_token(store, name, role)
        finally:
            store.close()

    def count_results(self) -> int:
        store = self.open_store()
        try:
            return store.count_results()
        finally:
            store.close()


@contextmanager
def running_collector(
    tmp_path: Path, config: CollectorConfig | None = None, host: str = "127.0.0.1"
) -> Iterator[RunningCollector]:
    """Run a collector on its own event loop in a background thread until the block exits,
    on ``host`` (IPv6: "::1", or "::" for both families) and a free port.

    Without a ``config``, queries need no token (tests of other features read results
    freely); pass a config to test with ``server.query_auth`` as configured."""
    cfg = config or replace(CollectorConfig(),
                            server=replace(CollectorConfig().server, query_auth=False))
    db_path = tmp_path / "collector.sqlite3"
    storage = cfg.storage if cfg.storage.backend == "postgresql" else \
        replace(cfg.storage, path=str(db_path))
    cfg = replace(cfg, server=replace(cfg.server, host=host, port=0), storage=storage)
    with serve_in_thread(lambda: app_mod.start(cfg), "bbprobe-test-collector") as url:
        yield RunningCollector(url=url, db_path=db_path, config=cfg)


@contextmanager
def serve_in_thread(start: Callable[[], Awaitable[tuple[web.AppRunner, str]]],
                    name: str = "bbprobe-test-server") -> Iterator[str]:
    """Run what ``start`` starts (a runner and its URL) on an event loop of its own in a
    background thread; yield the URL; clean the runner up however the block ends."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict[str, object] = {}

    async def main() -> None:
        try:
            runner, url = await start()
        except BaseException as exc:
            box["error"] = exc
            started.set()
            raise
        box["url"] = url
        box["stop"] = stop = asyncio.Event()
        started.set()
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    def thread_main() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(main())
        except BaseException:  # reported through box["error"]
            pass
        finally:
            loop.close()

    thread = threading.Thread(target=thread_main, name=name, daemon=True)
    thread.start()
    if not started.wait(30):
        raise RuntimeError(f"{name} did not start within 30 s")
    if "error" in box:
        raise RuntimeError(f"{name} failed to start: {box['error']}")
    try:
        yield str(box["url"])
    finally:
        stop = box["stop"]
        assert isinstance(stop, asyncio.Event)
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)


def bound_url(server: subprocess.Popen[str], addr_file: Path, timeout_s: float = 60.0) -> str:
    """The URL a ``serve --addr-file`` process wrote once listening; RuntimeError (with
    its stderr) if it exits or takes longer than ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not addr_file.exists():
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"collector did not start: {server.communicate()[1]}")
        time.sleep(0.05)
    return addr_file.read_text().strip()


@contextmanager
def serve_process(config: Path, *extra: str, cwd: Path | None = None
                  ) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """``python -m collector --config CONFIG serve [EXTRA...]`` as a process of its own:
    (its URL, the process), stopped with SIGTERM when the block ends (its stderr is then
    read)."""
    addr = config.with_suffix(".addr")
    addr.unlink(missing_ok=True)
    server = subprocess.Popen(
        [sys.executable, "-m", "collector", "--config", str(config), "serve", *extra,
         "--addr-file", str(addr)], cwd=cwd, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    try:
        yield bound_url(server, addr), server
    finally:
        stop(server)


def stop(proc: subprocess.Popen[AnyStr], timeout_s: float = 30.0
         ) -> tuple[AnyStr | None, AnyStr | None]:
    """Stop ``proc`` as systemd would: SIGTERM if it still runs, then SIGKILL if it has not
    exited within ``timeout_s``. Returns what it still had to say on the streams that are
    pipes (None for the others)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()
