"""Small real servers for the agent's ticket and refusal tests: a measurement
server whose refusals a test scripts, a collector that issues tickets (or not), and
tickets signed as the collector signs them (Ed25519 JWTs). Everything runs in the test's
own event loop on 127.0.0.1, port 0: real TCP, real HTTP, no mocking of the agent."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import spec
from agent.schema import UploadReport, to_dict
from agent.ticket import ISSUER, Ticket, origin, peek

KEY = Ed25519PrivateKey.generate()


def token(servers: list[str], *, expires_in_s: float = 900.0, jti: str | None = None,
          streams: int = 20, probe: str = "p1", issued_at_offset_s: float = 0.0) -> str:
    """A ticket as the collector issues it, for ``servers`` (URLs, named by origin);
    ``issued_at_offset_s``: the collector's clock against this one."""
    now = time.time() + issued_at_offset_s
    claims = {"iss": ISSUER, "sub": probe, "jti": jti or uuid.uuid4().hex,
              "aud": [origin(s) for s in servers], "iat": int(now),
              "exp": int(now + expires_in_s),
              "bbprobe": {"streams": streams, "bytes": 10**12, "duration_s": 300.0}}
    return jwt.encode(claims, KEY, algorithm="EdDSA")


def ticket(servers: list[str], *, received_at: float | None = None, **kwargs: Any
           ) -> Ticket:
    """A ticket as the agent holds it, received at monotonic ``received_at`` (None:
    now)."""
    return peek(token(servers, **kwargs),
                received_at=time.monotonic() if received_at is None else received_at)


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """``app`` on 127.0.0.1, a free port, in this event loop; yields its base URL."""
    # No lingering read of a body the client never sends (a refused upload waits for 100
    # Continue): aiohttp would hold the connection 10 s, and the test's shutdown with it.
    runner = web.AppRunner(app, access_log=None, lingering_time=0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


# (kind, the request's ticket or None, how many requests of that kind came before) ->
# a refusal to answer with, or None to serve the request.
Policy = Callable[[str, str | None, int], web.Response | None]


def admit(_kind: str, _ticket: str | None, _n: int) -> web.Response | None:
    return None


def refusal(status: int, *, retry_after: str | None = None,
            ticket_refused: str | None = None, marked: str | None = "busy") -> web.Response:
    """A refusal as the bbprobe server sends it: a 429 or 503 marked with
    spec.REFUSED_HEADER and the reason ``marked`` (None: unmarked, as a captive portal
    or a proxy on the path would send it), a 403 with ``ticket_refused``."""
    headers = {}
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    if ticket_refused is not None:
        headers[spec.TICKET_REFUSED_HEADER] = ticket_refused
    if marked is not None and status in spec.REFUSAL_STATUSES:
        headers[spec.REFUSED_HEADER] = marked
    return web.json_response({"error": f"refused ({status})"}, status=status,
                             headers=headers)


@dataclass
class MeasurementServer:
    """Download source, upload sink and capacity echo; ``policy`` decides refusals and
    ``seen`` keeps (kind, ticket header) of every request, in order."""

    policy: Policy = admit
    seen: list[tuple[str, str | None]] = field(default_factory=list)

    def _refused(self, kind: str, request: web.Request) -> web.Response | None:
        presented = request.headers.get(spec.TICKET_HEADER)
        before = sum(1 for k, _ in self.seen if k == kind)
        self.seen.append((kind, presented))
        return self.policy(kind, presented, before)

    async def download(self, request: web.Request) -> web.StreamResponse:
        refused = self._refused("download", request)
        if refused is not None:
            return refused
        size = int(request.query.get("bytes", 0)) or 10**12
        until = time.monotonic() + float(request.query.get("duration_s", 60))
        response = web.StreamResponse(headers={"Content-Length": str(size)})
        await response.prepare(request)
        chunk = b"\0" * 65536
        sent = 0
        while sent < size and time.monotonic() < until:
            piece = chunk[:size - sent]
            await response.write(piece)
            sent += len(piece)
        if sent < size:
            # A duration-mode body ends early by design (as the bbprobe server's does).
            assert request.transport is not None
            request.transport.close()
        return response

    async def refuse_early(self, request: web.Request) -> web.StreamResponse | None:
        """Before 100 Continue: a refused upload never sends its body."""
        refused = self._refused("upload", request)
        if refused is not None:
            return refused
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # as aiohttp's own expect handler
        return None

    async def upload(self, request: web.Request) -> web.Response:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        interval = float(request.query.get("sample_interval_s", 0.1))
        total = 0
        samples: list[tuple[float, int]] = [(0.0, 0)]
        async for data in request.content.iter_any():
            total += len(data)
            t = round(loop.time() - t0, 6)
            # One sample an interval, as the bbprobe sink (a report is at most 64 KiB).
            if t - samples[-1][0] >= interval:
                samples.append((t, total))
        samples.append((round(loop.time() - t0, 6), total))
        report = UploadReport(bytes_received=total, t0_monotonic_s=t0, samples=tuple(samples))
        return web.json_response(to_dict(report))

    async def echo(self, request: web.Request) -> web.Response:
        if request.query.get("capacity") == "1":
            refused = self._refused("echo", request)
            if refused is not None:
                return refused
        return web.Response(text="ok")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(spec.DOWNLOAD_PATH, self.download)
        app.router.add_post(spec.UPLOAD_PATH, self.upload, expect_handler=self.refuse_early)
        app.router.add_get(spec.ECHO_PATH, self.echo)
        return app


# A mid-body answer comes once this much of the upload's body is in.
MID_BODY_BYTES = 64 * 1024
# What the server then reads on (and discards) before it closes: far more than a client
# sends after the answer reaches it when it watches for one (a chunk, at most the 8 MiB
# payload buffer, and its socket's buffers), far less than one that does not (0.4 s at
# loopback speed: hundreds of MB).
LINGER_BYTES = 64 * 1024 * 1024


@contextlib.asynccontextmanager
async def answering_mid_body(status: int, headers: dict[str, str]) -> AsyncIterator[str]:
    """An upload sink that lets the body start (100 Continue), answers ``status`` with
    ``headers`` once MID_BODY_BYTES of it are in, as a server refusing mid-body does
    (a ticket's bytes used up), and closes as RFC 9112 §9.6 asks: the answer, its half
    of the connection, then reading on until the client closes or LINGER_BYTES came,
    then a reset (unread data). Yields its base URL; ``tickets`` in the yielded
    server record the ticket header of each request."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            got = 0
            while got < MID_BODY_BYTES:
                data = await reader.read(65536)
                if not data:
                    return
                got += len(data)
            body = json.dumps({"error": f"refused ({status})"}).encode()
            head = [f"HTTP/1.1 {status} Refused", "Connection: close",
                    "Content-Type: application/json", f"Content-Length: {len(body)}",
                    *(f"{k}: {v}" for k, v in headers.items())]
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
            await writer.drain()
            writer.transport.get_extra_info("socket").shutdown(socket.SHUT_WR)
            more = 0
            while more < LINGER_BYTES:
                data = await reader.read(1 << 20)
                if not data:
                    break
                more += len(data)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.close()
        await server.wait_closed()


@dataclass
class FakeCollector:
    """The instruction and the ticket endpoints as a ticket-issuing collector answers
    them (``issue`` None: one that issues none, 404 to the POST, no header); ``requests``
    keeps (method, path, Bbprobe-Want-Ticket) of each."""

    issue: Callable[[], str] | None = None
    # The ticket header to send instead of a real one (garbage, for tests).
    header: str | None = None
    post_status: int = 200
    post_delay_s: float = 0.0
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    etag: str = '"0123456789abcdef"'

    async def instruction(self, request: web.Request) -> web.Response:
        wanted = request.headers.get(spec.TICKET_REQUEST_HEADER)
        self.requests.append(("GET", request.path, wanted))
        headers = {"ETag": self.etag}
        if wanted == "1" and self.header is not None:
            headers[spec.TICKET_HEADER] = self.header
        elif wanted == "1" and self.issue is not None:
            headers[spec.TICKET_HEADER] = self.issue()
        if request.headers.get("If-None-Match") == self.etag:
            return web.Response(status=304, headers=headers)
        doc = {"version": self.etag.strip('"'), "settings": {}, "suppressions": []}
        return web.json_response(doc, headers=headers)

    async def tickets(self, request: web.Request) -> web.Response:
        self.requests.append(("POST", request.path, None))
        await asyncio.sleep(self.post_delay_s)
        if self.issue is None:
            return web.json_response({"error": "tickets are not issued here"}, status=404)
        if self.post_status != 200:
            return web.json_response({"error": "no"}, status=self.post_status)
        issued = self.issue()
        return web.Response(text=json.dumps({"ticket": issued}),
                            content_type="application/json")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(spec.INSTRUCTION_PATH, self.instruction)
        app.router.add_post(spec.TICKETS_PATH, self.tickets)
        return app
