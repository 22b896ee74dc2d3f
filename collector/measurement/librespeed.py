"""LibreSpeed-compatible backend (shared/reference/protocols.md §6), so the unmodified
LibreSpeed browser page and librespeed-cli can test against a bbprobe measurement server.

- ``garbage``: GET, ``ckSize`` chunks of 1 MiB (default 4, clamped to 1..1024) of
  incompressible data from the pre-generated payload buffer, streamed, no-cache;
- ``empty``: GET (ping) and POST (upload) answer 200 with an empty body; a POST body is
  drained without being kept (up to measurement.max_bytes);
- ``getIP``: ``{"processedString", "rawIspInfo"}``; private and shared addresses labelled,
  no outside lookup (the collector asks no third party about its clients).

Each under ``/backend/x.php``, ``/backend/x``, ``/x.php`` and ``/x`` (PHP-style and
Go-style server lists both work), with permissive CORS and OPTIONS preflights, as the Go
backend does. Counted in the measurement role's concurrent-transfer limit.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging

from aiohttp import web

from agent import payload
from collector.errors import ApiError
from collector.measurement.slots import MEASUREMENT_CONFIG, SLOTS, presented
from collector.routing import Routes

CHUNK = 1024 * 1024
NAMES = ("garbage", "empty", "getIP")
NO_CACHE = {
    "Cache-Control": "no-store, no-cache, must-revalidate, max-age=0, s-maxage=0, "
                     "post-check=0, pre-check=0",
    "Pragma": "no-cache",
}
CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS, HEAD",
    "Access-Control-Allow-Headers": "Content-Encoding, Content-Type",
    # Resource Timing (W3C): without it a page from another origin sees zeroed timings
    # and its ping falls back on coarse timers, 1-2 ms high on loopback.
    "Timing-Allow-Origin": "*",
}
log = logging.getLogger("bbprobe.collector")


def _went_away(request: web.Request, what: str, exc: BaseException) -> None:
    """A client that closes its stream is normal: LibreSpeed's page cancels its
    downloads and uploads when each test's time is up (about 5 a test). One line at
    debug level, never a traceback."""
    log.debug("librespeed %s from %s: the client went away (%s)", what, request.remote,
              type(exc).__name__)


def paths(name: str) -> list[str]:
    return [f"/backend/{name}.php", f"/backend/{name}", f"/{name}.php", f"/{name}"]


def chunks_wanted(raw: str | None) -> int:
    """``ckSize``: missing, not a number or < 1 -> 4; above 1024 -> 1024 (PHP backend)."""
    # ASCII digits only: str.isdigit() accepts '²', which int() refuses (a 500); and no
    # int() of thousands of digits (Python refuses those too).
    if raw is None or not (raw.isascii() and raw.isdigit()):
        return 4
    digits = raw.lstrip("0")
    if not digits:
        return 4
    return 1024 if len(digits) > 4 else min(int(digits), 1024)


def describe_ip(address: str) -> str:
    """The getIP string for a client address (no ISP lookup)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.is_loopback:
        return f"{address} - localhost IPv{ip.version} access"
    if ip.version == 4 and ip in ipaddress.ip_network("100.64.0.0/10"):
        return f"{address} - CGNAT IPv4 access"
    if ip.is_link_local:
        return f"{address} - link-local IPv{ip.version} access"
    if ip.is_private:
        return f"{address} - private IPv{ip.version} access"
    return address


async def garbage(request: web.Request) -> web.StreamResponse:
    cfg = request.app[MEASUREMENT_CONFIG]
    # Within the measurement role's per-request byte cap, as every download here is.
    count = min(chunks_wanted(request.query.get("ckSize")), max(1, cfg.max_bytes // CHUNK))
    claims = await presented(request)
    async with request.app[SLOTS].slot(request.remote, claims) as transfer:
        # A ticket with less left gets fewer chunks (one at least: it has some left).
        count = min(count, max(1, transfer.bytes // CHUNK))
        response = web.StreamResponse(headers={
            **NO_CACHE, **CORS, "Content-Type": "application/octet-stream",
            "Content-Description": "File Transfer",
            "Content-Disposition": "attachment; filename=random.dat",
            "Content-Transfer-Encoding": "binary"})
        response.content_length = count * CHUNK
        await response.prepare(request)
        block = payload.buffer()[:CHUNK]
        try:
            # A client that stops reading holds its slot no longer than any transfer may
            # last (else idle sockets could hold every slot for minutes).
            async with asyncio.timeout(transfer.seconds):
                for _ in range(count):
                    if transfer.take(CHUNK) < CHUNK:
                        # The ticket's other transfers used its bytes: cut short.
                        _drop(request)
                        return response
                    await response.write(block)  # a client aborting ends it with a reset
                await response.write_eof()
        except TimeoutError:
            _drop(request)
        except ConnectionError as exc:
            _went_away(request, "download", exc)
        return response


async def empty(request: web.Request) -> web.Response:
    if request.method == "POST" and request.can_read_body:
        cfg = request.app[MEASUREMENT_CONFIG]
        claims = await presented(request)
        async with request.app[SLOTS].slot(request.remote, claims) as transfer:
            received = 0
            try:
                # Bounded in time as in bytes: a client announcing a large body and then
                # trickling it must not keep the slot.
                async with asyncio.timeout(transfer.seconds):
                    async for block in request.content.iter_chunked(256 * 1024):
                        received += len(block)
                        if received > cfg.max_bytes:
                            raise web.HTTPRequestEntityTooLarge(max_size=cfg.max_bytes,
                                                                actual_size=received)
                        if not transfer.record(len(block)):
                            raise transfer.over()
            except TimeoutError:
                _drop(request)
                raise ApiError(408, f"upload not finished within {transfer.seconds:g} s") \
                    from None
            except ConnectionError as exc:
                _went_away(request, "upload", exc)
    return web.Response(body=b"", headers={**NO_CACHE, **CORS, "Connection": "keep-alive"})


def _drop(request: web.Request) -> None:
    """Close a connection whose client does not keep up: its slot is released as the
    handler returns, whatever the client does next."""
    if request.transport is not None:
        request.transport.abort()


async def get_ip(request: web.Request) -> web.Response:
    address = request.remote or ""
    return web.json_response({"processedString": describe_ip(address), "rawIspInfo": ""},
                             headers={**NO_CACHE, **CORS})


async def preflight(request: web.Request) -> web.Response:
    return web.Response(status=200, headers={**CORS, "Access-Control-Max-Age": "86400"})


def add_routes(routes: Routes) -> None:
    # Open, as LibreSpeed's own backend: the transfers are bounded by the slots.
    for path in paths("garbage"):
        routes.get(path, garbage, role="public")
        routes.options(path, preflight, role="public")
    for path in paths("empty"):
        # HEAD too: the CORS reply advertises it, and some clients ping with it.
        routes.get(path, empty, role="public")
        routes.post(path, empty, role="public")
        routes.options(path, preflight, role="public")
    for path in paths("getIP"):
        routes.get(path, get_ip, role="public")
        routes.options(path, preflight, role="public")
