"""Optional InfluxDB sink: every stored result copied to InfluxDB for dashboards.

The store (SQLite or PostgreSQL) stays the master copy. A result and its outbox entry are
written in one transaction; this sink leases outbox rows oldest first (with many collector
processes over one database each row goes to one of them; a lease left by a process that
died expires), writes the points with
influxdb-client's synchronous API (the call returns only once the server accepted them)
and only then deletes the entries. An InfluxDB outage therefore loses nothing: the outbox
grows, and the sink catches up when the server is back, with exponential backoff in
between. A crash between the write and the delete rewrites the same points, which
InfluxDB stores once (same measurement, tags and timestamp: last write wins).

Points (units in field names, as in the result schema; tags for probe and line):
- ``bbprobe_session``: the session summary (``download_bps``, ``rtt_mean_ms``, ...), at
  the session start;
- ``bbprobe_transfer``: one per attempt (``throughput_bps``, ``bytes_total``,
  ``duration_s``, ``streams``, ``ok``, ``refused``), tags direction, status,
  failure_reason. ``refused`` is 1 for an attempt the measurement server refused
  (compliance/facts.py ``is_refusal``: an old agent's 429 or bbprobe 503 included),
  which has ``ok`` 0 but is not the line's failure: a failure rate counts the attempts
  with ``ok`` 0 and ``refused`` 0 (configs/grafana). A field, not a tag: a tag would put a
  rewritten point in another series, beside the one written before;
- ``bbprobe_ping``: one per echo request (``rtt_ms``, ``lost``), at its send time.
Servers speaking the InfluxDB v2 write API work too (VictoriaMetrics names the series
``<measurement>_<field>``, e.g. ``bbprobe_session_download_bps``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import socket
import uuid
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

from influxdb_client.client.write.point import Point
from influxdb_client.domain.write_precision import WritePrecision

from agent.decoding import parse_result
from agent.schema import SessionResult, format_utc, parse_utc, utc_now
from collector.compliance.facts import is_refusal
from collector.config import influx_token
from collector.lines import LineMetadata
from collector.storage.store import OutboxStore

log = logging.getLogger("bbprobe.collector.influx")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
LINE_TAGS = ("operator", "offer", "region", "technology")


def _ns(moment: datetime) -> int:
    """Nanoseconds since the epoch, exact to the microsecond (no float rounding)."""
    return (moment - EPOCH) // timedelta(microseconds=1) * 1000


def _tagged(point: Point, probe: str, line: LineMetadata) -> Point:
    point.tag("probe", probe)
    for name in LINE_TAGS:
        value = getattr(line, name)
        if value:
            point.tag(name, value)
    return point


def points(result: SessionResult, line: LineMetadata) -> list[Point]:
    """The points of one result (pure). A session over a known IP version (schema 6)
    carries it as the tag address_family, so a dashboard can split by it."""
    probe = result.probe_id
    started = parse_utc(result.started_at)
    out = []
    session = _tagged(Point("bbprobe_session"), probe, line).tag("profile",
                                                                 result.method.profile)
    if result.address_family is not None:
        session.tag("address_family", result.address_family)
    for f in fields(result.summary):
        value = getattr(result.summary, f.name)
        if value is not None:
            session.field(f.name, float(value))
    session.field("transfer_attempts", len(result.transfers))
    out.append(session.time(_ns(started), WritePrecision.NS))
    for a in result.transfers:
        p = _tagged(Point("bbprobe_transfer"), probe, line)
        p.tag("direction", a.direction).tag("status", a.status)
        p.tag("test", str(a.test_index)).tag("attempt", str(a.attempt))
        if a.failure_reason:
            p.tag("failure_reason", a.failure_reason)
        if a.throughput_bps is not None:
            p.field("throughput_bps", float(a.throughput_bps))
        p.field("bytes_total", a.bytes_total).field("duration_s", float(a.duration_s))
        p.field("streams", a.streams).field("ok", int(a.status == "ok"))
        p.field("refused", int(is_refusal(a.status, a.failure_reason, a.http_status, a.error)))
        out.append(p.time(_ns(parse_utc(a.started_at)), WritePrecision.NS))
    if result.ping is not None:
        ping_start = parse_utc(result.ping.started_at)
        for s in result.ping.samples:
            p = _tagged(Point("bbprobe_ping"), probe, line).field("lost", int(s.rtt_ms is None))
            if s.rtt_ms is not None:
                p.field("rtt_ms", float(s.rtt_ms))
            moment = ping_start + timedelta(seconds=s.sent_offset_s)
            out.append(p.time(_ns(moment), WritePrecision.NS))
    return out


@dataclass(slots=True)
class SinkState:
    """What the analysts' health report shows of the sink."""

    running: bool = False
    written_results: int = 0
    dead_letters: int = 0  # set apart by this process (the database has the total)
    last_success: str | None = None
    last_error: str | None = None
    failures_in_a_row: int = 0
    crashes: int = 0  # the sink task died and was restarted (a bug: see the log)


# InfluxDB's answers that say "this data, never": bad line protocol or a timestamp out of
# range (400), too large (413), outside the bucket's retention (422). Anything else
# (5xx, 429, 401/403/404: a server or configuration matter) is retried, never dropped.
PERMANENT = frozenset({400, 413, 422})
# After this many results set apart in a row with none written, InfluxDB is taken to
# refuse everything (a field type conflict, a bucket's retention cut): stop setting
# results apart and back off, as for an outage, instead of emptying the outbox into the
# dead letters.
REFUSALS_BEFORE_PAUSE = 10
OutboxRow = tuple[str, str, LineMetadata]
Built = tuple[str, list[Point]]
T = TypeVar("T")


class Db(Protocol):
    """Runs a store call on a database thread (web/threads.py ``on_db``)."""

    def __call__(self, fn: Callable[[OutboxStore], T]) -> Awaitable[T]: ...


def build_points(batch: Sequence[tuple[str, str, Any]]
                 ) -> tuple[list[Built], list[tuple[str, str]]]:
    """Each leased result's points, or why they cannot be built: one result at a time,
    so one that cannot be built stops nothing else."""
    built: list[Built] = []
    unbuilt: list[tuple[str, str]] = []
    for result_id, body, line in batch:
        try:
            built.append((result_id, points(parse_result(json.loads(body)), line)))
        except Exception as exc:  # any fault is this result's: set apart
            unbuilt.append((result_id, f"cannot build its points: {type(exc).__name__}: "
                                       f"{exc}"))
    return built, unbuilt


class InfluxSink:
    """Drains the store's outbox into InfluxDB; one task per collector process, owned by
    its web app."""

    def __init__(self, cfg: Any, db: Db) -> None:
        from influxdb_client.client.influxdb_client import InfluxDBClient
        from influxdb_client.client.write_api import SYNCHRONOUS

        self.cfg = cfg
        self.db = db
        self.state = SinkState()
        self.refused_in_a_row = 0
        self.wake = asyncio.Event()
        # This process's name on the rows it leases.
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.client = InfluxDBClient(url=cfg.url, token=influx_token(cfg),
                                     org=cfg.org, timeout=int(cfg.timeout_s * 1000),
                                     retries=False)
        self.write_api = self.client.write_api(write_options=SYNCHRONOUS)
        # Writes block; they get a thread of their own so the database thread never waits
        # on the network.
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bbprobe-influx")

    def _write(self, batch: list[Point]) -> None:
        self.write_api.write(bucket=self.cfg.bucket, org=self.cfg.org, record=batch)

    async def supervise(self) -> None:
        """Run the sink; if it ever dies of an unforeseen error, say so (log, health) and
        start it again after a pause. Only cancellation (shutdown) ends it."""
        while True:
            self.state.running = True
            try:
                await self.run()
            except asyncio.CancelledError:
                self.state.running = False
                raise
            except Exception as exc:
                self.state.running = False
                self.state.crashes += 1
                self.state.last_error = f"sink crashed: {type(exc).__name__}: {exc}"[:300]
                log.exception("InfluxDB sink crashed (%d so far); restarting",
                              self.state.crashes)
                await asyncio.sleep(min(self.cfg.retry_max_s,
                                        self.cfg.retry_min_s * 2 ** min(self.state.crashes, 16)))

    async def run(self) -> None:
        """Forever: take a batch, write it, delete it; back off on failure."""
        delay = self.cfg.retry_min_s
        while True:
            batch = await self._lease()
            if not batch:
                self.wake.clear()
                try:
                    async with asyncio.timeout(self.cfg.poll_s):
                        await self.wake.wait()
                except TimeoutError:
                    pass
                continue
            # Off the event loop: a batch of large results takes a second
            # to decode, and every request of the process would wait for it.
            built, unbuilt = await asyncio.get_running_loop().run_in_executor(
                None, build_points, batch)
            for result_id, why in unbuilt:
                await self._dead_letter(result_id, why)
            try:
                await self._write_splitting(built)
            except Exception as exc:  # any other failure is retried: never lost, never fatal
                self.state.failures_in_a_row += 1
                self.state.last_error = f"{type(exc).__name__}: {exc}"[:300]
                # Full jitter around the doubling delay, so restarted collectors spread out.
                pause = delay * random.uniform(0.5, 1.5)
                log.warning("InfluxDB write of %d result(s) failed (%s); retrying in %.1f s",
                            len(built), self.state.last_error, pause)
                await asyncio.sleep(pause)
                delay = min(delay * 2, self.cfg.retry_max_s)
                continue
            self.state.last_success = utc_now()
            self.state.failures_in_a_row = 0
            delay = self.cfg.retry_min_s

    async def _lease(self) -> list[OutboxRow]:
        """The next batch, leased for long enough to write it with every split and
        retry of one attempt (a lease outliving a dead process only delays its rows)."""
        now = datetime.now(UTC)
        until = now + timedelta(seconds=max(300.0, 10 * self.cfg.timeout_s))
        owner, size, start, end = self.owner, self.cfg.batch_results, format_utc(now), \
            format_utc(until)
        return await self.db(lambda s: s.outbox_lease(owner, size, start, end))

    async def _write_splitting(self, built: list[Built]) -> None:
        """Write ``built``; on a permanent refusal, halve the batch until the result that
        InfluxDB refuses is alone, and set that one apart (log2(batch) extra writes)."""
        if not built:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(
                self.thread, self._write, [p for _, pts in built for p in pts])
        except Exception as exc:
            status = getattr(exc, "status", None)
            if status not in PERMANENT:
                raise
            if len(built) == 1:
                if self.refused_in_a_row >= REFUSALS_BEFORE_PAUSE:
                    raise RuntimeError(f"InfluxDB refused the last {self.refused_in_a_row} "
                                       f"results one by one (HTTP {status}); pausing "
                                       "before setting more apart") from exc
                self.refused_in_a_row += 1
                body = str(getattr(exc, "body", "") or exc).replace("\n", " ")
                await self._dead_letter(built[0][0], f"InfluxDB refused it: HTTP {status}: "
                                                     f"{body[:300]}")
                return
            half = len(built) // 2
            await self._write_splitting(built[:half])
            await self._write_splitting(built[half:])
            return
        done = [rid for rid, _ in built]
        await self.db(lambda s: s.outbox_done(done))
        self.state.written_results += len(built)
        self.refused_in_a_row = 0

    async def _dead_letter(self, result_id: str, reason: str) -> None:
        failed_at = utc_now()
        await self.db(lambda s: s.outbox_dead_letter(result_id, reason, failed_at))
        self.state.dead_letters += 1
        log.warning("InfluxDB copy of result %s set apart: %s", result_id, reason)

    def close(self) -> None:
        self.thread.shutdown(wait=True, cancel_futures=True)
        self.client.close()
