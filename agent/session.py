"""One measurement session: ping train, then downloads, then uploads (Ne.Me.Sys order).

Every test runs under its own deadline; a test that cannot run becomes a failed record in
the result, never an exception out of ``run``. Only bugs propagate.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime

from agent import __version__, summary
from agent.config import AgentConfig, measurement_server, method, ping_target
from agent.errors import ProbeSetupError
from agent.probes import http_download, http_upload, icmp
from agent.schema import (
    SCHEMA_VERSION,
    PingMethod,
    PingSample,
    PingTest,
    Server,
    SessionResult,
    TransferAttempt,
    TransferMethod,
    format_utc,
    utc_now,
)

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def ping_deadline_s(m: PingMethod) -> float:
    """Worst-case runtime of a ping train, with room for resolution and start-up."""
    return (m.count - 1) * m.interval_s + m.timeout_s + icmp.RESOLVE_TIMEOUT_S + 5.0


async def run_ping(target: str, m: PingMethod, progress: Progress = _quiet) -> PingTest:
    """A ping train as a ``PingTest``; setup failures become ``status="failed"``."""
    started_at = utc_now()
    progress(f"ping {target}: {m.count} echo requests, {m.interval_s:g} s apart")
    try:
        async with asyncio.timeout(ping_deadline_s(m)):
            obs = await icmp.run(target, m)
    except ProbeSetupError as exc:
        return PingTest(
            status="failed", error=str(exc), target=target, address=None, privileged=None,
            started_at=started_at, samples=(), summary=summary.ping_summary(()),
        )
    except TimeoutError:
        return PingTest(
            status="failed", error="ping train exceeded its deadline", target=target,
            address=None, privileged=None, started_at=started_at, samples=(),
            summary=summary.ping_summary(()),
        )
    samples: tuple[PingSample, ...] = obs.samples
    ping_summary = summary.ping_summary(samples)
    received = ping_summary.packets_received
    return PingTest(
        status="ok" if received > 0 else "failed",
        error=None if received > 0 else "no echo reply received",
        target=target,
        address=obs.address,
        privileged=obs.privileged,
        started_at=obs.started_at,
        samples=samples,
        summary=ping_summary,
    )


async def run_transfers(
    direction: str, base_url: str, m: TransferMethod, progress: Progress = _quiet
) -> list[TransferAttempt]:
    probe = http_download if direction == "download" else http_upload
    attempts: list[TransferAttempt] = []
    for test_index in range(m.tests):
        what = (
            f"{m.streams} stream(s), {m.warmup_s:g} s warm-up + {m.window_s:g} s window"
            if m.mode == "duration"
            else f"{m.file_size_bytes} byte file over {m.streams} stream(s)"
        )
        progress(f"{direction} test {test_index + 1}/{m.tests}: {what}")
        results = await probe.run(base_url, m, test_index)
        for a in results:
            if a.status == "ok" and a.throughput_bps is not None:
                progress(f"  attempt {a.attempt}: {a.throughput_bps / 1e6:.2f} Mbit/s")
            else:
                progress(f"  attempt {a.attempt}: failed ({a.failure_reason}: {a.error})")
        attempts.extend(results)
    return attempts


async def run(
    cfg: AgentConfig,
    probe_id: str,
    progress: Progress = _quiet,
    *,
    tests: frozenset[str] = frozenset({"ping", "download", "upload"}),
) -> SessionResult:
    """Run one session and return its result (never raises for a failed measurement)."""
    started = datetime.now(UTC)
    t0 = time.monotonic()
    m = method(cfg)
    # Record only what this session runs: a test left out has tests = 0 in its method.
    if "download" not in tests:
        m = replace(m, download=replace(m.download, tests=0))
    if "upload" not in tests:
        m = replace(m, upload=replace(m.upload, tests=0))
    if "ping" not in tests:
        m = replace(m, ping=None)
    base_url = measurement_server(cfg) if (m.download.tests or m.upload.tests) else None
    ping_test: PingTest | None = None
    if m.ping is not None:
        ping_test = await run_ping(ping_target(cfg), m.ping, progress)
    transfers: list[TransferAttempt] = []
    if base_url is not None:
        transfers += await run_transfers("download", base_url, m.download, progress)
        transfers += await run_transfers("upload", base_url, m.upload, progress)
    ended = datetime.now(UTC)
    return SessionResult(
        schema_version=SCHEMA_VERSION,
        result_id=str(uuid.uuid4()),
        probe_id=probe_id,
        agent_version=__version__,
        started_at=format_utc(started),
        ended_at=format_utc(max(ended, started)),
        duration_s=time.monotonic() - t0,
        method=m,
        server=Server(url=base_url, ping_target=ping_test.target if ping_test else None),
        ping=ping_test,
        transfers=tuple(transfers),
        summary=summary.session_summary(ping_test.summary if ping_test else None, transfers),
    )
