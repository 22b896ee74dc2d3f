"""Measurement endpoints the agent tests against: download source, upload sink, echo.

- ``GET /measure/v1/download?bytes=N`` sends exactly N bytes; ``?duration_s=S`` sends for S
  seconds, then closes the connection. Both: whichever ends first. The response always
  carries Content-Length (N, or the byte cap), so clients count payload bytes exactly
  with no chunk framing; a duration-mode body ends early by design.
- ``POST /measure/v1/upload[?bytes=N][&duration_s=S][&sample_interval_s=I]`` reads the body
  and answers with an ``UploadReport``: bytes received and (t, bytes) samples on the
  server's monotonic clock, so upload rates are computed at the receiver.
  With ``Expect: 100-continue`` (the bbprobe agent sends it) the body is counted by
  ``BodyCounter`` straight from the socket into one reused buffer; aiohttp's stream reader
  copies every chunk and caps a core at about 10 Gbit/s, about a third of what the
  kernel moves over a veth pair. Other clients get the plain aiohttp path.
- ``GET /measure/v1/echo`` answers at once with a tiny body, for HTTP round-trip times;
  ``?capacity=1``: 200 only if a transfer from this client (its ticket, if it presents
  one, else its address) would be admitted now, else the refusal it would get (429, 503,
  403), without taking a slot (the agent tells a busy server from a broken one). Such
  asks are no transfers (not counted as refused ones) and each client (an address or a
  /64) may make a few a second (slots.py CAPACITY_ASKS_PER_MIN; 429 beyond).

Under a ticket, a transfer asking for more than the ticket has left (``duration_s``
above its remaining seconds, ``bytes`` or an upload's length above its remaining bytes)
is refused at once (403, allowance_duration / allowance_bytes), so a started transfer is
not cut by the allowance (but where the ticket's concurrent transfers use it up); an
upload stopped at its ticket's time is that refusal too, not a 413.

Every transfer is bounded by ``measurement.max_bytes`` and ``max_duration_s`` (less under a
ticket with less left: slots.py), and at most ``max_concurrent`` run at once (503 +
Retry-After beyond), so an open measurement port cannot be turned into an unbounded load.
A ticket's bytes are counted as they move (per sendfile call, per received buffer), so
its transfers together stop near its allowance.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from agent import payload, spec
from agent.schema import UploadReport, to_dict
from collector.errors import ApiError, CollectorError
from collector.limits import RateLimiter
from collector.measurement.slots import (
    CAPACITY_LIMITER,
    MEASUREMENT_CONFIG,
    SLOTS,
    Transfer,
    capacity_refused,
    client_key,
    presented,
)
from collector.metrics import count
from collector.routing import Routes

NO_STORE = {"Cache-Control": "no-store", "Content-Encoding": "identity"}
DEFAULT_SAMPLE_INTERVAL_S = 0.1


def _number(request: web.Request, name: str, kind: type[int] | type[float],
            low: float, high: float) -> float | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        value = kind(raw)
    except ValueError:
        raise ApiError(400, f"{name}: expected a number, got {raw!r}", field=name) from None
    if not low <= value <= high:
        raise ApiError(400, f"{name}: must be within {low:g}..{high:g}, got {raw}", field=name)
    return value


async def download(request: web.Request) -> web.StreamResponse:
    cfg = request.app[MEASUREMENT_CONFIG]
    nbytes = _number(request, "bytes", int, 1, cfg.max_bytes)
    duration = _number(request, "duration_s", float, 0.001, cfg.max_duration_s)
    if nbytes is None and duration is None:
        raise ApiError(400, "give bytes=N or duration_s=S (or both)")
    claims = await presented(request)
    async with request.app[SLOTS].slot(
            request.remote, claims, seconds=duration,
            nbytes=None if nbytes is None else int(nbytes)) as transfer:
        loop = asyncio.get_running_loop()
        seconds = min(duration if duration is not None else cfg.max_duration_s,
                      transfer.seconds)
        deadline = loop.time() + seconds
        response = web.StreamResponse(
            headers={**NO_STORE, "Content-Type": "application/octet-stream"}
        )
        response.content_length = int(nbytes) if nbytes is not None else transfer.bytes
        response.force_close()  # one transfer per connection; an early end closes it
        await response.prepare(request)
        transport = request.transport
        if transport is None:
            return response  # the client is already gone
        source = payload.file()
        size = len(payload.buffer())
        remaining = response.content_length or 0
        try:
            # sendfile: the kernel sends from the page cache (as aiohttp's FileResponse).
            async with asyncio.timeout_at(deadline):
                while remaining > 0:
                    # The ticket's other transfers may have used its bytes meanwhile:
                    # then the body ends short (the connection closes, force_close).
                    count = transfer.take(min(size, remaining))
                    if not count:
                        break
                    await loop.sendfile(transport, source, 0, count)
                    remaining -= count
        except TimeoutError:
            pass  # duration reached: the connection is closed (force_close above)
        except (ConnectionError, RuntimeError):
            pass  # the client stopped reading: the normal end of a duration-mode test
        return response


# One receive buffer for every fast-path upload: the loop calls get_buffer() and
# buffer_updated() back to back for one transport, and the payload is only counted.
_RECEIVE_STORE = bytearray(1024 * 1024)
_RECEIVE_BUFFER = memoryview(_RECEIVE_STORE)
_MAX_LINE = 4096


class BodyError(CollectorError):
    """The upload body was malformed or cut short."""


class AllowanceUsed(BodyError):
    """The upload's ticket has no bytes left."""


class BodyCounter(asyncio.BufferedProtocol):
    """Counts one HTTP request body (Content-Length or chunked, RFC 9112 §7.1) as it
    arrives, keeping (t, bytes) samples. Installed on the transport in place of aiohttp's
    protocol for the body only; lifecycle and write flow-control calls are forwarded to
    aiohttp's protocol, which is put back afterwards."""

    def __init__(self, inner: asyncio.BaseProtocol, content_length: int | None,
                 chunked: bool, t0: float, interval: float, max_bytes: int,
                 meter: Callable[[int], bool] = lambda n: True) -> None:
        self.inner = inner
        self.meter = meter  # told each buffer's body bytes; False: stop (ticket used up)
        self.loop = asyncio.get_running_loop()
        self.t0 = t0
        self.interval = interval
        self.max_bytes = max_bytes
        self.total = 0
        self.samples: list[tuple[float, int]] = [(0.0, 0)]
        self.last = 0.0
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.chunked = chunked
        # Content-Length bodies are one "chunk" of known size.
        self.state = "size" if chunked else "data"
        self.remaining = content_length if content_length is not None else 0
        self.line = bytearray()
        if not chunked and not self.remaining:
            self._finish()

    # --- body parsing ----------------------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        return _RECEIVE_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        if self.done.done():
            return
        before = self.total
        try:
            self._consume(nbytes)
        except BodyError as exc:
            self.done.set_exception(exc)
            return
        if not self.meter(self.total - before) and not self.done.done():
            self.done.set_exception(AllowanceUsed())
            return
        now = self.loop.time() - self.t0
        if now - self.last >= self.interval:
            self.samples.append((now, self.total))
            self.last = now
        if self.total > self.max_bytes and not self.done.done():
            self.done.set_exception(BodyError(f"upload exceeds the {self.max_bytes}-byte limit"))

    def _consume(self, n: int) -> None:
        buf = _RECEIVE_BUFFER
        pos = 0
        while pos < n and self.state != "done":
            if self.state == "data":
                take = min(self.remaining, n - pos)
                self.total += take
                self.remaining -= take
                pos += take
                if self.remaining == 0:
                    if self.chunked:
                        self.state = "crlf"
                    else:
                        self._finish()
            else:
                # Search the buffer in place: copying the rest of a 1 MiB read at every
                # chunk boundary would cost more than counting the body.
                newline = _RECEIVE_STORE.find(b"\n", pos, n)
                if newline < 0:
                    self.line += buf[pos:n]
                    pos = n
                    if len(self.line) > _MAX_LINE:
                        raise BodyError("chunk framing line too long")
                    continue
                self.line += buf[pos : newline + 1]
                pos = newline + 1
                self._line_done(bytes(self.line).rstrip(b"\r\n"))
                self.line.clear()

    def _line_done(self, line: bytes) -> None:
        if self.state == "crlf":
            if line:
                raise BodyError("missing CRLF after chunk data")
            self.state = "size"
        elif self.state == "size":
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise BodyError(f"bad chunk size {size_text[:20]!r}") from None
            if size < 0:
                raise BodyError("negative chunk size")
            if size == 0:
                self.state = "trailer"
            else:
                self.remaining = size
                self.state = "data"
        elif self.state == "trailer" and not line:
            self._finish()

    def _finish(self) -> None:
        self.state = "done"
        end = self.loop.time() - self.t0
        if self.samples[-1] != (end, self.total):
            self.samples.append((end, self.total))
        if not self.done.done():
            self.done.set_result(None)

    # --- lifecycle, forwarded to aiohttp's protocol ------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # pragma: no cover
        pass  # never called: the protocol is installed on a live transport

    def eof_received(self) -> bool:
        if not self.done.done():
            self.done.set_exception(BodyError(
                f"connection closed after {self.total} body bytes, before the body ended"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(BodyError("connection lost during the upload"))
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


async def upload(request: web.Request) -> web.Response:
    cfg = request.app[MEASUREMENT_CONFIG]
    expected = _number(request, "bytes", int, 1, cfg.max_bytes)
    duration = _number(request, "duration_s", float, 0.001, cfg.max_duration_s)
    interval = _number(request, "sample_interval_s", float, 0.01, 1.0)
    interval = interval if interval is not None else DEFAULT_SAMPLE_INTERVAL_S
    if request.content_length is not None and request.content_length > cfg.max_bytes:
        raise ApiError(413, f"upload of {request.content_length} bytes exceeds the "
                            f"{cfg.max_bytes}-byte limit")
    expect = request.headers.get("Expect", "")
    if expect and expect.lower() != "100-continue":
        raise ApiError(417, f"unsupported Expect: {expect!r}")
    claims = await presented(request)
    announced = max(request.content_length or 0, int(expected or 0))
    async with request.app[SLOTS].slot(request.remote, claims, seconds=duration,
                                       nbytes=announced or None) as transfer:
        asked_s = duration if duration is not None else cfg.max_duration_s
        limit_s = min(asked_s, transfer.seconds)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        fast = bool(expect) and request.transport is not None
        try:
            async with asyncio.timeout(limit_s):
                if fast:
                    samples, total = await _count_fast(request, t0, interval, transfer)
                else:
                    samples, total = await _count_stream(request, t0, interval, transfer)
        except TimeoutError:
            if limit_s < asked_s:  # the ticket's time, not the request's
                raise transfer.out_of_time() from None
            raise ApiError(
                413, f"upload still running after {limit_s:g} s (duration_s limit)"
            ) from None
        if expected is not None and total != expected:
            raise ApiError(400, f"received {total} bytes, expected {int(expected)}")
        report = UploadReport(bytes_received=total, t0_monotonic_s=t0, samples=tuple(samples))
        response = web.json_response(to_dict(report), headers={"Cache-Control": "no-store"})
        if fast:
            # aiohttp's parser never saw this body, so the connection cannot carry another
            # request: close it after the report.
            response.force_close()
        return response


async def _count_fast(request: web.Request, t0: float, interval: float,
                      transfer: Transfer) -> tuple[list[tuple[float, int]], int]:
    """Swap in ``BodyCounter``, then invite the body with 100 Continue (nothing of the body
    can have reached aiohttp's parser: a client that sent Expect waits for it)."""
    transport = request.transport
    assert transport is not None
    inner = transport.get_protocol()
    chunked = request.headers.get("Transfer-Encoding", "").lower() == "chunked"
    counter = BodyCounter(inner, None if chunked else (request.content_length or 0), chunked,
                          t0, interval, transfer.bytes, transfer.record)
    transport.set_protocol(counter)
    drain = False
    try:
        transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await counter.done
    except AllowanceUsed:
        # The counter stays, discarding what is left of the body (aiohttp's parser must
        # not read it as a request) until the refusal is sent and the connection closed.
        drain = True
        raise transfer.over() from None
    except BodyError as exc:
        raise ApiError(413 if "limit" in str(exc) else 400, str(exc)) from None
    finally:
        if not transport.is_closing() and not drain:
            transport.set_protocol(inner)
        # The body is consumed: tell aiohttp, or it lingers waiting to drain it.
        request.content.feed_eof()
    return counter.samples, counter.total


async def _count_stream(request: web.Request, t0: float, interval: float,
                        transfer: Transfer) -> tuple[list[tuple[float, int]], int]:
    """Plain aiohttp path for clients that do not send Expect: 100-continue."""
    loop = asyncio.get_running_loop()
    samples: list[tuple[float, int]] = [(0.0, 0)]
    total = 0
    last = 0.0
    max_bytes = transfer.bytes
    while chunk := await request.content.readany():
        total += len(chunk)
        if not transfer.record(len(chunk)):
            raise transfer.over()
        now = loop.time() - t0
        if now - last >= interval:
            samples.append((now, total))
            last = now
        if total > max_bytes:
            raise ApiError(413, f"upload exceeds the {max_bytes}-byte limit")
    end = loop.time() - t0
    if samples[-1] != (end, total):
        samples.append((end, total))
    return samples, total


async def echo(request: web.Request) -> web.Response:
    capacity = request.query.get("capacity")
    if capacity is not None:
        if capacity not in ("0", "1"):
            raise ApiError(400, f"capacity: expected 1 (or 0), got {capacity[:20]!r}",
                           field="capacity")
        if capacity == "1":
            _within_capacity_asks(request)
            # The refusal a transfer would get now (a refused ticket's too), no slot
            # taken, and not counted as a refused transfer: none was asked for.
            request.app[SLOTS].check(request.remote, await presented(request, count=False),
                                     count=False)
    return web.Response(text="ok", headers={"Cache-Control": "no-store"})


def _within_capacity_asks(request: web.Request) -> None:
    """A client's capacity asks within CAPACITY_ASKS_PER_MIN (each may cost a signature
    verification); 429, marked per_client, beyond."""
    limiter = request.app[CAPACITY_LIMITER]
    key = client_key(request.remote)
    wait = limiter.take(key)
    if wait is not None:
        count(request, lambda m: m.rate_limited.labels("capacity").inc())
        raise capacity_refused(429, "per_client", f"too many capacity asks from {key}; "
                               f"retry in {wait:.1f} s",
                               retry_after=RateLimiter.retry_after(wait))


async def _no_interim(request: web.Request) -> None:
    """The upload handler sends 100 Continue itself, after installing its byte counter."""


def add_routes(routes: Routes) -> None:
    routes.get(spec.DOWNLOAD_PATH, download, role="public")
    routes.post(spec.UPLOAD_PATH, upload, role="public", expect_handler=_no_interim)
    routes.get(spec.ECHO_PATH, echo, role="public")
