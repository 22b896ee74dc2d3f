"""ndt7 client (shared/reference/protocols.md §5): one download and one upload subtest
against any ndt7 server, a bbprobe collector or an M-Lab ndt-server, computed the way
M-Lab's own clients compute them (§5.6), so the figures compare one to one:

- download: every byte of every message this client received (binary and text) over the
  time since the WebSocket opened, as ndt7-client-go and ndt7-js do;
- upload: the server's ``TCPInfo.BytesReceived / TCPInfo.ElapsedTime`` of its last
  measurement (what ndt7-client-go reports); this client's own count of bytes handed to the
  socket is kept beside it, but it includes what was still queued when the test ended;
- latency: the server's ``TCPInfo.MinRTT``; retransmission: ``BytesRetrans / BytesSent``
  (download).

Raw observations are kept: the client's (elapsed_s, bytes) samples every 250 ms and the
server's measurement messages. A failed subtest is a result with the error named, never an
exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import aiohttp

from agent import __version__, family, live, payload
from agent.schema import RequestedFamily

SUBPROTOCOL = "net.measurementlab.ndt.v7"
RUNTIME_S = 10.0
DOWNLOAD_LIMIT_S = 15.0  # ndt7-client-go's download loop
HANDSHAKE_TIMEOUT_S = 7.0
MAX_UPLOAD_MESSAGE = 1 << 20  # as ndt7-client-go
MAX_READ_MESSAGE = 1 << 24  # the spec's MUST-accept size
SAMPLE_EVERY_S = 0.25
MAX_SERVER_MESSAGES = 200


@dataclass
class Ndt7Subtest:
    test: str
    url: str
    ok: bool = False
    error: str | None = None
    throughput_bps: float | None = None
    client_bytes: int = 0
    client_elapsed_s: float = 0.0
    client_throughput_bps: float | None = None
    min_rtt_ms: float | None = None
    retrans_ratio: float | None = None
    server_end: str | None = None  # close code and reason, or how it ended
    client_samples: list[tuple[float, int]] = field(default_factory=list)
    server_measurements: list[dict[str, Any]] = field(default_factory=list)
    method: str = ""
    # The IP version asked for ("any", "ipv4", "ipv6"), the one used, and the
    # connection's local and remote addresses (None when it never connected).
    address_family_requested: str = "any"
    address_family: str | None = None
    local_address: str | None = None
    remote_address: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def endpoint(server: str, test: str, metadata: dict[str, str] | None = None) -> str:
    """``ws(s)://host:port/ndt/v7/<test>?<metadata>`` from a server given as
    ``ws://``, ``wss://``, ``http://``, ``https://`` or a bare ``host:port``; ValueError
    naming the problem otherwise."""
    if "://" not in server:
        server = "ws://" + server
    parts = urlsplit(server)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"ndt7 server {server!r}: expected ws://, wss://, http:// or "
                         "https:// and a host")
    query = urlencode({"client_name": "bbprobe", "client_version": __version__,
                       "client_library_name": "bbprobe", "client_library_version":
                       __version__, **(metadata or {})})
    return urlunsplit((scheme, parts.netloc, f"/ndt/v7/{test}", query, ""))


def _server_message(result: Ndt7Subtest, text: str) -> None:
    if len(result.server_measurements) >= MAX_SERVER_MESSAGES:
        result.server_measurements.pop(0)  # keep the latest; the last one is the summary
    try:
        message = json.loads(text)
    except ValueError:
        return
    if isinstance(message, dict):
        result.server_measurements.append(message)


def _finish(result: Ndt7Subtest) -> None:
    last: dict[str, Any] = next(
        (m for m in reversed(result.server_measurements) if "TCPInfo" in m), {})
    info: dict[str, Any] = last.get("TCPInfo", {})
    if result.client_elapsed_s > 0:
        result.client_throughput_bps = 8 * result.client_bytes / result.client_elapsed_s
    if info.get("MinRTT"):
        result.min_rtt_ms = info["MinRTT"] / 1000
    if result.test == "download":
        result.throughput_bps = result.client_throughput_bps
        if info.get("BytesSent"):
            result.retrans_ratio = info.get("BytesRetrans", 0) / info["BytesSent"]
        result.method = ("client-counted bytes of all messages / time since the "
                         "WebSocket opened (ndt7-client-go, ndt7-js)")
    else:
        if info.get("ElapsedTime") and info.get("BytesReceived") is not None:
            result.throughput_bps = 8 * info["BytesReceived"] / (info["ElapsedTime"] / 1e6)
        result.method = ("server TCPInfo.BytesReceived / TCPInfo.ElapsedTime of the last "
                         "measurement (ndt7-client-go)")
        if result.throughput_bps is None and result.ok:
            result.ok = False
            result.error = "the server sent no TCPInfo measurement; no upload figure"


def _server_rtt(observe: live.Observer, result: Ndt7Subtest, now: float) -> None:
    """The server's smoothed RTT of the download connection (TCPInfo.RTT, microseconds,
    Linux tcp_info) from its latest measurement, for the live view."""
    if result.server_measurements:
        info = result.server_measurements[-1].get("TCPInfo")
        rtt_us = info.get("RTT") if isinstance(info, dict) else None
        if isinstance(rtt_us, int | float) and rtt_us > 0:
            observe(live.RttSampled(now, rtt_us / 1000))


async def _download(ws: aiohttp.ClientWebSocketResponse, result: Ndt7Subtest,
                    observe: live.Observer = live.ignore) -> None:
    t0 = time.monotonic()
    # The server decides the download's length: 10 s by the spec (RUNTIME_S).
    observe(live.PhaseStarted("ndt7 download", t0, RUNTIME_S, transfer=True))
    next_sample = SAMPLE_EVERY_S
    async with asyncio.timeout(DOWNLOAD_LIMIT_S):
        async for msg in ws:
            now = time.monotonic() - t0
            if msg.type == aiohttp.WSMsgType.BINARY:
                result.client_bytes += len(msg.data)
            elif msg.type == aiohttp.WSMsgType.TEXT:
                result.client_bytes += len(msg.data)
                _server_message(result, msg.data)
                _server_rtt(observe, result, t0 + now)
            elif msg.type == aiohttp.WSMsgType.ERROR:
                raise ConnectionError(str(ws.exception()))
            result.client_elapsed_s = now
            if now >= next_sample:
                result.client_samples.append((round(now, 6), result.client_bytes))
                next_sample = now + SAMPLE_EVERY_S
                observe(live.BytesMoved(t0 + now, result.client_bytes))


async def _upload(ws: aiohttp.ClientWebSocketResponse, result: Ndt7Subtest,
                  runtime_s: float, observe: live.Observer = live.ignore) -> None:
    t0 = time.monotonic()
    observe(live.PhaseStarted("ndt7 upload", t0, runtime_s, transfer=True))

    async def reader() -> None:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                _server_message(result, msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                raise ConnectionError("binary message from the server during an upload")

    async def sender() -> None:
        size, next_sample = 1 << 13, SAMPLE_EVERY_S
        while (now := time.monotonic() - t0) < runtime_s:
            try:
                await ws.send_bytes(payload.message(size))
            except ConnectionError:
                if ws.close_code is not None or ws.closed:
                    return  # the server ended the subtest (its Close crossed our sends)
                raise
            result.client_bytes += size
            result.client_elapsed_s = time.monotonic() - t0
            if size < MAX_UPLOAD_MESSAGE and size <= result.client_bytes // 16:
                size *= 2
            if now >= next_sample:
                result.client_samples.append((round(now, 6), result.client_bytes))
                next_sample = now + SAMPLE_EVERY_S
                observe(live.BytesMoved(t0 + now, result.client_bytes))
        # The server closes at its 10 s, after its last measurement, and that Close ends
        # the reader. A server that never closes is closed by us a second later.
        await asyncio.sleep(1.0)
        await ws.close(code=1000, message=b"Done sending")

    async with asyncio.timeout(DOWNLOAD_LIMIT_S), asyncio.TaskGroup() as group:
        read = group.create_task(reader())
        send = group.create_task(sender())
        read.add_done_callback(lambda _: send.cancel())


async def _session(url: str, test: str, result: Ndt7Subtest,
                   ssl_context: ssl.SSLContext | bool, runtime_s: float,
                   observe: live.Observer, af: int = socket.AF_UNSPEC) -> None:
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=HANDSHAKE_TIMEOUT_S)
    headers = {"User-Agent": f"bbprobe/{__version__}"}
    # The connector resolves in family ``af`` only (AF_UNSPEC: the resolver's order).
    connector = aiohttp.TCPConnector(family=socket.AddressFamily(af))
    async with aiohttp.ClientSession(timeout=timeout, headers=headers,
                                     connector=connector) as session:
        async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
            ws = await session.ws_connect(
                url, protocols=(SUBPROTOCOL,), compress=0, max_msg_size=MAX_READ_MESSAGE,
                autoping=True, ssl=ssl_context)
        opened = ws._writer.transport  # aiohttp exposes no other way
        if opened is not None:
            result.local_address = family.host_only(opened.get_extra_info("sockname"))
            result.remote_address = family.host_only(opened.get_extra_info("peername"))
            result.address_family = family.family_of(result.remote_address)
        try:
            async with ws:
                if ws.protocol != SUBPROTOCOL:
                    raise ConnectionError(f"the server did not accept {SUBPROTOCOL}")
                await (_download(ws, result, observe) if test == "download"
                       else _upload(ws, result, runtime_s, observe))
                result.server_end = (f"close {ws.close_code}" if ws.close_code is not None
                                     else "connection ended")
        finally:
            # After a connection the server dropped (a reset, which ndt7 clients must
            # tolerate) aiohttp leaves the socket to close once its queue drains, which
            # it never will; what is still queued is of no use after the subtest.
            transport = ws._writer.transport  # aiohttp exposes no other way
            if transport is not None and not transport.is_closing():
                transport.abort()
            elif transport is not None and transport.get_write_buffer_size():
                # Closing but stuck behind its queue; a transport already closed has
                # released its loop and must not be touched again.
                with contextlib.suppress(AttributeError, RuntimeError):
                    transport.abort()


async def subtest(server: str, test: str, *, ssl_context: ssl.SSLContext | bool = True,
                  metadata: dict[str, str] | None = None,
                  runtime_s: float = RUNTIME_S,
                  observe: live.Observer = live.ignore,
                  requested: str = "any") -> Ndt7Subtest:
    """Run one ndt7 subtest; the result carries the error instead of raising. The
    download's length is the server's; ``runtime_s`` bounds the upload (10 s: ndt7).
    ``observe`` gets the live view's events at each client sample (every 250 ms).
    ``requested``: the address family, "any", "ipv4" or "ipv6" (agent/family.py); a
    server with no address of it is a failed subtest naming the family."""
    af = family.socket_family(requested)
    pinned = None if requested == "any" else requested
    try:
        url = endpoint(server, test, metadata)
    except ValueError as exc:
        return Ndt7Subtest(test=test, url=server, error=str(exc),
                           address_family_requested=requested, address_family=pinned)
    result = Ndt7Subtest(test=test, url=url, address_family_requested=requested,
                         address_family=pinned)
    host = urlsplit(url).hostname or ""
    if (problem := family.literal_problem(host, af)) is not None:
        result.error = problem
        _finish(result)
        return result
    try:
        await _session(url, test, result, ssl_context, runtime_s, observe, af)
        result.ok = True
    except* TimeoutError:
        result.error = "timed out (handshake 7 s, subtest 15 s)"
    except* aiohttp.ClientConnectorDNSError as group:
        dns = group.exceptions[0]
        assert isinstance(dns, aiohttp.ClientConnectorDNSError)
        result.error = family.unresolved(host, af, dns.os_error)
    except* aiohttp.WSServerHandshakeError as group:
        refused = group.exceptions[0]
        assert isinstance(refused, aiohttp.WSServerHandshakeError)
        result.error = f"handshake refused: HTTP {refused.status} {refused.message}"
    except* (aiohttp.ClientError, ConnectionError, OSError) as group:
        result.error = "; ".join(f"{type(e).__name__}: {e}" for e in group.exceptions)[:500]
    _finish(result)
    return result


async def run(server: str, tests: tuple[str, ...] = ("download", "upload"), *,
              ssl_context: ssl.SSLContext | bool = True,
              runtime_s: float = RUNTIME_S,
              observe: live.Observer = live.ignore,
              requested: RequestedFamily = "any") -> list[Ndt7Subtest]:
    """The subtests one after the other (download first, as every ndt7 client does);
    "both" runs them over IPv4, then over IPv6."""
    return [await subtest(server, test, ssl_context=ssl_context, runtime_s=runtime_s,
                          observe=observe, requested=one)
            for one in family.session_families(requested)
            for test in tests]
