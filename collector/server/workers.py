"""``serve --workers N``: N collector processes on one port, so one host's collector uses
every core (a Python process runs its handlers on one).

Each worker is a whole collector (its own event loop, database threads and store
connection) listening on the same address with SO_REUSEPORT: the kernel spreads incoming
connections across them. Nothing a worker must share lives only in its memory: results,
tokens, the InfluxDB outbox (leased per row) are in the database. What is per process:
the probes' rate-limit buckets and the anonymous per-client buckets (a client may get up
to N times its rate, connections being spread by the kernel), and the measurement slots
(max_concurrent per worker). docs/operator.md says so (Scaling out).

The parent only supervises: it starts the workers, reports the URL once all listen,
restarts one that dies (at most once every RESTART_PAUSE_S per worker), and on SIGTERM or
SIGINT stops them all and waits for them.
"""

from __future__ import annotations

import asyncio
import ctypes
import multiprocessing
import os
import queue
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.process import BaseProcess
from typing import Any

from prometheus_client.multiprocess import mark_process_dead

from collector.config import CollectorConfig
from collector.errors import CollectorError
from collector.server import app

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0
RESTART_PAUSE_S = 5.0


def _worker(cfg: CollectorConfig, index: int, ready: Any,
            holder: socket.socket | None, role: str, metrics_dir: str) -> None:
    """One worker process: a collector on the shared port until SIGTERM/SIGINT, or
    until the parent is gone."""
    # The parent's handlers came with the fork: a signal while the store opens (a slow
    # PostgreSQL, the migration lock) must stop this process, not set a flag nobody reads.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if holder is not None:
        holder.close()
    _die_with_parent()
    try:
        asyncio.run(app.serve(cfg, lambda url: ready.put((index, url)), reuse_port=True,
                              role=role, metrics_dir=metrics_dir))
    except CollectorError as exc:
        print(f"bbprobe-collector: worker {index}: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)
    except OSError as exc:
        print(f"bbprobe-collector: worker {index}: cannot listen: {exc.strerror}",
              file=sys.stderr, flush=True)
        sys.exit(1)


def _die_with_parent() -> None:
    """SIGTERM this process when its parent dies (Linux prctl PR_SET_PDEATHSIG), so a
    killed supervisor leaves no workers serving the port unsupervised."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the call
        os.kill(os.getpid(), signal.SIGTERM)


def _reserve_port(host: str) -> socket.socket:
    """A socket bound to a free port with SO_REUSEPORT (not listening, so it receives
    nothing): the workers join it on that port; closed once they listen."""
    if app.dual_stack(host):
        # As the workers will bind it: IPv6 and IPv4 on one socket.
        return app.listening_socket(host, 0, reuse_port=True)
    family, _type, _proto, _name, address = socket.getaddrinfo(
        host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(address)
    return holder


def run(cfg: CollectorConfig, count: int, on_ready: Callable[[str], None],
        role: str = "all") -> None:
    """Run ``count`` workers until a signal; raise CollectorError if they cannot start."""
    holder = _reserve_port(cfg.server.host) if cfg.server.port == 0 else None
    port = holder.getsockname()[1] if holder is not None else cfg.server.port
    child_cfg = replace(cfg, server=replace(cfg.server, port=port, addr_file=""))
    # fork: the workers start from this process as it is (config parsed and checked,
    # secrets resolved); no thread runs here yet.
    context = multiprocessing.get_context("fork")
    ready = context.Queue()
    stopping = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    # Prometheus metrics: every worker counts in its own files here and a scrape of any
    # worker sums them all (collector/metrics.py). A fresh directory per start: the
    # counters of a previous run must not be added to this one's.
    counts = tempfile.mkdtemp(prefix="bbprobe-metrics-")
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}

    def spawn(index: int) -> BaseProcess:
        process = context.Process(target=_worker,
                                  args=(child_cfg, index, ready, holder, role, counts),
                                  name=f"bbprobe-collector-worker-{index}")
        process.start()
        return process

    workers: dict[int, BaseProcess] = {}
    started_at: dict[int, float] = {}
    try:
        for i in range(count):
            workers[i] = spawn(i)
            started_at[i] = time.monotonic()
        url = _wait_ready(workers, ready, count, lambda: stopping)
        if holder is not None:
            holder.close()
            holder = None
        if url is None:
            return
        if cfg.server.addr_file:
            app.write_addr_file(cfg.server.addr_file, url)
        on_ready(url)
        while not stopping:
            time.sleep(0.2)
            _drain(ready)  # restarted workers report too; keep the pipe empty
            for index, process in list(workers.items()):
                if process.is_alive() or stopping:
                    continue
                if time.monotonic() - started_at[index] < RESTART_PAUSE_S:
                    continue  # died soon after a start: wait before the next one
                print(f"bbprobe-collector: worker {index} exited with code "
                      f"{process.exitcode}; starting it again", file=sys.stderr, flush=True)
                process.join()
                if process.pid is not None:
                    # Its counters stay in the sums; its live gauges (transfers
                    # running) go.
                    mark_process_dead(process.pid, counts)
                workers[index] = spawn(index)
                started_at[index] = time.monotonic()
    finally:
        if holder is not None:
            holder.close()
        _stop_all(workers.values())
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(counts, ignore_errors=True)


def _wait_ready(workers: dict[int, BaseProcess], ready: Any, count: int,
                stopping: Callable[[], bool]) -> str | None:
    """The URL, once every worker listens; None if a signal came first."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    seen: dict[int, str] = {}
    while len(seen) < count:
        if stopping():
            return None
        for index, process in workers.items():
            if index not in seen and not process.is_alive():
                raise CollectorError(f"worker {index} exited with code {process.exitcode} "
                                     "before it was listening (see above)")
        if time.monotonic() > deadline:
            raise CollectorError(f"only {len(seen)} of {count} workers listened within "
                                 f"{READY_TIMEOUT_S:g} s")
        try:
            index, url = ready.get(timeout=0.2)
        except queue.Empty:
            continue
        seen[index] = url
    return next(iter(seen.values()))


def _drain(ready: Any) -> None:
    while True:
        try:
            ready.get_nowait()
        except queue.Empty:
            return


def _stop_all(processes: Any) -> None:
    """SIGTERM to every worker (each stops cleanly), SIGKILL to any still there after
    STOP_TIMEOUT_S."""
    alive = [p for p in processes if p.is_alive()]
    for process in alive:
        process.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for process in alive:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()
