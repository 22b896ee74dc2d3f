"""Optional InfluxDB sink: every stored result copied to InfluxDB for dashboards.

SQLite stays the master copy. A result and its outbox entry are written in one SQLite
transaction; this sink reads the outbox oldest first, writes the points with
influxdb-client's synchronous API (the call returns only once the server accepted them)
and only then deletes the entries. An InfluxDB outage therefore loses nothing: the outbox
grows, and the sink catches up when the server is back, with exponential backoff in
between. A crash between the write and the delete rewrites the same points, which
InfluxDB stores once (same measurement, tags and timestamp: last write wins).

Points (units in field names, as in the result schema; tags for probe and line):
- ``bbprobe_session``: the session summary (``download_bps``, ``rtt_mean_ms``, ...), at
  the session start;
- ``bbprobe_transfer``: one per attempt (``throughput_bps``, ``bytes_total``,
  ``duration_s``, ``streams``, ``ok``), tags direction, status, failure_reason;
- ``bbprobe_ping``: one per echo request (``rtt_ms``, ``lost``), at its send time.
Servers speaking the InfluxDB v2 write API work too (VictoriaMetrics names the series
``<measurement>_<field>``, e.g. ``bbprobe_session_download_bps``).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any

from influxdb_client.client.write.point import Point
from influxdb_client.domain.write_precision import WritePrecision

from agent.schema import SessionResult, parse_utc
from collector.config import influx_token
from collector.storage.sqlite import LineMetadata

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
    """The points of one result (pure)."""
    probe = result.probe_id
    started = parse_utc(result.started_at)
    out = []
    session = _tagged(Point("bbprobe_session"), probe, line).tag("profile",
                                                                 result.method.profile)
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
    """What /healthz shows of the sink."""

    written_results: int = 0
    last_success: str | None = None
    last_error: str | None = None
    failures_in_a_row: int = 0


OutboxRecord = tuple[str, SessionResult, LineMetadata]
Db = Callable[..., Awaitable[Any]]


class InfluxSink:
    """Drains the SQLite outbox into InfluxDB; one task, owned by the web app."""

    def __init__(self, cfg: Any, db: Db) -> None:
        from influxdb_client.client.influxdb_client import InfluxDBClient
        from influxdb_client.client.write_api import SYNCHRONOUS

        self.cfg = cfg
        self.db = db
        self.state = SinkState()
        self.wake = asyncio.Event()
        self.client = InfluxDBClient(url=cfg.url, token=influx_token(cfg),
                                     org=cfg.org, timeout=int(cfg.timeout_s * 1000),
                                     retries=False)
        self.write_api = self.client.write_api(write_options=SYNCHRONOUS)
        # Writes block; they get a thread of their own so the database thread never waits
        # on the network.
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bbprobe-influx")

    def _write(self, batch: list[Point]) -> None:
        self.write_api.write(bucket=self.cfg.bucket, org=self.cfg.org, record=batch)

    async def run(self) -> None:
        """Forever: take a batch, write it, delete it; back off on failure."""
        from collector.storage.sqlite import SqliteStore

        loop = asyncio.get_running_loop()
        delay = self.cfg.retry_min_s
        while True:
            batch: list[OutboxRecord] = await self.db(SqliteStore.outbox_batch,
                                                       self.cfg.batch_results)
            if not batch:
                self.wake.clear()
                try:
                    async with asyncio.timeout(self.cfg.poll_s):
                        await self.wake.wait()
                except TimeoutError:
                    pass
                continue
            records = [p for _, result, line in batch for p in points(result, line)]
            try:
                await loop.run_in_executor(self.thread, self._write, records)
            except Exception as exc:  # any failure to write is retried: never lost, never fatal
                self.state.failures_in_a_row += 1
                self.state.last_error = f"{type(exc).__name__}: {exc}"[:300]
                # Full jitter around the doubling delay, so restarted collectors spread out.
                pause = delay * random.uniform(0.5, 1.5)
                log.warning("InfluxDB write of %d result(s) failed (%s); retrying in %.1f s",
                            len(batch), self.state.last_error, pause)
                await asyncio.sleep(pause)
                delay = min(delay * 2, self.cfg.retry_max_s)
                continue
            await self.db(SqliteStore.outbox_done, [rid for rid, _, _ in batch])
            from agent.schema import utc_now

            self.state.written_results += len(batch)
            self.state.last_success = utc_now()
            self.state.failures_in_a_row = 0
            delay = self.cfg.retry_min_s

    def close(self) -> None:
        self.thread.shutdown(wait=True, cancel_futures=True)
        self.client.close()
