"""ndt7 server (shared/reference/protocols.md §5, spec v0.11.0): ``/ndt/v7/download`` and
``/ndt/v7/upload`` on the measurement role, so M-Lab's own clients (ndt7-js, ndt7-client-go)
test against a bbprobe measurement server unmodified.

What the real clients rely on (§5.6, §5.9), and so what this does:
- a WebSocket upgrade only with the ``net.measurementlab.ndt.v7`` subprotocol, echoed; 400
  naming the header otherwise; any query keys kept as client metadata (``server_*`` keys
  dropped), ``early_exit`` only ``250`` (acted on for download);
- download: random binary messages from 8 KiB, doubled while the size is at most 1/16 of
  what was queued, capped at 1 MiB (ndt7-client-go refuses larger messages);
- upload: binary messages up to 16 MiB accepted (ndt7-js sends 8 MiB), counted, not kept;
- every memoryless interval (mean 250 ms, 25..625 ms) a text measurement with
  ``ConnectionInfo`` and ``TCPInfo`` read from the kernel (``TCP_INFO``) plus
  ``ElapsedTime`` in µs since the handshake: the Go client's upload speed is
  ``TCPInfo.BytesReceived / TCPInfo.ElapsedTime`` of the last one; ``BBRInfo`` when the
  flow is BBR; ``AppInfo`` with this server's own application byte count;
- a WebSocket ping with a nanosecond timestamp after each measurement (§5.4);
- Close 1000 "Done sending" at 10 s, hard end at 15 s; a client that closes first, resets
  or never sends text is a normal end, recorded as such.

Each subtest is stored (table ``ndt7_tests``) in the shape of ndt-server's archive (§5.7),
apart from probe results and out of compliance unless an analyst includes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import WSMsgType, web

from agent import payload
from collector.errors import ApiError
from collector.measurement import tcpinfo
from collector.measurement.slots import MEASUREMENT_CONFIG, SLOTS, presented
from collector.routing import Routes

SUBPROTOCOL = "net.measurementlab.ndt.v7"
DOWNLOAD_PATH = "/ndt/v7/download"
UPLOAD_PATH = "/ndt/v7/upload"
RUNTIME_S = 10.0  # ndt-server DefaultRuntime
MAX_RUNTIME_S = 15.0  # ndt-server MaxRuntime: nothing runs longer
FIRST_MESSAGE = 1 << 13
MAX_SEND_MESSAGE = 1 << 20  # ndt-server MaxScaledMessageSize; the Go client's read limit
MAX_RECEIVE_MESSAGE = 1 << 24  # the spec's MUST-accept size
MAX_QUERY = 4096
EARLY_EXIT_BYTES = 250_000_000
MAX_CLIENT_MEASUREMENTS = 200  # 10 s at the spec's 10/s ceiling, twice over
MAX_CLIENT_MEASUREMENT_BYTES = 8192
# What one anonymous subtest may leave in the database of its own messages (200 x 8 KiB
# each would be 1.6 MB a subtest). ndt7-js sends about 40 of ~300 bytes.
MAX_CLIENT_MEASUREMENTS_TOTAL_BYTES = 64 * 1024


# Unsent bytes the kernel may hold for a download (payload.unsent_bound), as time at the
# rate seen so far. ndt-server leaves the send buffer autotuned, which on a slow line
# queues seconds of data behind the 10 s mark: the Close then reaches the client late
# (past the 15 s limit at 2 Mbit/s).
NOTSENT_TARGET_S = 0.05
MIN_NOTSENT_BYTES = 64 * 1024


def bound_unsent(sock: Any, rate_bps: float) -> None:
    payload.limit_unsent(sock, payload.unsent_bound(rate_bps, NOTSENT_TARGET_S,
                                                    MIN_NOTSENT_BYTES))


def next_interval(rng: random.Random) -> float:
    """Memoryless spacing of measurements: exponential, mean 250 ms, clamped to
    [25, 625] ms (ndt-server's ticker), so clients cannot sync to a fixed period."""
    return min(max(rng.expovariate(1 / 0.25), 0.025), 0.625)


def next_size(size: int, queued: int) -> int:
    """Message size rule (§5.4): double while the current size is at most 1/16 of the
    bytes queued so far, never above 1 MiB."""
    if size < MAX_SEND_MESSAGE and size <= queued // 16:
        return size * 2
    return size


def parse_query(query_string: str) -> tuple[list[dict[str, str]], bool]:
    """Client metadata (name/value pairs, first of duplicates, ``server_*`` dropped) and
    whether early exit at 250 MB was asked; ValueError naming the problem."""
    if len(query_string) > MAX_QUERY:
        raise ValueError(f"query string longer than {MAX_QUERY} bytes")
    seen: dict[str, str] = {}
    for key, value in parse_qsl(query_string, keep_blank_values=True):
        seen.setdefault(key, value)
    early = seen.get("early_exit")
    if early is not None and early != "250":
        raise ValueError(f"early_exit: only 250 (MB) is accepted, got {early!r}")
    metadata = [{"Name": k, "Value": v} for k, v in seen.items()
                if not k.startswith("server_")]
    return metadata, early is not None


def _addr(pair: Any) -> str:
    if not pair:
        return ""
    host, port = pair[0], pair[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Subtest:
    """One ndt7 subtest as it runs; ``archive()`` is what is stored."""

    test: str
    client: str
    server: str
    metadata: list[dict[str, str]]
    early_exit: bool
    uuid: str = field(default_factory=lambda: uuid.uuid4().hex)
    start: datetime = field(default_factory=lambda: datetime.now(UTC))
    t0: float = field(default_factory=time.monotonic)
    congestion_control: str | None = None
    app_bytes: int = 0  # binary + text payload bytes sent (download) or received (upload)
    server_measurements: list[dict[str, Any]] = field(default_factory=list)
    client_measurements: list[Any] = field(default_factory=list)
    client_bytes: int = 0  # of the kept client measurements
    client_measurements_dropped: int = 0  # past the caps: counted, not kept
    end_reason: str = "running"
    error: str | None = None
    end: datetime | None = None
    # Told each payload message's bytes; False: the ticket's bytes are used, the subtest
    # ends (end reason "ticket_allowance"). Not archived.
    meter: Callable[[int], bool] = field(default=lambda n: True, repr=False)

    def elapsed_us(self) -> int:
        return int((time.monotonic() - self.t0) * 1e6)

    def measurement(self, sock: Any) -> dict[str, Any]:
        elapsed = self.elapsed_us()
        message: dict[str, Any] = {
            "AppInfo": {"ElapsedTime": elapsed, "NumBytes": self.app_bytes},
            "ConnectionInfo": {"Client": self.client, "Server": self.server,
                               "UUID": self.uuid, "StartTime": _rfc3339(self.start)},
            "Origin": "server", "Test": self.test,
        }
        info = tcpinfo.read(sock) if sock is not None else {}
        if info:
            message["TCPInfo"] = {**info, "ElapsedTime": elapsed}
        if self.congestion_control == "bbr" and sock is not None:
            bbr = tcpinfo.read_bbr(sock)
            if bbr is not None:
                message["BBRInfo"] = {**bbr, "ElapsedTime": elapsed}
        self.server_measurements.append(message)
        return message

    def summary(self) -> dict[str, Any]:
        """The figures a client would show, from this server's last measurement:
        upload = BytesReceived / ElapsedTime (what ndt7-client-go reports), download =
        BytesAcked / ElapsedTime (what the receiver had acknowledged)."""
        # The last one with TCPInfo: once the client has closed, the socket may be gone.
        last: dict[str, Any] = next((m for m in reversed(self.server_measurements)
                                     if "TCPInfo" in m), {})
        info: dict[str, Any] = last.get("TCPInfo", {})
        elapsed_us = info.get("ElapsedTime") or last.get("AppInfo", {}).get("ElapsedTime")
        counted = info.get("BytesReceived" if self.test == "upload" else "BytesAcked")
        throughput = (8 * counted / (elapsed_us / 1e6)
                      if counted is not None and elapsed_us else None)
        sent = info.get("BytesSent")
        return {
            "throughput_bps": throughput,
            "elapsed_s": elapsed_us / 1e6 if elapsed_us else None,
            "app_bytes": self.app_bytes,
            "min_rtt_ms": info["MinRTT"] / 1000 if info.get("MinRTT") else None,
            "retrans_ratio": info["BytesRetrans"] / sent if sent else None,
            "method": ("TCP_INFO BytesReceived/ElapsedTime of the last server measurement"
                       if self.test == "upload" else
                       "TCP_INFO BytesAcked/ElapsedTime of the last server measurement"),
        }

    def archive(self) -> dict[str, Any]:
        return {
            "UUID": self.uuid, "Test": self.test,
            "StartTime": _rfc3339(self.start),
            "EndTime": _rfc3339(self.end or datetime.now(UTC)),
            "Client": self.client, "Server": self.server,
            "EndReason": self.end_reason, "Error": self.error,
            "ClientMetadata": self.metadata,
            "ServerMetadata": [{"Name": "congestion_control",
                                "Value": self.congestion_control or "unknown"},
                               {"Name": "early_exit", "Value": str(self.early_exit).lower()}],
            "Summary": self.summary(),
            "ServerMeasurements": self.server_measurements,
            "ClientMeasurements": self.client_measurements,
            "ClientMeasurementsDropped": self.client_measurements_dropped,
        }


Store = Callable[[Subtest], Awaitable[None]]


async def _measure(ws: web.WebSocketResponse, sub: Subtest, sock: Any,
                   rng: random.Random, runtime_s: float, stop: asyncio.Event) -> None:
    """Text measurements, each followed by a ping, until the runtime is over (then it
    sets ``stop``) or another job set ``stop``."""
    try:
        while not stop.is_set():
            remaining = runtime_s - (time.monotonic() - sub.t0)
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(next_interval(rng), remaining)):
                    await stop.wait()
            if stop.is_set():
                break
            message = sub.measurement(sock)
            if sub.test == "download" and "TCPInfo" in message:
                info = message["TCPInfo"]
                bound_unsent(sock, 8 * info.get("BytesAcked", 0)
                             / max(info["ElapsedTime"], 1) * 1e6)
            text = json.dumps(message)
            if sub.test == "download":
                sub.app_bytes += len(text)
            await ws.send_str(text)
            await ws.ping(str(time.time_ns()).encode())
    finally:
        stop.set()
    if tcpinfo.read(sock):
        sub.measurement(sock)  # the final state, kept for the record (summary)


async def _send(ws: web.WebSocketResponse, sub: Subtest, sock: Any,
                stop: asyncio.Event) -> None:
    """Binary messages until ``stop``. Never cancelled: a send cancelled in aiohttp's
    drain leaves the protocol's drain waiter cancelled, and the Close that follows would
    fail on it; the loop ends by itself after the message in flight."""
    size = FIRST_MESSAGE
    try:
        while not stop.is_set():
            if sub.early_exit and \
                    tcpinfo.read(sock).get("BytesAcked", 0) >= EARLY_EXIT_BYTES:
                sub.end_reason = "early_exit"
                return
            if not sub.meter(size):
                sub.end_reason = "ticket_allowance"
                return
            sub.app_bytes += size  # the frame is written before the first await
            await ws.send_bytes(payload.message(size))
            size = next_size(size, sub.app_bytes)
    finally:
        stop.set()


async def _receive(ws: web.WebSocketResponse, sub: Subtest) -> None:  # cancellable
    """Upload payload is counted; client text is a measurement (kept, bounded); binary
    during a download breaks the protocol (§5.4) and ends the subtest."""
    async for msg in ws:
        if msg.type == WSMsgType.BINARY:
            if sub.test == "download":
                sub.end_reason = "protocol_error"
                sub.error = "binary message from the client during a download"
                return
            sub.app_bytes += len(msg.data)
            if not sub.meter(len(msg.data)):
                sub.end_reason = "ticket_allowance"
                return
        elif msg.type == WSMsgType.TEXT:
            if sub.test == "upload":
                sub.app_bytes += len(msg.data)
            if (len(sub.client_measurements) < MAX_CLIENT_MEASUREMENTS
                    and len(msg.data) <= MAX_CLIENT_MEASUREMENT_BYTES
                    and sub.client_bytes + len(msg.data) <= MAX_CLIENT_MEASUREMENTS_TOTAL_BYTES):
                sub.client_bytes += len(msg.data)
                try:
                    sub.client_measurements.append(json.loads(msg.data))
                except ValueError:
                    sub.client_measurements.append({"unparsed": msg.data[:256]})
            else:
                sub.client_measurements_dropped += 1
        elif msg.type == WSMsgType.ERROR:
            sub.end_reason, sub.error = "client_error", str(ws.exception())
            return
    if sub.end_reason == "running":
        sub.end_reason = "client_closed"


async def _jobs(ws: web.WebSocketResponse, sub: Subtest, sock: Any, runtime_s: float) -> None:
    """Measurer, receiver and (download) sender until the runtime ends or one of them
    ends the subtest. Only the receiver, idle in receive(), is cancelled; the others
    stop at ``stop``."""
    stop = asyncio.Event()

    async def receive() -> None:
        try:
            await _receive(ws, sub)
        finally:
            stop.set()

    async with asyncio.TaskGroup() as group:
        group.create_task(_measure(ws, sub, sock, random.Random(), runtime_s, stop))
        if sub.test == "download":
            group.create_task(_send(ws, sub, sock, stop))
        receiver = group.create_task(receive())
        await stop.wait()
        receiver.cancel()


async def _run(ws: web.WebSocketResponse, sub: Subtest, sock: Any, runtime_s: float) -> None:
    """The subtest, then the Close handshake when it ended cleanly. After a reset or the
    hard limit the connection is dropped instead (the caller aborts it): jobs cancelled
    mid-send leave aiohttp unable to send a Close."""
    try:
        async with asyncio.timeout(MAX_RUNTIME_S):
            try:
                await _jobs(ws, sub, sock, runtime_s)
            except* (ConnectionError, RuntimeError) as group:
                # A reset, or a write to a closing transport: a warning, not a failure
                # (§5.4: tolerate abrupt EOF/RST).
                sub.end_reason = "client_reset"
                sub.error = "; ".join(str(e) for e in group.exceptions)[:300]
            if sub.end_reason == "running":
                sub.end_reason = "done"
            if sub.end_reason != "client_reset" and not ws.closed:
                await ws.close(code=1000, message=b"Done sending")
    except TimeoutError:
        sub.end_reason, sub.error = "hard_limit", f"still open at {MAX_RUNTIME_S} s"


def handler(test: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        offered = [p.strip() for p in
                   request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
        if SUBPROTOCOL not in offered:
            raise ApiError(400, f"ndt7 needs the WebSocket subprotocol {SUBPROTOCOL} "
                           "(Sec-WebSocket-Protocol header)")
        try:
            metadata, early = parse_query(request.query_string)
        except ValueError as exc:
            raise ApiError(400, f"ndt7 query: {exc}") from None
        claims = await presented(request)
        runtime = request.app[MEASUREMENT_CONFIG].ndt7_runtime_s
        # Under a ticket with less time left than a subtest's, refused now (403
        # allowance_duration), not cut short (its Close may come up to MAX_RUNTIME_S -
        # runtime later: the ledger counts the time it took).
        async with request.app[SLOTS].slot(request.remote, claims,
                                           seconds=runtime) as transfer:
            runtime = min(runtime, transfer.seconds)  # measurement.max_duration_s
            # timeout: how long our Close waits for the client's; the client's comes after
            # all it had queued (ndt7-js keeps up to 56 MiB queued in uploads), so it gets
            # the rest of the hard limit. Past that, the connection is dropped, which
            # clients must tolerate (§5.4).
            ws = web.WebSocketResponse(protocols=(SUBPROTOCOL,), compress=False,
                                       max_msg_size=MAX_RECEIVE_MESSAGE,
                                       timeout=MAX_RUNTIME_S - runtime)
            if not ws.can_prepare(request).ok:
                raise ApiError(400, "ndt7 needs a WebSocket upgrade (HTTP/1.1 GET with "
                               "Upgrade: websocket)")
            transport = request.transport
            if transport is None:  # the client went away before the upgrade
                raise ApiError(400, "ndt7: connection closed before the upgrade")
            sock = transport.get_extra_info("socket")
            peer = transport.get_extra_info("peername")
            # The client's address as the handlers see it (an IPv4 client of a collector
            # on "::" is a.b.c.d, web/middleware.py plain_ipv4), with the socket's port.
            sub = Subtest(test=test, client=_addr((request.remote, peer[1]) if peer and
                                                  request.remote else peer),
                          server=_addr(transport.get_extra_info("sockname")),
                          metadata=metadata, early_exit=early and test == "download",
                          meter=(lambda n: transfer.take(n) == n) if test == "download"
                          else transfer.record)
            if sock is not None:
                tcpinfo.try_bbr(sock)
                sub.congestion_control = tcpinfo.congestion_control(sock)
                if test == "download":
                    bound_unsent(sock, 0.0)
            await ws.prepare(request)
            sub.t0, sub.start = time.monotonic(), datetime.now(UTC)
            try:
                await _run(ws, sub, sock, runtime)
            finally:
                sub.end = datetime.now(UTC)
                if not ws.closed:
                    transport.abort()
                await request.app[STORE_SUBTEST](sub)
            return ws

    return handle


STORE_SUBTEST: web.AppKey[Store] = web.AppKey("ndt7_store")


def add_routes(routes: Routes, store: Store) -> None:
    routes.app[STORE_SUBTEST] = store
    routes.get(DOWNLOAD_PATH, handler("download"), role="public")
    routes.get(UPLOAD_PATH, handler("upload"), role="public")
