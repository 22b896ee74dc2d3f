"""A minimal HTTP/1.1 client for measurement transfers, one request per connection.

Why not aiohttp here: its client copies every received chunk into a new ``bytes`` and
through a stream reader; at 8-12 Gbit/s that saturates one core and the probe, not the
line, sets the number (measured on a veth pair where iperf3 -P1 moves ~30 Gbit/s).
``asyncio.BufferedProtocol`` has the kernel write straight into one reused buffer and
calls us once per read, so the receive path costs little more than the kernel's copy.
aiohttp still carries everything else (the collector API).

Scope, deliberately small: GET with a Content-Length response body (the bbprobe server
always sends one) and POST with ``Expect: 100-continue`` and a chunked or sized body.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from agent import family, neterrors, payload, spec
from agent.errors import AgentError
from agent.schema import REASON_CODE_RE

CONNECT_TIMEOUT_S = 10.0
# After an upload's write broke, how long the server's answer may still take to be read
# (it is normally in the socket already: the server answered, then closed).
ANSWER_GRACE_S = 1.0
MAX_HEAD_BYTES = 64 * 1024
RECEIVE_BUFFER_BYTES = 1024 * 1024
# Upload chunks are sized to last about this long at the observed rate (see _send_body).
CHUNK_TARGET_S = 0.01
MIN_CHUNK_BYTES = 16 * 1024
# Unsent bytes the kernel may hold for an upload socket (payload.unsent_bound), as time
# at the observed rate.
NOTSENT_TARGET_S = 0.02
MIN_NOTSENT_BYTES = 16 * 1024


class WireError(AgentError):
    """A protocol-level failure: ``kind`` is "connect", "http", "broken" or "protocol".

    An "http" error keeps what a refusal says about itself, as the server sent it:
    ``retry_after`` (the Retry-After header of a 429 or 503), ``refused``
    (spec.REFUSED_HEADER: a bbprobe server's mark on its own capacity refusal, and its
    reason) and ``ticket_refused`` (spec.TICKET_REFUSED_HEADER of a 403: the reason the
    server refused the ticket); and ``ticket_presented``, whether the request carried
    a ticket (a ticket refusal of a request that presented none is not one)."""

    def __init__(self, kind: str, message: str, status: int | None = None, *,
                 retry_after: str | None = None, refused: str | None = None,
                 ticket_refused: str | None = None, ticket_presented: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.retry_after = retry_after
        self.refused = refused
        self.ticket_refused = ticket_refused
        self.ticket_presented = ticket_presented


@dataclass(slots=True)
class Head:
    status: int
    reason: str
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("content-length")
        return int(value) if value is not None and value.isdigit() else None


def parse_head(raw: bytes) -> Head:
    """Status line and header fields of a response head (without the blank line). Pure."""
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise WireError("protocol", f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    head = Head(status=int(parts[1]), reason=parts[2] if len(parts) > 2 else "")
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            head.headers[name.strip().lower()] = value.strip()
    return head


def reason_code(value: str) -> str:
    """The reason a server gave for a refusal (spec.TICKET_REFUSED_HEADER,
    spec.REFUSED_HEADER), as recorded: its code when it is one (lower-case letters,
    digits, underscores: malformed, expired, wrong_server, busy...), else "unspecified"
    (the header is the server's text: it does not go into a result unchecked)."""
    code = value.strip().lower()
    return code if REASON_CODE_RE.fullmatch(code) else "unspecified"


def status_error(head: Head, message: str, *, presented: bool = False) -> WireError:
    """The "http" error for a final response other than 200, with its refusal headers;
    ``presented``: the request carried a ticket."""
    return WireError("http", message, head.status,
                     retry_after=head.headers.get("retry-after"),
                     refused=head.headers.get(spec.REFUSED_HEADER.lower()),
                     ticket_refused=head.headers.get(spec.TICKET_REFUSED_HEADER.lower()),
                     ticket_presented=presented)


def server_refused(exc: WireError) -> bool:
    """Whether ``exc`` is the measurement server's own refusal for capacity: a 429 or 503
    it marked with spec.REFUSED_HEADER. One without the mark may come from anything on
    the path (a captive portal, an operator's proxy under load): it is the line's
    failure, as any other status. Pure."""
    return exc.kind == "http" and exc.status in spec.REFUSAL_STATUSES and \
        exc.refused is not None


def ticket_refusal(exc: WireError) -> str | None:
    """The server's code when ``exc`` refuses the ticket the request presented (403 with
    spec.TICKET_REFUSED_HEADER), else None: a request that presented no ticket had none
    to refuse. Pure."""
    if exc.kind != "http" or exc.status != 403 or exc.ticket_refused is None or \
            not exc.ticket_presented:
        return None
    return reason_code(exc.ticket_refused)


class _Connection(asyncio.BufferedProtocol):
    """Receives a response: head parsed, body counted (and kept only if asked)."""

    def __init__(self, on_head: Callable[[int], None] | None,
                 on_body: Callable[[int], None] | None, keep_body: bool) -> None:
        self._buffer = memoryview(bytearray(RECEIVE_BUFFER_BYTES))
        self._head = bytearray()
        self._on_head = on_head
        self._on_body = on_body
        self.keep_body = keep_body
        self.body = bytearray()
        self.body_bytes = 0
        self.head: Head | None = None
        loop = asyncio.get_running_loop()
        self.continued: asyncio.Future[None] = loop.create_future()
        self.head_ready: asyncio.Future[Head] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self._can_write = asyncio.Event()
        self._can_write.set()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self.head is not None:
            self._body(self._buffer, nbytes)
            return
        self._head += self._buffer[:nbytes]
        while self.head is None:
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > MAX_HEAD_BYTES:
                    self._fail(WireError("protocol", "response head larger than 64 KiB"))
                return
            try:
                head = parse_head(bytes(self._head[:end]))
            except WireError as exc:
                self._fail(exc)
                return
            rest = bytes(self._head[end + 4 :])
            self._head = bytearray(rest)
            if 100 <= head.status < 200:
                if not self.continued.done():
                    self.continued.set_result(None)
                continue  # an interim response; the final head follows
            self.head = head
            if self._on_head is not None:
                self._on_head(head.status)  # before any body byte is counted
            if not self.head_ready.done():
                self.head_ready.set_result(head)
            if rest:
                self._body(memoryview(rest), len(rest))

    def _body(self, data: memoryview, nbytes: int) -> None:
        self.body_bytes += nbytes
        if self.keep_body:
            if len(self.body) + nbytes > MAX_HEAD_BYTES:
                self._fail(WireError("protocol", "response body larger than expected"))
                return
            self.body += data[:nbytes]
        if self._on_body is not None:
            self._on_body(nbytes)
        length = self.head.content_length if self.head else None
        if length is not None and self.body_bytes >= length and not self.closed.done():
            self.closed.set_result(None)

    def _fail(self, exc: Exception) -> None:
        for future in (self.continued, self.head_ready, self.closed):
            if not future.done():
                future.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._can_write.set()
        error = WireError("broken", f"connection closed by the server ({exc or 'EOF'})")
        for future in (self.continued, self.head_ready):
            if not future.done():
                future.set_exception(error)
        if not self.closed.done():
            self.closed.set_result(None)
        # Nobody may be waiting on the early futures any more: mark them retrieved.
        for future in (self.continued, self.head_ready):
            if future.done() and not future.cancelled():
                future.exception()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    async def drain(self) -> None:
        await self._can_write.wait()
        if self.transport is None or self.transport.is_closing():
            raise WireError("broken", "connection closed by the server during the upload")


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    port: int
    tls: bool
    host_header: str
    base_path: str


def target(base_url: str) -> Target:
    parts = urlsplit(base_url)
    tls = parts.scheme == "https"
    if parts.hostname is None:
        raise WireError("connect", f"no host in {base_url!r}")
    port = parts.port or (443 if tls else 80)
    host_header = parts.netloc.rsplit("@", 1)[-1]
    return Target(parts.hostname, port, tls, host_header, parts.path.rstrip("/"))


# Told (sockname, peername) of each connection as it opens: the addresses a session used.
OnConnect = Callable[[object, object], None]


async def _connect(t: Target, on_head: Callable[[int], None] | None,
                   on_body: Callable[[int], None] | None, keep_body: bool,
                   af: int = socket.AF_UNSPEC, on_connect: OnConnect | None = None
                   ) -> _Connection:
    """Open the connection, in address family ``af`` only (AF_UNSPEC: the resolver's
    order; agent/family.py). A host with no address of the family is a "connect"
    failure naming the family."""
    loop = asyncio.get_running_loop()
    context = ssl.create_default_context() if t.tls else None
    problem = family.literal_problem(t.host, af)
    if problem is not None:
        raise WireError("connect", f"cannot connect to {t.host_header}: {problem}")
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            transport, conn = await loop.create_connection(
                lambda: _Connection(on_head, on_body, keep_body), t.host, t.port, ssl=context,
                server_hostname=t.host if t.tls else None, family=af,
            )
    except TimeoutError:
        raise WireError("connect", f"connect to {t.host}:{t.port} timed out") from None
    except socket.gaierror as exc:
        raise WireError("connect", f"cannot connect to {t.host_header}: "
                                   f"{family.unresolved(t.host, af, exc)}") from None
    except OSError as exc:
        # From exc: its errno tells a refusal (nothing listens) from the rest.
        raise WireError("connect", f"cannot connect to {t.host}:{t.port}: "
                                   f"{neterrors.describe(exc)}") from exc
    if on_connect is not None:
        on_connect(transport.get_extra_info("sockname"), transport.get_extra_info("peername"))
    return conn


def _request_head(method: str, t: Target, path_qs: str, extra: dict[str, str]) -> bytes:
    lines = [f"{method} {t.base_path}{path_qs} HTTP/1.1", f"Host: {t.host_header}",
             "User-Agent: bbprobe-agent", "Connection: close",
             *(f"{k}: {v}" for k, v in extra.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _check_status(head: Head, t: Target, path: str, presented: bool) -> None:
    if head.status != 200:
        raise status_error(head, f"HTTP {head.status} {head.reason} from "
                                 f"{t.host_header}{t.base_path}{path}", presented=presented)


async def download(base_url: str, path_qs: str, on_head: Callable[[int], None],
                   on_body: Callable[[int], None], stop_at: float | None,
                   af: int = socket.AF_UNSPEC, on_connect: OnConnect | None = None, *,
                   headers: Mapping[str, str] | None = None) -> int:
    """GET ``path_qs``; ``on_head(status)`` is called when the head is complete and
    before any body byte, ``on_body(n)`` as bytes land. Reading ends at EOF, at
    Content-Length, or at loop time ``stop_at``. Returns the body bytes received.
    ``af`` and ``on_connect``: see ``_connect``; ``headers`` go with the request (the
    session's ticket)."""
    t = target(base_url)
    conn = await _connect(t, on_head, on_body, keep_body=False, af=af, on_connect=on_connect)
    assert conn.transport is not None
    try:
        conn.transport.write(_request_head("GET", t, path_qs, dict(headers or {})))
        async with asyncio.timeout_at(stop_at):
            head = await conn.head_ready
            _check_status(head, t, path_qs, spec.TICKET_HEADER in (headers or {}))
        expected = head.content_length
        if expected is None:
            raise WireError("protocol", "response has no Content-Length")
        try:
            async with asyncio.timeout_at(stop_at):
                await conn.closed
        except TimeoutError:
            return conn.body_bytes  # the window ended: the normal end of a timed test
        if conn.body_bytes < expected and stop_at is None:
            raise WireError("broken", f"connection closed after {conn.body_bytes} of "
                                      f"{expected} bytes")
        return conn.body_bytes
    finally:
        conn.transport.abort()


async def upload(base_url: str, path_qs: str, size: int | None,
                 on_sent: Callable[[int], None], stop_at: float | None,
                 loop_time: Callable[[], float], af: int = socket.AF_UNSPEC,
                 on_connect: OnConnect | None = None, *,
                 headers: Mapping[str, str] | None = None) -> tuple[Head, bytes]:
    """POST ``path_qs`` with ``size`` bytes (None: chunked, until loop time ``stop_at``).

    Sends ``Expect: 100-continue`` and waits for the interim response before the body,
    so the server can count the body on its fast path (and refuse it, 429 or 403, before
    any is sent). A server may also answer mid-body (a ticket's bytes used up: 403) and
    close: the upload then fails with that answer, not with the broken write it caused.
    Returns the final head and body. ``headers`` go with the request.
    """
    t = target(base_url)
    presented = spec.TICKET_HEADER in (headers or {})
    conn = await _connect(t, None, None, keep_body=True, af=af, on_connect=on_connect)
    transport = conn.transport
    assert transport is not None
    extra = {**(headers or {}), "Content-Type": "application/octet-stream",
             "Expect": "100-continue"}
    if size is None:
        extra["Transfer-Encoding"] = "chunked"
    else:
        extra["Content-Length"] = str(size)
    try:
        transport.write(_request_head("POST", t, path_qs, extra))
        waiters: list[asyncio.Future[object]] = [conn.continued, conn.head_ready]  # type: ignore[list-item]
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if conn.head_ready in done:  # refused before the body (4xx with a reason)
            head = conn.head_ready.result()
            # The reason, if it comes: a refusal is one whether or not its body does.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(conn.closed), CONNECT_TIMEOUT_S)
            raise status_error(head, f"HTTP {head.status}: {_reason(conn.body)}",
                               presented=presented)
        conn.continued.result()
        try:
            await _send_body(conn, size, on_sent, stop_at, loop_time)
        except WireError as exc:
            # The server answered mid-body and closed (a refusal: 403 for the ticket's
            # bytes, 429): the broken write is its consequence, the answer the cause.
            answer = await _answer(conn) if exc.kind == "broken" else None
            if answer is None or answer.status == 200:
                raise
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(conn.closed), ANSWER_GRACE_S)
            raise status_error(answer, f"HTTP {answer.status} during the upload: "
                                       f"{_reason(conn.body)}", presented=presented) from None
        head = await conn.head_ready
        await conn.closed
        if head.status != 200:
            raise status_error(head, f"HTTP {head.status}: {_reason(conn.body)}",
                               presented=presented)
        return head, bytes(conn.body)
    finally:
        transport.abort()


async def _answer(conn: _Connection) -> Head | None:
    """The server's final answer after a broken write: the head when it has come, or
    comes within ANSWER_GRACE_S (sendfile pauses reading, so an answer may still sit in
    the socket, read once the loop runs; a reset or EOF settles it at once); else None."""
    try:
        async with asyncio.timeout(ANSWER_GRACE_S):
            return await asyncio.shield(conn.head_ready)
    except (TimeoutError, WireError):
        return None


async def _send_body(conn: _Connection, size: int | None, on_sent: Callable[[int], None],
                     stop_at: float | None, loop_time: Callable[[], float]) -> None:
    """Send ``size`` bytes (None: chunked until ``stop_at``) with ``loop.sendfile`` from the
    payload file, or until the server answers (the caller then reads the answer). Chunks
    last about ``CHUNK_TARGET_S`` at the rate seen so far, so the stop time is honoured on
    a 2 Mbit/s line and per-call overhead stays small at 10 Gbit/s; a chunk is never cut,
    so the chunked framing is always whole."""
    loop = asyncio.get_running_loop()
    transport = conn.transport
    assert transport is not None
    source = payload.file()
    file_size = len(payload.buffer())
    chunk = MIN_CHUNK_BYTES
    remaining = size
    started = loop_time()
    sent = 0
    raw = transport.get_extra_info("socket")
    notsent = 0

    def bound_unsent(rate_bps: float) -> None:
        nonlocal notsent
        want = payload.unsent_bound(rate_bps, NOTSENT_TARGET_S, MIN_NOTSENT_BYTES)
        # Set again when the bound falls or at least doubles, not at every chunk.
        if raw is not None and not notsent <= want < 2 * notsent:
            payload.limit_unsent(raw, want)
            notsent = want

    bound_unsent(0.0)
    # The chunk's closing CRLF goes out with the next chunk's size line (or the last
    # chunk): one write fewer a chunk, and none after the server has answered.
    closing = b""
    while remaining is None or remaining > 0:
        if stop_at is not None and loop_time() >= stop_at:
            break
        # RFC 9112 §9.5: a client sending a body watches for an answer meanwhile, and
        # stops sending when one comes (a refusal mid-body: the server then closes, and
        # an answer still unread when its reset arrives is lost, RFC 9112 §9.6).
        # sendfile pauses reading, so the loop gets two turns between chunks: one
        # polls the socket, the next runs after its read.
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        if conn.head_ready.done():
            return
        count = chunk if remaining is None else min(chunk, remaining)
        if size is None:
            transport.write(closing + b"%x\r\n" % count)
            closing = b"\r\n"
        try:
            await loop.sendfile(transport, source, 0, count)
        except (ConnectionError, RuntimeError) as exc:
            raise WireError("broken", f"connection closed during the upload: {exc}") from None
        sent += count
        on_sent(count)
        if remaining is not None:
            remaining -= count
        elapsed = loop_time() - started
        if elapsed > 0:
            rate = sent * 8 / elapsed
            chunk = int(min(max(rate / 8 * CHUNK_TARGET_S, MIN_CHUNK_BYTES), file_size))
            bound_unsent(rate)
    if size is None:
        transport.write(closing + b"0\r\n\r\n")
    await conn.drain()


def _reason(body: bytes | bytearray) -> str:
    import json

    try:
        data = json.loads(body)
        if isinstance(data, dict) and isinstance(data.get("error"), str):
            return str(data["error"])
    except ValueError:
        pass
    return body[:200].decode("utf-8", "replace") or "no reason given"
